"""Datasets for training and evaluation: phantom series through the serving preprocessing.

Slices are generated at 512 × 512 in HU by ``phantoms.generate_series`` and turned into
network inputs by ``workers.pipeline.preprocess.preprocess_frames`` with the same
``Preprocessing`` section the manifests carry, so training, evaluation and serving see the
same numbers. Prepared splits are cached as ``.npz`` under ``models/.cache/data`` (git-ignored).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from app.registry.manifest import Preprocessing, Window
from models.training.phantoms import LABEL_LUNG, LABEL_NODULE, PhantomSeries, generate_series
from workers.pipeline.preprocess import preprocess_frames

MODELS_DIR = Path(__file__).resolve().parents[1]
CACHE_DIR = MODELS_DIR / ".cache"

# Lung window wide enough to keep ground glass (−700…−400 HU) and solid nodules apart
# from the parenchyma (−850 HU) and from air (−1000 HU); bone saturates, which is harmless.
# Two neighbouring slices on each side are input channels (2.5-D): in one slice a small
# nodule and a vessel running through the plane are the same bright disc; across 5 slices
# the vessel continues (and drifts) while the nodule ends.
PREPROCESSING = Preprocessing(
    modalities=["CT"],
    window=Window(center=-400.0, width=1600.0),
    size=(256, 256),
    resample="area",
    mean=0.0,
    std=1.0,
    batch_size=8,
    context_slices=2,
)
# The cached splits hold single slices; the context is stacked when batches are drawn.
SLICE_PREPROCESSING = PREPROCESSING.model_copy(update={"context_slices": 0})


def preprocessing_at(input_scale: int = 1) -> Preprocessing:
    """``PREPROCESSING`` for a network whose input is ``input_scale`` × the label grid.

    ``input_scale`` 2 is the source resolution of the phantoms (512 × 512): the network
    takes the slice without the 2 × 2 area average, while its labels and evidence map stay
    on the 256 × 256 grid (see ``classifier.NoduleClassifier``).
    """
    if input_scale == 1:
        return PREPROCESSING
    if input_scale != 2:
        raise ValueError(f"input_scale must be 1 or 2, not {input_scale}")
    h, w = PREPROCESSING.size
    return PREPROCESSING.model_copy(update={"size": (h * input_scale, w * input_scale)})


# Seeds of the splits: disjoint ranges, so no series is in two splits.
SPLITS: dict[str, dict[str, int | tuple[int, int] | None]] = {
    "train": {"seed": 100_000, "series": 160, "slices": 32, "nodules": (1, 4)},
    "val": {"seed": 200_000, "series": 48, "slices": 32, "nodules": None},
    "test": {"seed": 900_000, "series": 64, "slices": 32, "nodules": None},
}


def labels_to_grid(labels: NDArray[np.uint8], size: tuple[int, int]) -> NDArray[np.uint8]:
    """Down-sample a (Z, H, W) label volume to the network grid by area majority.

    A target pixel is nodule when at least half of its source area is nodule, else lung
    when at least half is lung or nodule, else background — the label a radiologist would
    give the coarser pixel, without growing or eroding small nodules.
    """
    z, h, w = labels.shape
    th, tw = size
    if (h, w) == (th, tw):
        return labels.copy()
    if h % th or w % tw:
        raise ValueError(f"label grid {h}x{w} is not an integer multiple of {th}x{tw}")
    fy, fx = h // th, w // tw
    nod = (labels == LABEL_NODULE).reshape(z, th, fy, tw, fx).mean(axis=(2, 4))
    fg = (labels >= LABEL_LUNG).reshape(z, th, fy, tw, fx).mean(axis=(2, 4))
    out = np.zeros((z, th, tw), np.uint8)
    out[fg >= 0.5] = LABEL_LUNG
    out[nod >= 0.5] = LABEL_NODULE
    return out


def series_seed(split: str, index: int) -> int:
    base = SPLITS[split]["seed"]
    assert isinstance(base, int)
    return base + index


def make_series(split: str, index: int) -> PhantomSeries:
    """The ``index``-th series of a split (deterministic)."""
    cfg = SPLITS[split]
    seed = series_seed(split, index)
    rng = np.random.default_rng(seed)
    nod = cfg["nodules"]
    n_nodules = int(rng.integers(nod[0], nod[1] + 1)) if isinstance(nod, tuple) else None
    n_slices = cfg["slices"]
    assert isinstance(n_slices, int)
    return generate_series(seed, n_slices=n_slices, n_nodules=n_nodules)


def _prepare_one(args: tuple[str, int, int]) -> dict[str, NDArray[np.generic]]:
    split, index, input_scale = args
    s = make_series(split, index)
    pre = preprocessing_at(input_scale).model_copy(update={"context_slices": 0})
    x = preprocess_frames(s.hu.astype(np.float32), pre)[:, 0]
    y = labels_to_grid(s.labels, PREPROCESSING.size)
    return {"x": x.astype(np.float16), "y": y}


@dataclass
class Split:
    """Preprocessed slices of a split: ``x`` float16 (S, 256, 256), ``y`` uint8, ``series`` int.

    ``x`` may be on a finer grid than ``y`` (``load_split(input_scale=2)``: 512 × 512 inputs,
    256 × 256 labels); ``input_scale`` is the ratio.
    """

    x: NDArray[np.float16]
    y: NDArray[np.uint8]
    series: NDArray[np.int32]
    _context: dict[int, NDArray[np.int64]] = field(default_factory=dict, repr=False)

    def context(self, k: int) -> NDArray[np.int64]:
        """``context_index(self.series, k)``, built once per split and context width."""
        if k not in self._context:
            self._context[k] = context_index(self.series, k)
        return self._context[k]

    @property
    def input_scale(self) -> int:
        """How many input pixels per label pixel along each axis (1 or 2)."""
        return int(self.x.shape[-1] // self.y.shape[-1])


def context_index(series: NDArray[np.int32], context: int) -> NDArray[np.int64]:
    """Row indices of each slice's neighbours within its own series, shape (S, 2k + 1).

    Slices of one series are stored contiguously and in acquisition order; neighbours past
    either end of a series repeat the end slice, exactly as ``preprocess.stack_context``.
    """
    n = len(series)
    rows = np.arange(n)
    starts = np.zeros(n, np.int64)
    ends = np.zeros(n, np.int64)
    for s in np.unique(series):
        where = np.nonzero(series == s)[0]
        starts[where], ends[where] = where[0], where[-1]
    offsets = np.arange(-context, context + 1)
    return np.clip(rows[:, None] + offsets[None, :], starts[:, None], ends[:, None])


def network_inputs(
    data: Split, rows: NDArray[np.integer] | slice, context: int = PREPROCESSING.context_slices
) -> NDArray[np.float32]:
    """Float32 network inputs (n, 2k + 1, H, W) of the slices ``rows`` of a split."""
    index = data.context(context)[rows]
    return np.ascontiguousarray(data.x[index], dtype=np.float32)


def load_split(split: str, *, workers: int = 2, log: bool = True, input_scale: int = 1) -> Split:
    """Build (or load from the cache) the preprocessed slices of a split.

    With ``input_scale`` 2 the inputs keep the source 512 × 512 grid (``preprocessing_at``);
    the labels are on the 256 × 256 grid either way.
    """
    preprocessing_at(input_scale)  # validates
    cfg = SPLITS[split]
    n = cfg["series"]
    assert isinstance(n, int)
    grid = "" if input_scale == 1 else f"_x{input_scale}"
    path = CACHE_DIR / "data" / f"{split}_{cfg['seed']}_{n}{grid}.npz"
    if path.exists():
        with np.load(path) as z:
            return Split(z["x"], z["y"], z["series"])
    t0 = time.time()
    jobs = [(split, i, input_scale) for i in range(n)]
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            parts = pool.map(_prepare_one, jobs, chunksize=1)
    else:
        parts = [_prepare_one(j) for j in jobs]
    x = np.concatenate([p["x"] for p in parts])
    y = np.concatenate([p["y"] for p in parts])
    series = np.concatenate([np.full(len(p["x"]), i, np.int32) for i, p in enumerate(parts)])
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, y=y, series=series)
    meta = {"split": split, "config": str(cfg), "slices": len(x), "seconds": time.time() - t0}
    path.with_suffix(".json").write_text(json.dumps(meta, indent=2))
    if log:
        print(f"prepared {split}: {len(x)} slices from {n} series in {time.time() - t0:.0f} s")
    return Split(x, y, series)
