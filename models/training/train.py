"""Train one of the three models on phantom slices: ``python -m models.training.train <model>``.

Seeded and CPU-only. Segmentation models (``unet``, ``segnet``) train on 128 × 128 crops of
the 256 × 256 network-input slices, half of them centred on a nodule (lesion-focused
sampling: nodules cover < 0.1 % of the pixels), with cross-entropy + soft Dice, then finish
on whole slices. The classifier trains on the same crops with a binary cross-entropy on the
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
from torch import nn

from models.training.classifier import NoduleClassifier
from models.training.data import CACHE_DIR, SPLITS, Split, load_split
from models.training.segnet import SegNet
from models.training.unet import UNet

MODEL_NAMES = ("unet", "segnet", "classifier")
CHECKPOINTS = CACHE_DIR / "checkpoints"

DEFAULTS: dict[str, dict[str, Any]] = {
    "unet": {"base": 12, "minutes": 25.0, "lr": 2e-3, "batch": 12, "crop": 96},
    "segnet": {"base": 12, "minutes": 25.0, "lr": 2e-3, "batch": 12, "crop": 96},
    "classifier": {"base": 12, "minutes": 25.0, "lr": 2e-3, "batch": 12, "crop": 96},
}
FINAL_FULL_FRACTION = 0.1  # share of the time budget spent on whole 256 × 256 slices
LOC_WEIGHT = 1.0  # classifier: weight of the localisation term
EVIDENCE_TARGET = 2.0  # classifier: logit contribution of one stride-4 nodule cell
LESION_CELL_WEIGHT = 20.0  # nodule cells are rare: up-weight them


def build_model(name: str, base: int) -> nn.Module:
    if name == "unet":
        return UNet(base=base)
    if name == "segnet":
        return SegNet(base=base)
    if name == "classifier":
        return NoduleClassifier(base=base)
    raise ValueError(f"unknown model {name!r}; choose from {MODEL_NAMES}")


class CropSampler:
    """Random (crop, label) batches from a split, half of them centred on nodule pixels."""

    def __init__(self, data: Split, rng: np.random.Generator, nodule_fraction: float = 0.5):
        self.data = data
        self.rng = rng
        self.nodule_fraction = nodule_fraction
        nod = np.argwhere(data.y == 2)  # (k, 3): slice, row, col
        self.nodule_pixels = nod
        self.n, self.h, self.w = data.x.shape

    def batch(self, size: int, crop: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs = np.empty((size, 1, crop, crop), np.float32)
        ys = np.empty((size, crop, crop), np.int64)
        for i in range(size):
            if len(self.nodule_pixels) and self.rng.random() < self.nodule_fraction:
                s, r, c = self.nodule_pixels[self.rng.integers(len(self.nodule_pixels))]
                r0 = int(np.clip(r - self.rng.integers(8, crop - 8), 0, self.h - crop))
                c0 = int(np.clip(c - self.rng.integers(8, crop - 8), 0, self.w - crop))
            else:
                s = self.rng.integers(self.n)
                r0 = int(self.rng.integers(0, self.h - crop + 1))
                c0 = int(self.rng.integers(0, self.w - crop + 1))
            x = self.data.x[s, r0 : r0 + crop, c0 : c0 + crop].astype(np.float32)
            y = self.data.y[s, r0 : r0 + crop, c0 : c0 + crop]
            if self.rng.random() < 0.5:  # left-right mirror: anatomy is nearly symmetric
                x, y = x[:, ::-1], y[:, ::-1]
            xs[i, 0] = x
            ys[i] = y
        return torch.from_numpy(xs), torch.from_numpy(ys)


def seg_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + soft Dice over the lung and nodule classes."""
    ce = F.cross_entropy(logits, target, weight=torch.tensor([1.0, 1.0, 2.0]))
    prob = logits.softmax(1)
    onehot = F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    inter = (prob * onehot).sum((0, 2, 3))
    denom = prob.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    dice = (2 * inter + 1.0) / (denom + 1.0)
    return ce + (1.0 - dice[1:]).mean()


def cls_loss(
    net: NoduleClassifier, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BCE on the pooled logit + a localisation term on the per-position evidence.

    The evidence map is ``cam_lowres / scale``: the logit is its sum plus the bias, so the
    same loss applies to crops of any size. Sum pooling alone spreads its gradient evenly over
    all positions and does not find a 3 mm nodule in 4,096 positions; the localisation term
    tells each stride-4 cell what its evidence should be — ``EVIDENCE_TARGET`` where the cell
    holds nodule pixels, 0 elsewhere (a ring around the nodule is left free) — so the map is
    zero away from nodules and the logit grows with the nodule's extent.
    """
    evidence = net.cam_lowres(x) / net.scale
    logit = evidence.sum((2, 3)) + net.bias
    nodule = (y == 2).float()[:, None]
    present = (nodule.flatten(1).sum(1) > 0).float()[:, None]
    cell = F.max_pool2d(nodule, kernel_size=4, stride=4)
    ring = F.max_pool2d(cell, kernel_size=3, stride=1, padding=1) - cell
    weight = (1.0 - ring) + (LESION_CELL_WEIGHT - 1.0) * cell
    err = (evidence - EVIDENCE_TARGET * cell) ** 2
    loc = (weight * err).sum((1, 2, 3)).mean()
    bce = F.binary_cross_entropy_with_logits(logit, present)
    return bce + LOC_WEIGHT * loc, logit, present


@torch.no_grad()
def seg_val_dice(net: nn.Module, data: Split, batch: int = 16) -> dict[str, float]:
    net.eval()
    inter = np.zeros(3)
    denom = np.zeros(3)
    for i in range(0, len(data.x), batch):
        x = torch.from_numpy(data.x[i : i + batch].astype(np.float32))[:, None]
        pred = net(x).argmax(1).numpy()
        y = data.y[i : i + batch]
        for k in (1, 2):
            inter[k] += np.sum((pred == k) & (y == k))
            denom[k] += np.sum(pred == k) + np.sum(y == k)
    net.train()
    return {
        "lung_dice": float(2 * inter[1] / denom[1]),
        "nodule_dice": float(2 * inter[2] / denom[2]),
    }


@torch.no_grad()
def cls_val(net: NoduleClassifier, data: Split, batch: int = 16) -> dict[str, float]:
    net.eval()
    logits = []
    for i in range(0, len(data.x), batch):
        x = torch.from_numpy(data.x[i : i + batch].astype(np.float32))[:, None]
        logits.append(net(x)[0][:, 0].numpy())
    net.train()
    score = np.concatenate(logits)
    label = (data.y == 2).any(axis=(1, 2))
    return {"auc": auc(score, label), "val_slices": len(score)}


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
) -> dict[str, Any]:
    """Train ``name`` within a wall-clock budget; save ``<out>/<name>.pt`` and a JSON log.

    With ``resume`` the checkpoint in ``out`` is trained further (a new cosine cycle from
    ``lr``); steps, time and commands of all sessions add up in the log.
    """
    out = out or CHECKPOINTS
    cfg = dict(DEFAULTS[name])
    if minutes is not None:
        cfg["minutes"] = minutes
    if lr is not None:
        cfg["lr"] = lr
    previous: dict[str, Any] | None = None
    net = build_model(name, cfg["base"])
    opt = torch.optim.AdamW(net.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    if resume:
        ckpt = torch.load(out / f"{name}.pt", map_location="cpu", weights_only=False)
        net.load_state_dict(ckpt["state_dict"])
        if "optimizer" in ckpt:
            opt.load_state_dict(ckpt["optimizer"])
        previous = ckpt["log"]
        seed = seed + len(_sessions(previous)) * 1000
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    rng = np.random.default_rng(seed)
    data = data if data is not None else load_split("train")
    val = val if val is not None else load_split("val")
    net.train()
    sampler = CropSampler(data, rng)
    budget = cfg["minutes"] * 60.0
    t0 = time.time()
    step = 0
    history: list[dict[str, float]] = []
    running = 0.0
    while True:
        elapsed = time.time() - t0
        if elapsed >= budget or (max_steps is not None and step >= max_steps):
            break
        frac = elapsed / budget
        if max_steps is not None:
            frac = max(frac, step / max_steps)
        # Cosine decay on wall-clock progress (the step count is not known in advance).
        lr = cfg["lr"] * (0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        full = frac > 1.0 - FINAL_FULL_FRACTION
        bsz = max(cfg["batch"] // 4, 2) if full else cfg["batch"]
        x, y = sampler.batch(bsz, data.x.shape[1] if full else cfg["crop"])
        if name == "classifier":
            assert isinstance(net, NoduleClassifier)
            loss, _, _ = cls_loss(net, x, y)
        else:
            loss = seg_loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        lv = float(loss.detach())
        running = 0.98 * running + 0.02 * lv if step > 1 else lv
        if step % log_every == 0:
            history.append({"step": step, "seconds": round(elapsed, 1), "loss": round(running, 4)})
            print(f"{name} step {step} t={elapsed:.0f}s lr={lr:.2e} loss={running:.4f}", flush=True)
    seconds = time.time() - t0
    # Every 4th validation slice: enough to follow training, a quarter of the cost.
    val_sub = Split(val.x[::4], val.y[::4], val.series[::4])
    if name == "classifier":
        assert isinstance(net, NoduleClassifier)
        metrics = cls_val(net, val_sub)
    else:
        metrics = seg_val_dice(net, val_sub)
    print(f"{name}: {step} steps in {seconds:.0f} s; validation {metrics}", flush=True)
    command = (
        f"python -m models.training.train {name} --minutes {cfg['minutes']:g} --lr {cfg['lr']:g}"
    )
    command += " --resume" if resume else f" --seed {seed}"
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
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": net.state_dict(),
            "optimizer": opt.state_dict(),
            "base": cfg["base"],
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
    args = p.parse_args(argv)
    train(
        args.model,
        minutes=args.minutes,
        seed=args.seed,
        threads=args.threads,
        resume=args.resume,
        lr=args.lr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
