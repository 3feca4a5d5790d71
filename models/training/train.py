"""Train one of the three models on phantom slices: ``python -m models.training.train <model>``.

Seeded and CPU-only. Segmentation models (``unet``, ``segnet``) train on 96 × 96 crops of
the 256 × 256 network-input slices — half of them centred on a nodule pixel of a uniformly
drawn nodule slice (lesion-focused sampling: nodules cover < 0.1 % of the pixels, and drawing
per slice rather than per pixel keeps a 4 mm nodule as frequent as a 30 mm one), a quarter
centred on lung (where the vessels that mimic nodules are), the rest uniform — with
cross-entropy + soft Dice, then finish on whole slices; BatchNorm statistics are re-estimated
on whole slices at the end. The classifier trains on the same crops with a binary cross-entropy on the
pooled logit plus a localisation term on the per-position evidence (``cls_loss``), then
finishes on whole slices. Checkpoints and logs go to ``models/.cache/``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from models.training.classifier import NoduleClassifier
from models.training.data import (
    CACHE_DIR,
    PREPROCESSING,
    SPLITS,
    Split,
    context_index,
    load_split,
    network_inputs,
)
from models.training.segnet import SegNet
from models.training.unet import UNet

MODEL_NAMES = ("unet", "segnet", "classifier")
CHECKPOINTS = CACHE_DIR / "checkpoints"

DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {"base": 12, "minutes": 25.0, "lr": 2e-3, "batch": 12, "crop": 96},
    "segnet": {"base": 12, "minutes": 25.0, "lr": 2e-3, "batch": 12, "crop": 96},
    "classifier": {
        "base": 12,
        "minutes": 28.0,
        "lr": 3e-3,
        "batch": 16,
        "crop": 64,
        "evidence_stride": 4,
    },
}
SINGLE_FRAME_FRACTION = 0.05  # 2.5-D inputs whose context repeats the centre slice
SEG_NODULE_FRACTION = 0.5  # segmentation crops centred on a nodule pixel of a random nodule slice
SEG_LUNG_FRACTION = 0.25  # segmentation crops centred on lung: vessels are the hard negatives
NODULE_CE_WEIGHT = 2.0  # segmentation: cross-entropy weight of the nodule class
FINAL_FULL_FRACTION = 0.1  # share of the time budget spent on whole 256 × 256 slices
LOC_WEIGHT = 1.0  # classifier: weight of the localisation term
EVIDENCE_TARGET = 2.0  # classifier: logit contribution of one fully covered evidence cell
LESION_CELL_WEIGHT = 20.0  # nodule cells are rare: up-weight them
# Classifier curriculum (share of the time budget → crop side, batch): many cheap small crops
# first, then larger crops, then whole slices at the natural prevalence of nodule slices.
CLS_PHASES = ((0.6, 64, 16), (0.9, 128, 6))
CLS_FULL_BATCH = 4
CLS_NODULE_FRACTION = 0.5  # crops centred on a nodule pixel of a random nodule slice
CLS_LUNG_FRACTION = 0.35  # crops centred on a random lung pixel (vessels: the hard negatives)
WARMUP_FRACTION = 0.02  # classifier: linear learning-rate warm-up
BN_RECALIBRATION_SLICES = 256  # BatchNorm statistics re-estimated on whole slices
VAL_EVERY_SECONDS = 300.0  # classifier: progress probe on every 8th validation slice


def classifier_recipe(
    lesion_sampling: bool = False,
    evidence_stride: int = 4,
    min_evidence: float | None = None,
    input_scale: int = 1,
) -> str:
    """One-paragraph description of the classifier's training recipe (for the model card)."""
    drawn = (
        "a uniformly drawn lesion (3-D nodule component), then one of its slices"
        if lesion_sampling
        else "a uniformly drawn nodule slice"
    )
    phases = ", ".join(
        f"{c} × {c} crops (batch {b}) up to {end:.0%} of the time budget"
        for end, c, b in CLS_PHASES
    )
    uniform = 1.0 - CLS_NODULE_FRACTION - CLS_LUNG_FRACTION
    raised = (
        f", raised to {min_evidence:g} / n on the n nodule cells of a sample whose targets "
        "would sum to less, so that a small cross-section's evidence stands out of the "
        "background's"
        if min_evidence
        else ""
    )
    source = (
        f" (inputs at the source {256 * input_scale} × {256 * input_scale} resolution, folded "
        f"{input_scale} × {input_scale} into channels before the stem; crop sides count "
        "label-grid pixels)"
        if input_scale > 1
        else ""
    )
    return (
        f"{phases}{source}, then whole 256 × 256 slices (batch {CLS_FULL_BATCH}, drawn uniformly: the "
        f"natural share of nodule slices); crops {CLS_NODULE_FRACTION:.0%} centred on a nodule "
        f"pixel of {drawn}, "
        f"{CLS_LUNG_FRACTION:.0%} centred on a random lung pixel (vessels are the hard "
        f"negatives), {uniform:.0%} uniform; left-right mirroring; AdamW (weight decay 1e-4), "
        f"{WARMUP_FRACTION:.0%} linear warm-up, cosine decay on wall-clock progress; loss = BCE "
        f"on the pooled logit + localisation term on the stride-{evidence_stride} evidence map "
        f"(target {EVIDENCE_TARGET:g} · (1 + c) / 2 on cells holding nodule pixels, c = their nodule "
        f"share{raised}, 0 elsewhere, a one-cell ring left free, nodule cells weighted "
        f"{LESION_CELL_WEIGHT:g}×, weight {LOC_WEIGHT:g}); BatchNorm statistics re-estimated on "
        f"{BN_RECALIBRATION_SLICES} whole training slices at the end; slice label: any "
        "nodule pixel on the 256 × 256 grid (area majority), as in validation and test."
    )


def build_model(
    name: str,
    base: int,
    in_channels: int = PREPROCESSING.channels,
    evidence_stride: int = 4,
    input_scale: int = 1,
) -> nn.Module:
    if name != "classifier" and input_scale != 1:
        raise ValueError(f"{name} takes inputs on the label grid (input_scale 1)")
    if name == "unet":
        return UNet(in_channels=in_channels, base=base)
    if name == "segnet":
        return SegNet(in_channels=in_channels, base=base)
    if name == "classifier":
        return NoduleClassifier(
            in_channels=in_channels,
            base=base,
            evidence_stride=evidence_stride,
            input_scale=input_scale,
        )
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")


class CropSampler:
    """Random (crop, label) batches from a split, half of them centred on nodule pixels.

    Inputs carry ``context`` neighbouring slices on each side as channels (2.5-D), the label
    is the centre slice's. The channel order is reversed for half the samples (the service
    sorts frames along the slice normal, which may run either way), and
    ``SINGLE_FRAME_FRACTION`` of them repeat the centre slice in every channel, as the
    service does for a single-frame upload.

    ``per_slice`` draws the nodule pixel from a uniformly drawn nodule slice (every nodule
    slice counts the same, however large its cross-section) instead of uniformly over all
    nodule pixels; ``per_lesion`` from a uniformly drawn lesion (a 3-D connected component
    of the nodule label within its series), then one of its slices: a 7 mm nodule on two
    slices is drawn as often as a 25 mm one on ten. ``lung_fraction`` of the crops are centred on a random lung pixel, where
    the vessels that look like nodules are; the rest are placed uniformly.

    Crops are placed on the label grid; when the inputs are finer (``Split.input_scale``), the
    input crop covers the same area at that resolution (``crop · input_scale`` pixels a side).
    """

    def __init__(
        self,
        data: Split,
        rng: np.random.Generator,
        nodule_fraction: float = 0.5,
        *,
        lung_fraction: float = 0.0,
        per_slice: bool = False,
        per_lesion: bool = False,
        context: int = PREPROCESSING.context_slices,
    ):
        self.data = data
        self.context = context
        self.ctx = context_index(data.series, context)
        self.rng = rng
        self.nodule_fraction = nodule_fraction
        self.lung_fraction = lung_fraction
        self.per_slice = per_slice
        nod = np.argwhere(data.y == 2)  # (k, 3): slice, row, col
        self.nodule_pixels = nod
        # Rows of ``nod`` per nodule slice (argwhere is sorted by slice).
        _, self.slice_start, self.slice_count = np.unique(
            nod[:, 0], return_index=True, return_counts=True
        )
        self.lung_pixels = np.argwhere(data.y == 1) if lung_fraction > 0 else np.zeros((0, 3))
        self.n, self.h, self.w = data.y.shape
        self.scale = data.input_scale
        self.lesion_slices: list[np.ndarray] = lesion_slices(data) if per_lesion else []

    def _nodule_pixel(self) -> np.ndarray:
        if self.lesion_slices:
            rows = self.lesion_slices[self.rng.integers(len(self.lesion_slices))]
            k = rows[self.rng.integers(len(rows))]  # index into slice_start / slice_count
            j = self.slice_start[k] + self.rng.integers(self.slice_count[k])
            return self.nodule_pixels[j]
        if self.per_slice:
            k = self.rng.integers(len(self.slice_start))
            j = self.slice_start[k] + self.rng.integers(self.slice_count[k])
            return self.nodule_pixels[j]
        return self.nodule_pixels[self.rng.integers(len(self.nodule_pixels))]

    def whole_slices(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniformly drawn whole slices (the natural share of nodule slices)."""
        idx = self.rng.integers(self.n, size=size)
        x = self.data.x[self.ctx[idx]].astype(np.float32)
        y = self.data.y[idx].astype(np.int64)
        flip = self.rng.random(size) < 0.5
        x[flip] = x[flip][..., ::-1]
        y[flip] = y[flip][..., ::-1]
        for i in range(size):
            x[i] = self._context_augment(x[i])
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))

    def _context_augment(self, x: np.ndarray) -> np.ndarray:
        """Reverse the slice order (p = 0.5) or repeat the centre slice (single frame)."""
        if self.context == 0:
            return x
        u = self.rng.random()
        if u < SINGLE_FRAME_FRACTION:
            return np.repeat(x[self.context : self.context + 1], len(x), axis=0)
        if u < 0.5 + SINGLE_FRAME_FRACTION / 2:
            return x[::-1]
        return x

    def batch(self, size: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        side = crop * self.scale
        xs = np.empty((size, 2 * self.context + 1, side, side), np.float32)
        ys = np.empty((size, crop, crop), np.int64)
        for i in range(size):
            u = self.rng.random()
            if len(self.nodule_pixels) and u < self.nodule_fraction:
                s, r, c = self._nodule_pixel()
                r0 = int(np.clip(r - self.rng.integers(8, crop - 8), 0, self.h - crop))
                c0 = int(np.clip(c - self.rng.integers(8, crop - 8), 0, self.w - crop))
            elif len(self.lung_pixels) and u < self.nodule_fraction + self.lung_fraction:
                s, r, c = self.lung_pixels[self.rng.integers(len(self.lung_pixels))]
                r0 = int(np.clip(r - crop // 2, 0, self.h - crop))
                c0 = int(np.clip(c - crop // 2, 0, self.w - crop))
            else:
                s = self.rng.integers(self.n)
                r0 = int(self.rng.integers(0, self.h - crop + 1))
                c0 = int(self.rng.integers(0, self.w - crop + 1))
            f = self.scale
            rows, cols = slice(f * r0, f * (r0 + crop)), slice(f * c0, f * (c0 + crop))
            x = self.data.x[self.ctx[s], rows, cols].astype(np.float32)
            y = self.data.y[s, r0 : r0 + crop, c0 : c0 + crop]
            if self.rng.random() < 0.5:  # left-right mirror: anatomy is nearly symmetric
                x, y = x[..., ::-1], y[:, ::-1]
            xs[i] = self._context_augment(x)
            ys[i] = y
        return torch.from_numpy(xs), torch.from_numpy(ys)


def lesion_slices(data: Split) -> list[np.ndarray]:
    """Per lesion, the indices of its slices among the split's nodule slices (sorted).

    Lesions are the 3-D connected components (26-connectivity) of the nodule label within
    each series; the indices refer to ``np.unique(argwhere(y == 2)[:, 0])``.
    """
    nodule_slices = np.unique(np.nonzero((data.y == 2).any(axis=(1, 2)))[0])
    position = {int(s): i for i, s in enumerate(nodule_slices)}
    out: list[np.ndarray] = []
    for series in np.unique(data.series):
        rows = np.nonzero(data.series == series)[0]
        ids, n = ndimage.label(data.y[rows] == 2, structure=np.ones((3, 3, 3), bool))
        for c in range(1, n + 1):
            z = np.nonzero((ids == c).any(axis=(1, 2)))[0]
            out.append(np.array([position[int(rows[k])] for k in z]))
    return out


def seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    per_sample_nodule: bool = False,
    nodule_weight: float = NODULE_CE_WEIGHT,
) -> torch.Tensor:
    """Cross-entropy (nodule class weighted ``nodule_weight``) + soft Dice of the lung and
    nodule classes, pooled over the batch.

    With ``per_sample_nodule`` the nodule term averages the soft Dice of each sample that
    contains nodule instead: pooled, a 25 mm nodule's pixels outweigh a 7 mm one's ten to one.
    """
    ce = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 1.0, nodule_weight]))
    prob = logits.softmax(1)
    onehot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum((2, 3))  # (B, 3)
    denom = prob.sum((2, 3)) + onehot.sum((2, 3))
    lung = (2 * inter[:, 1].sum() + 1.0) / (denom[:, 1].sum() + 1.0)
    has = onehot[:, 2].sum((1, 2)) > 0
    if per_sample_nodule and bool(has.any()):
        nodule = ((2 * inter[has, 2] + 1.0) / (denom[has, 2] + 1.0)).mean()
    else:
        nodule = (2 * inter[:, 2].sum() + 1.0) / (denom[:, 2].sum() + 1.0)
    return ce + ((1.0 - lung) + (1.0 - nodule)) / 2


def evidence_target(
    nodule: torch.Tensor, stride: int, min_evidence: float | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cell evidence targets and loss weights of the classifier's localisation term.

    ``nodule`` is the (B, 1, H, W) nodule indicator; the answer is two (B, 1, H/stride,
    W/stride) maps. See ``cls_loss`` for the rule.
    """
    cell = F.max_pool2d(nodule, kernel_size=stride, stride=stride)
    cover = F.avg_pool2d(nodule, kernel_size=stride, stride=stride)
    ring = F.max_pool2d(cell, kernel_size=3, stride=1, padding=1) - cell
    weight = (1.0 - ring) + (LESION_CELL_WEIGHT - 1.0) * cell
    target = EVIDENCE_TARGET * 0.5 * (cell + cover)
    if min_evidence:
        n_cells = cell.sum((1, 2, 3), keepdim=True).clamp(min=1.0)
        target = torch.where(cell > 0, target.clamp(min=min_evidence / n_cells), target)
    return target, weight


def cls_loss(
    net: NoduleClassifier,
    cam_lowres: torch.Tensor,
    y: torch.Tensor,
    min_evidence: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCE on the pooled logit + a localisation term on the per-position evidence.

    ``cam_lowres`` is ``net.cam_lowres(x)`` in float32 (the caller runs the network, under mixed
    precision or not). The evidence map is ``cam_lowres / scale``: the logit is its sum plus the
    bias, so the same loss applies to crops of any size. Sum pooling alone spreads its gradient
    evenly over all positions and does not find a 3 mm nodule in 4,096 positions; the
    localisation term tells each evidence cell (``evidence_stride`` pixels square) what its
    evidence should be — where the cell holds nodule pixels ``EVIDENCE_TARGET · (1 + c) / 2``
    with ``c`` the share of the cell's pixels that are nodule (so the map peaks on the
    best-covered cells, where its up-sampled maximum lands inside the nodule), 0 elsewhere (a
    ring around the nodule is left free) — so the map is zero away from nodules and the logit
    grows with the nodule's extent.

    With ``min_evidence`` the nodule cells of a sample are asked for at least
    ``min_evidence / n`` each (``n`` of them): a 2-pixel cross-section fills one cell, whose
    plain target (about half ``EVIDENCE_TARGET``) is no more than the summed noise of 4,096
    background cells, so without it the localisation term holds the small nodules' logit
    down against the BCE term.
    """
    evidence = cam_lowres / net.scale
    logit = evidence.sum((2, 3)) + net.bias
    nodule = (y == 2).float()[:, None]
    present = (nodule.flatten(1).sum(1) > 0).float()[:, None]
    target, weight = evidence_target(nodule, net.evidence_stride, min_evidence)
    err = (evidence - target) ** 2
    loc = (weight * err).sum((1, 2, 3)).mean()
    bce = F.binary_cross_entropy_with_logits(logit, present)
    return bce + LOC_WEIGHT * loc, logit, present


@torch.no_grad()
def seg_val_dice(
    net: nn.Module, data: Split, rows: np.ndarray | None = None, batch: int = 16
) -> dict[str, float]:
    """Lung and nodule Dice on the network grid over ``rows`` of a split (all by default)."""
    net.eval()
    rows = np.arange(len(data.x)) if rows is None else rows
    inter = np.zeros(3)
    denom = np.zeros(3)
    for i in range(0, len(rows), batch):
        j = rows[i : i + batch]
        pred = net(torch.from_numpy(network_inputs(data, j))).argmax(1).numpy()
        y = data.y[j]
        for k in (1, 2):
            inter[k] += np.sum((pred == k) & (y == k))
            denom[k] += np.sum(pred == k) + np.sum(y == k)
    net.train()
    return {
        "lung_dice": float(2 * inter[1] / denom[1]),
        "nodule_dice": float(2 * inter[2] / denom[2]),
    }


@torch.no_grad()
def cls_val(
    net: NoduleClassifier, data: Split, rows: np.ndarray | None = None, batch: int = 16
) -> dict[str, float]:
    """Slice AUC of the pooled logit over ``rows`` of a split (all by default)."""
    net.eval()
    rows = np.arange(len(data.x)) if rows is None else rows
    logits = []
    for i in range(0, len(rows), batch):
        x = torch.from_numpy(network_inputs(data, rows[i : i + batch]))
        logits.append(net(x)[0][:, 0].numpy())
    net.train()
    score = np.concatenate(logits)
    label = (data.y[rows] == 2).any(axis=(1, 2))
    return {"auc": auc(score, label), "val_slices": len(score)}


@torch.no_grad()
def cls_val_pointing(
    net: NoduleClassifier, data: Split, rows: np.ndarray | None = None, batch: int = 16
) -> float:
    """Share of the nodule slices whose up-sampled CAM maximum lies on a nodule pixel."""
    net.eval()
    rows = np.arange(len(data.x)) if rows is None else rows
    hits = []
    pos = rows[(data.y[rows] == 2).any(axis=(1, 2))]
    for i in range(0, len(pos), batch):
        j = pos[i : i + batch]
        x = torch.from_numpy(network_inputs(data, j))
        grid = data.y.shape[-2:]  # the label grid (the input may be finer)
        cam = F.interpolate(net(x)[1], size=grid, mode="bilinear", align_corners=False)
        flat = cam.flatten(1).argmax(1).numpy()
        hits.extend((data.y[j].reshape(len(j), -1)[np.arange(len(j)), flat] == 2).tolist())
    net.train()
    return float(np.mean(hits)) if hits else float("nan")


@torch.no_grad()
def recalibrate_batchnorm(
    net: nn.Module, sampler: CropSampler, slices: int, batch: int = 8
) -> None:
    """Re-estimate BatchNorm running statistics on whole slices (cumulative average).

    Training ends on crops and on few whole slices per batch; inference sees whole slices, so
    the statistics the exported graph folds in are measured on those (weights unchanged).
    """
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    saved = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    net.train()
    for _ in range(max(slices // batch, 1)):
        x, _ = sampler.whole_slices(batch)
        net(x)
    for m, mom in zip(bns, saved, strict=True):
        m.momentum = mom


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve (Mann–Whitney U with average ranks for ties)."""
    from scipy.stats import rankdata

    pos = label.astype(bool)
    n1, n0 = int(pos.sum()), int((~pos).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def train(
    name: str,
    *,
    minutes: float | None = None,
    seed: int = 0,
    threads: int = 2,
    data: Split | None = None,
    val: Split | None = None,
    out: Path | None = None,
    log_every: int = 50,
    resume: bool = False,
    lr: float | None = None,
    max_steps: int | None = None,
    val_every: bool = True,
    lesion_balanced: bool = False,
    lesion_sampling: bool = False,
    nodule_weight: float = NODULE_CE_WEIGHT,
    evidence_stride: int | None = None,
    ema: float | None = None,
    base: int | None = None,
    min_evidence: float | None = None,
    input_scale: int | None = None,
    bf16: bool = False,
    compile_forward: bool = False,
) -> dict[str, Any]:
    """Train ``name`` within a wall-clock budget; save ``<out>/<name>.pt`` and a JSON log.

    With ``resume`` the checkpoint in ``out`` is trained further (a new cosine cycle from
    ``lr``); steps, time and commands of all sessions add up in the log. ``lesion_balanced``
    (segmenters) draws nodule crops per lesion and averages the nodule Dice per sample, so
    small nodules weigh as much as large ones (an experiment: see models/README.md);
    ``lesion_sampling`` draws the nodule crops per lesion (classifier too) but keeps the
    pooled nodule Dice; ``nodule_weight`` is the segmenters' cross-entropy weight of the
    nodule class; ``evidence_stride`` (classifier, 2 or 4) the stride of its evidence map;
    ``base`` the channel width of the first stage (the model's default when None);
    ``min_evidence`` (classifier) the least summed evidence target of a nodule slice (see
    ``cls_loss``); ``input_scale`` (classifier, 1 or 2) how much finer than the 256 × 256
    label grid its input is (2: the source 512 × 512 slices, see ``NoduleClassifier``).
    With ``ema`` (a decay, e.g. 0.999) the saved weights are the exponential moving average
    of the weights over the steps (Polyak averaging) instead of the last step's; BatchNorm
    statistics are then re-estimated for the averaged weights.

    Two speed options change how a step is computed (its kernels and precision), not the
    recipe: ``bf16`` runs the forward pass under ``torch.autocast`` in bfloat16 (convolutions
    in bfloat16; the weights, the optimiser, BatchNorm statistics and the loss stay float32),
    ``compile_forward`` (segmenters) runs it through ``torch.compile`` (fused kernels; the
    first steps of each input shape pay the compilation). Together, on two threads of a CPU
    with AVX-512 and AMX, a SegNet step took 108 ms instead of 251 ms and a U-Net step 132 ms
    instead of 259 ms (``models/README.md``), so the time budget buys about twice the steps.
    Validation, BatchNorm re-estimation and export use the float32 module.
    """
    if compile_forward and name == "classifier":
        raise ValueError("compile_forward applies to the segmenters only")
    out = out or CHECKPOINTS
    cfg = dict(DEFAULTS[name])
    if minutes is not None:
        cfg["minutes"] = minutes
    if lr is not None:
        cfg["lr"] = lr
    if base is not None:
        cfg["base"] = base
    if name != "classifier":
        cfg["nodule_weight"] = nodule_weight
    else:
        if evidence_stride is not None:
            cfg["evidence_stride"] = evidence_stride
        cfg["input_scale"] = input_scale or 1
        if min_evidence is not None:
            if min_evidence <= 0:
                raise ValueError(f"min_evidence must be > 0, got {min_evidence}")
            cfg["min_evidence"] = min_evidence
    if bf16:
        cfg["bf16"] = True
    if compile_forward:
        cfg["compile"] = True
    if ema is not None:
        if not 0.0 < ema < 1.0:
            raise ValueError(f"ema decay must lie in (0, 1), got {ema}")
        cfg["ema"] = ema
    previous: dict[str, Any] | None = None
    ckpt = None
    if resume:
        ckpt = torch.load(out / f"{name}.pt", map_location="cpu", weights_only=False)
        cfg["base"] = int(ckpt["base"])  # the checkpoint's width wins
        if name == "classifier":  # the checkpoint's architecture wins
            cfg["evidence_stride"] = int(ckpt.get("evidence_stride") or 4)
            cfg["input_scale"] = int(ckpt.get("input_scale") or 1)
    torch.manual_seed(seed)  # the initial weights come from the seed too
    scale = int(cfg.get("input_scale", 1))
    net = build_model(
        name,
        cfg["base"],
        evidence_stride=int(cfg.get("evidence_stride", 4)),
        input_scale=scale,
    )
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    if ckpt is not None:
        net.load_state_dict(ckpt["state_dict"])
        if "optimizer" in ckpt:
            opt.load_state_dict(ckpt["optimizer"])
        previous = ckpt["log"]
        seed = seed + len(_sessions(previous)) * 1000
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    data = data if data is not None else load_split("train", input_scale=scale)
    val = val if val is not None else load_split("val", input_scale=scale)
    if data.input_scale != scale or val.input_scale != scale:
        raise ValueError(f"the splits' inputs are not at input_scale {scale}")
    net.train()
    is_cls = name == "classifier"
    if is_cls:
        sampler = CropSampler(
            data,
            rng,
            CLS_NODULE_FRACTION,
            lung_fraction=CLS_LUNG_FRACTION,
            per_slice=True,
            per_lesion=lesion_sampling,
        )
    else:
        sampler = CropSampler(
            data,
            rng,
            SEG_NODULE_FRACTION,
            lung_fraction=SEG_LUNG_FRACTION,
            per_slice=True,
            per_lesion=lesion_balanced or lesion_sampling,
        )
    # NHWC activations: oneDNN's convolutions are about 20 % faster on CPU (same weights).
    net = net.to(memory_format=torch.channels_last)
    forward: nn.Module = torch.compile(net) if compile_forward else net  # type: ignore[assignment]
    averaged = (
        AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=False)
        if ema is not None
        else None
    )
    budget = cfg["minutes"] * 60.0
    t0 = time.time()
    step = 0
    history: list[dict[str, float]] = []
    running = 0.0
    next_val = VAL_EVERY_SECONDS
    while True:
        elapsed = time.time() - t0
        if is_cls and val_every and elapsed >= next_val:
            assert isinstance(net, NoduleClassifier)
            probe = np.arange(0, len(val.x), 8)
            v = {
                "auc": cls_val(net, val, probe)["auc"],
                "pointing": cls_val_pointing(net, val, probe),
            }
            history.append({"step": step, "seconds": round(elapsed, 1), **v})
            print(f"{name} step {step} t={elapsed:.0f}s validation probe {v}", flush=True)
            next_val += VAL_EVERY_SECONDS
        if elapsed >= budget or (max_steps is not None and step >= max_steps):
            break
        frac = elapsed / budget
        if max_steps is not None:
            frac = max(frac, step / max_steps)
        # Cosine decay on wall-clock progress (the step count is not known in advance).
        lr = cfg["lr"] * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        if is_cls and not resume and frac < WARMUP_FRACTION:
            lr *= 0.1 + 0.9 * frac / WARMUP_FRACTION
        for g in opt.param_groups:
            g["lr"] = lr
        full = frac > 1.0 - FINAL_FULL_FRACTION
        if is_cls:
            phase = next(((c, b) for end, c, b in CLS_PHASES if frac < end), None)
            if phase is None or full:
                x, y = sampler.whole_slices(CLS_FULL_BATCH)
            else:
                x, y = sampler.batch(phase[1], phase[0])
        else:
            bsz = max(cfg["batch"] // 4, 2) if full else cfg["batch"]
            x, y = sampler.batch(bsz, data.y.shape[1] if full else cfg["crop"])
        x = x.contiguous(memory_format=torch.channels_last)
        if is_cls:
            assert isinstance(net, NoduleClassifier)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                evidence = net.cam_lowres(x)
            loss, _, _ = cls_loss(net, evidence.float(), y, cfg.get("min_evidence"))
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = forward(x)
            loss = seg_loss(
                logits.float(), y, per_sample_nodule=lesion_balanced, nodule_weight=nodule_weight
            )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if averaged is not None:
            averaged.update_parameters(net)
        step += 1
        lv = float(loss.detach())
        running = 0.98 * running + 0.02 * lv if step > 1 else lv
        if step % log_every == 0:
            history.append({"step": step, "seconds": round(elapsed, 1), "loss": round(running, 4)})
            print(f"{name} step {step} t={elapsed:.0f}s lr={lr:.2e} loss={running:.4f}", flush=True)
    if averaged is not None:  # BatchNorm buffers are re-estimated below for these weights
        params = dict(averaged.module.named_parameters())
        with torch.no_grad():
            for pname, param in net.named_parameters():
                param.copy_(params[pname])
    # A step-capped run (the training smoke test) re-estimates on a token number of slices.
    recalibrate_batchnorm(net, sampler, BN_RECALIBRATION_SLICES if max_steps is None else 8)
    net = net.to(memory_format=torch.contiguous_format)
    seconds = time.time() - t0
    # Every 4th validation slice: enough to follow training, a quarter of the cost.
    val_sub = np.arange(0, len(val.x), 4)
    if name == "classifier":
        assert isinstance(net, NoduleClassifier)
        metrics = cls_val(net, val, val_sub)
        metrics["pointing_game_nodule_slices"] = cls_val_pointing(net, val, val_sub)
    else:
        metrics = seg_val_dice(net, val, val_sub)
    print(f"{name}: {step} steps in {seconds:.0f} s; validation {metrics}", flush=True)
    command = (
        f"python -m models.training.train {name} --minutes {cfg['minutes']:g} --lr {cfg['lr']:g}"
    )
    command += " --resume" if resume else f" --seed {seed}"
    command += " --lesion-balanced" if lesion_balanced else ""
    command += " --lesion-sampling" if lesion_sampling and not lesion_balanced else ""
    if not is_cls and nodule_weight != NODULE_CE_WEIGHT:
        command += f" --nodule-weight {nodule_weight:g}"
    command += f" --ema {ema:g}" if ema is not None else ""
    command += " --bf16" if bf16 else ""
    command += " --compile" if compile_forward else ""
    if not resume and cfg["base"] != DEFAULTS[name]["base"]:
        command += f" --base {cfg['base']}"
    if is_cls and cfg["evidence_stride"] != DEFAULTS["classifier"]["evidence_stride"]:
        command += f" --evidence-stride {cfg['evidence_stride']}"
    if is_cls and scale != 1:
        command += f" --input-scale {scale}"
    if is_cls and cfg.get("min_evidence"):
        command += f" --min-evidence {cfg['min_evidence']:g}"
    command += f" --out {out}" if out != CHECKPOINTS else ""
    command += f" --threads {threads}"
    session = {
        "command": command,
        "seed": seed,
        "steps": step,
        "seconds": round(seconds, 1),
        "validation": metrics,
    }
    sessions = [*_sessions(previous), session]
    log = {
        "model": name,
        "config": cfg,
        "seed": sessions[0]["seed"],
        "threads": threads,
        "steps": sum(int(s["steps"]) for s in sessions),
        "train_seconds": round(sum(float(s["seconds"]) for s in sessions), 1),
        "validation": metrics,
        "history": [*(previous.get("history", []) if previous else []), *history],
        "sessions": sessions,
        "data": {k: {kk: str(vv) for kk, vv in v.items()} for k, v in SPLITS.items()},
        "train_slices": len(data.x),
        "commands": [s["command"] for s in sessions],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": threads,
    }
    if is_cls:
        log["recipe"] = classifier_recipe(
            lesion_sampling, int(cfg["evidence_stride"]), cfg.get("min_evidence"), scale
        )
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": net.state_dict(),
            "optimizer": opt.state_dict(),
            "base": cfg["base"],
            "evidence_stride": cfg.get("evidence_stride"),
            "input_scale": scale,
            "in_channels": PREPROCESSING.channels,
            "log": log,
        },
        out / f"{name}.pt",
    )
    (out / f"{name}.json").write_text(json.dumps(log, indent=2))
    return log


def _sessions(log: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The training sessions recorded in a checkpoint log (older logs hold exactly one)."""
    if not log:
        return []
    if "sessions" in log:
        return list(log["sessions"])
    return [
        {
            "command": log.get("command", ""),
            "seed": log["seed"],
            "steps": log["steps"],
            "seconds": log["train_seconds"],
            "validation": log["validation"],
        }
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", choices=MODEL_NAMES)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock training budget")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="peak learning rate of the cycle")
    p.add_argument("--resume", action="store_true", help="continue the saved checkpoint")
    p.add_argument(
        "--lesion-balanced",
        action="store_true",
        help="segmenters: nodule crops per lesion, nodule Dice per sample (experimental)",
    )
    p.add_argument(
        "--lesion-sampling",
        action="store_true",
        help="nodule crops drawn per lesion (segmenters keep the pooled nodule Dice)",
    )
    p.add_argument(
        "--nodule-weight",
        type=float,
        default=NODULE_CE_WEIGHT,
        help="segmenters: cross-entropy weight of the nodule class",
    )
    p.add_argument(
        "--evidence-stride",
        type=int,
        choices=(2, 4),
        default=None,
        help="classifier: stride of the evidence (CAM) map",
    )
    p.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="save the exponential moving average of the weights (e.g. 0.999); experimental: "
        "it made the U-Net worse (models/README.md)",
    )
    p.add_argument(
        "--base", type=int, default=None, help="channel width of the first stage (network width)"
    )
    p.add_argument(
        "--min-evidence",
        type=float,
        default=None,
        help="classifier: least summed evidence target of a nodule slice; experimental: it did "
        "not help the small cross-sections (models/README.md)",
    )
    p.add_argument(
        "--input-scale",
        type=int,
        choices=(1, 2),
        default=None,
        help="classifier: 2 takes the source 512 × 512 slices (space-to-depth stem)",
    )
    p.add_argument(
        "--bf16",
        action="store_true",
        help="mixed precision: the forward pass in bfloat16 (torch.autocast); weights, "
        "optimiser, BatchNorm and loss stay float32",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="segmenters: torch.compile the forward pass (fused kernels, faster steps)",
    )
    p.add_argument("--out", type=Path, default=None, help="checkpoint folder")
    args = p.parse_args(argv)
    train(
        args.model,
        minutes=args.minutes,
        seed=args.seed,
        threads=args.threads,
        resume=args.resume,
        lr=args.lr,
        lesion_balanced=args.lesion_balanced,
        lesion_sampling=args.lesion_sampling,
        nodule_weight=args.nodule_weight,
        evidence_stride=args.evidence_stride,
        ema=args.ema,
        base=args.base,
        min_evidence=args.min_evidence,
        input_scale=args.input_scale,
        bf16=args.bf16,
        compile_forward=args.compile,
        out=args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
