"""U-Net (Ronneberger et al. 2015) for 2-D slice segmentation, sized for CPU serving.

Encoder–decoder with skip connections: four 2× down-sampling steps, each stage two 3×3
conv + BatchNorm + ReLU blocks, transposed-conv up-sampling, concatenation of the encoder
feature map at the same scale. Input (N, 1, H, W) with H, W divisible by 16; output
(N, n_classes, H, W) logits.
"""

from __future__ import annotations

import torch
from torch import nn


def conv_block(c_in: int, c_out: int, dilation: int = 1) -> nn.Sequential:
    """Two 3×3 conv + BN + ReLU layers (same padding)."""
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """Four-level U-Net; ``base`` channels at full resolution, doubling per level."""

    def __init__(self, in_channels: int = 1, n_classes: int = 3, base: int = 16) -> None:
        super().__init__()
        widths = [base, base * 2, base * 4, base * 8, base * 16]
        self.widths = widths
        self.down = nn.ModuleList()
        c = in_channels
        for w in widths:
            self.down.append(conv_block(c, w))
            c = w
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for w_skip, w_deep in zip(widths[-2::-1], widths[:0:-1], strict=True):
            self.up.append(nn.ConvTranspose2d(w_deep, w_skip, 2, stride=2))
            self.dec.append(conv_block(2 * w_skip, w_skip))
        self.head = nn.Conv2d(widths[0], n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        out: torch.Tensor = self.head(x)
        return out
