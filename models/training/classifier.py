"""Nodule-present slice classifier whose class activation map is exact and lesion-sized.

Architecture contract (CAM, Zhou et al. 2016): CNN backbone → 1×1 conv class projection →
global average pooling. The backbone keeps a stride-4 feature map (64 × 64 for a
256 × 256 input) with dilated convolutions for context, so the map can point at a
3 mm nodule instead of a whole lung. With ``evidence_stride=2`` a refinement block
up-samples that context to stride 2 and joins it with the stride-2 encoder features (a
feature-pyramid step), so the evidence map has 128 × 128 positions: the cross-section of a
nodule's first or last slice, a few pixels of the 256 × 256 input, then fills a cell of
its own instead of sharing a stride-4 cell with the vessels around it.

With ``input_scale=2`` the network takes the source 512 × 512 slice and folds each 2 × 2
block of pixels into channels (space-to-depth, ``PixelUnshuffle``) before the stem: the
body and the evidence map keep the 256 × 256 grid and nearly the same cost, but the stem
learns its own down-sampling instead of receiving the 2 × 2 area average, so a 1–4-pixel
cross-section of the 256 grid (4–16 source pixels) reaches the network with its shape.
One run of it did not beat the 256 × 256 input (models/README.md).

The backbone ends in a one-channel, rectified **evidence** map (1 × 1 conv + ReLU), the class
projection is a 1 × 1 conv on it, and ``cam_lowres = scale · project(evidence)``,
``logit = mean(cam_lowres) + bias``, exactly. The fixed ``scale`` (= number of map positions)
makes the pooled logit the *sum* of the per-position evidence: a nodule covering a handful of
positions can then carry the decision. The rectification is what keeps the rest of the map
at exactly zero: without it, small signed residues at thousands of positions add up to a
logit noise as large as a small nodule's evidence (measured: slice AUC 0.84 without it). Training adds a localisation term on the evidence
map (a fixed target on stride-4 cells that hold nodule pixels, zero elsewhere; see
``train.cls_loss``), which is what makes the CAM sharp; the exported head is unchanged by it.

``ClassifierExport`` wraps the network for ONNX: outputs ``logit`` (N, 1) and ``cam``
(N, 1, H, W) — the per-position logit map bilinearly up-sampled to the input size inside
the graph (for this GAP + linear head Grad-CAM equals CAM up to a positive constant).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.training.unet import conv_block


class NoduleClassifier(nn.Module):
    """Backbone → 1×1 projection → GAP. ``forward`` returns ``(logit (N,1), cam_lowres)``."""

    def __init__(
        self,
        in_channels: int = 1,
        base: int = 16,
        input_size: int = 256,
        evidence_stride: int = 4,
        input_scale: int = 1,
    ) -> None:
        super().__init__()
        if evidence_stride not in (2, 4):
            raise ValueError(f"evidence_stride must be 2 or 4, not {evidence_stride}")
        if input_scale not in (1, 2):
            raise ValueError(f"input_scale must be 1 or 2, not {input_scale}")
        self.evidence_stride = evidence_stride
        self.input_scale = input_scale
        # ``input_size`` is the label grid (256); the input is ``input_scale`` times finer.
        self.unshuffle: nn.Module = (
            nn.PixelUnshuffle(input_scale) if input_scale > 1 else nn.Identity()
        )
        self.stem = conv_block(in_channels * input_scale**2, base)  # stride 1 on the label grid
        self.stage2 = conv_block(base, base * 2)  # stride 2
        self.stage3 = conv_block(base * 2, base * 4)  # stride 4
        self.context = nn.Sequential(  # stride 4, dilated: receptive field ~ 60 px
            conv_block(base * 4, base * 6, dilation=2),
            conv_block(base * 6, base * 6, dilation=4),
        )
        self.pool = nn.MaxPool2d(2)
        head = base * 6
        self.refine: nn.Module | None = None
        if evidence_stride == 2:
            self.refine = conv_block(base * 6 + base * 2, base * 2)  # stride 2
            head = base * 2
        self.evidence = nn.Sequential(nn.Conv2d(head, 1, 1), nn.ReLU(inplace=True))
        self.project = nn.Conv2d(1, 1, 1, bias=False)
        # Start with (almost) no evidence anywhere: the logit begins at the bias.
        nn.init.normal_(self.evidence[0].weight, std=1e-3)
        nn.init.zeros_(self.evidence[0].bias)
        nn.init.ones_(self.project.weight)
        self.bias = nn.Parameter(torch.tensor([-4.0]))
        positions = (input_size // evidence_stride) ** 2
        self.register_buffer("scale", torch.tensor(float(positions)), persistent=False)

    def cam_lowres(self, x: torch.Tensor) -> torch.Tensor:
        f = self.stem(self.unshuffle(x))
        s2 = self.stage2(self.pool(f))
        f = self.context(self.stage3(self.pool(s2)))
        if self.refine is not None:
            up = F.interpolate(f, size=s2.shape[-2:], mode="nearest")
            f = self.refine(torch.cat([up, s2], dim=1))
        f = self.evidence(f)
        out: torch.Tensor = self.project(f) * self.scale
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cam = self.cam_lowres(x)
        logit = cam.mean(dim=(2, 3)) + self.bias
        return logit, cam


class ClassifierExport(nn.Module):
    """ONNX wrapper: ``(logit, cam)`` with the CAM up-sampled (bilinear) to the input size."""

    def __init__(self, net: NoduleClassifier) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logit, cam = self.net(x)
        cam_full = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return logit, cam_full
