"""SegNet (Badrinarayanan et al. 2017) for 2-D slice segmentation, sized for CPU serving.

A VGG16-style encoder (stages of 2, 2, 3, 3 conv + BN + ReLU layers, channel widths
base·(1, 2, 4, 8)) whose 2×2 max-pooling layers keep their **indices**, and a mirrored
decoder that up-samples with ``MaxUnpool2d`` using those indices — the defining feature of
SegNet: boundaries are restored from where the maxima were, without learned up-sampling and
without copying encoder feature maps. Input (N, 1, H, W), H and W divisible by 16; output
(N, n_classes, H, W) logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Tie-breaking offsets inside each 2 × 2 pooling window (first element wins, as in PyTorch).
# Uniform image regions (air clipped at −1024 HU, window saturation) give exactly equal
# activations, and which of them a runtime reports as the maximum then depends on rounding:
# onnxruntime and PyTorch disagree, and the decoder routes the value to a different pixel.
# A fixed offset far above float rounding (~1e-6) and far below the activations (~0.1–10)
# makes the index choice identical everywhere; the pooled values themselves are unchanged.
TIE_EPS = 1e-4


def _layers(c_in: int, c_out: int, n: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(n):
        mods += [
            nn.Conv2d(c_in if i == 0 else c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
        ]
    return nn.Sequential(*mods)


class SegNet(nn.Module):
    """Encoder (VGG-style, pooling indices kept) → decoder (MaxUnpool with those indices)."""

    def __init__(self, in_channels: int = 1, n_classes: int = 3, base: int = 16) -> None:
        super().__init__()
        widths = [base, base * 2, base * 4, base * 8]
        depths = [2, 2, 3, 3]
        self.enc = nn.ModuleList()
        c = in_channels
        for w, n in zip(widths, depths, strict=True):
            self.enc.append(_layers(c, w, n))
            c = w
        self.unpool = nn.MaxUnpool2d(2, stride=2)
        # Decoder stage i mirrors encoder stage i: it ends with that stage's input width.
        self.dec = nn.ModuleList()
        outs = [base, *widths[:-1]]
        for w, n, w_out in zip(widths[::-1], depths[::-1], outs[::-1], strict=True):
            self.dec.append(
                nn.Sequential(_layers(w, w, n - 1), _layers(w, w_out, 1))
                if n > 1
                else _layers(w, w_out, 1)
            )
        self.head = nn.Conv2d(base, n_classes, 3, padding=1)

    @staticmethod
    def _pool(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2 × 2 max pooling that also returns deterministic (tie-broken) indices."""
        h, w = x.shape[-2:]
        ry = (torch.arange(h, device=x.device) % 2).to(x.dtype)
        rx = (torch.arange(w, device=x.device) % 2).to(x.dtype)
        ramp = TIE_EPS * (3.0 - 2.0 * ry[:, None] - rx[None, :])
        _, idx = F.max_pool2d(x + ramp, 2, stride=2, return_indices=True)
        return F.max_pool2d(x, 2, stride=2), idx

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        indices: list[torch.Tensor] = []
        sizes: list[torch.Size] = []
        for block in self.enc:
            x = block(x)
            sizes.append(x.shape)
            x, idx = self._pool(x)
            indices.append(idx)
        for block in self.dec:
            x = self.unpool(x, indices.pop(), output_size=sizes.pop()[-2:])
            x = block(x)
        out: torch.Tensor = self.head(x)
        return out
