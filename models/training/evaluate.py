"""Evaluate exported models on held-out phantoms, with bootstrap 95 % CIs.

    python -m models.training.evaluate unet segnet classifier [--series 64]

The ONNX files are run with onnxruntime exactly as the workers run them: each test series is
generated at 512 × 512 in HU (seeds disjoint from training and validation, see
``data.SPLITS["test"]``), preprocessed by ``workers.pipeline.preprocess.preprocess_frames``
with the model's manifest, and segmentations go through the workers' own post-processing
(``workers.pipeline.postprocess.segment``: argmax on the network grid, then the manifest's
component filters) and the nearest-neighbour resize to 512 × 512 of the served masks, so Dice
is that of what a user gets, against the original labels.

Segmentation: lung and nodule Dice (voxels pooled over the test set; the nodule Dice without
the component filter is reported beside it), per-lesion sensitivity at ≤ 1 false-positive
component per series by lesion diameter band (3-D connected components of the served nodule
mask, scored by their maximum nodule probability). ``fit_components`` chooses the component
filter on the validation split for ``export``. Classification:
slice AUC, sensitivity/specificity at the manifest threshold on calibrated probabilities,
expected calibration error (15 bins) after temperature scaling, series-level AUC with the
manifest's aggregation and sensitivity/specificity at its series threshold, and CAM localisation on true-positive slices. CIs: percentile
bootstrap over whole series (1,000 resamples). Metrics are written into the manifest (the
ONNX file and its sha256 are untouched) and the card, and the U-Net vs SegNet table in
``models/README.md`` is refreshed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import multiprocessing as mp
import pickle
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from app.registry.manifest import Manifest, Task
from app.registry.service import file_sha256, latest_versions, load_registry
from models.training.card import publish
from models.training.data import (
    CACHE_DIR,
    MODELS_DIR,
    PREPROCESSING,
    SPLITS,
    labels_to_grid,
    make_series,
    series_seed,
)
from models.training.phantoms import LABEL_LUNG, LABEL_NODULE
from workers.analysis import structure_rules
from workers.onnx_sessions import session_options
from workers.pipeline import postprocess
from workers.pipeline.postprocess import aggregate_series, calibrated_probabilities
from workers.pipeline.preprocess import preprocess_frames

SIZE_BANDS = [(3.0, 6.0), (6.0, 10.0), (10.0, 20.0), (20.0, 30.01)]
RESAMPLES = 1000


def release_dir(name: str, models_dir: Path = MODELS_DIR) -> Path:
    """The folder of ``name``'s newest release (the version the service serves by default),
    or of the version ``name`` names as ``model:version``."""
    if ":" in name:
        model = load_registry(models_dir).get(name)
        if model is None:
            raise SystemExit(f"{name}: not under {models_dir}")
        return model.folder
    model = latest_versions(load_registry(models_dir)).get(name)
    if model is None:
        raise SystemExit(f"{name}: no release under {models_dir}")
    return model.folder


def load_manifest(name: str, models_dir: Path = MODELS_DIR) -> tuple[Manifest, Path]:
    """The export of ``name`` (manifest and folder), once its ONNX file matches the manifest.

    Evaluating, or re-fitting thresholds on, a file other than the one the manifest describes
    would publish numbers for the wrong model: a sha256 mismatch stops the command.
    """
    directory = release_dir(name, models_dir)
    manifest = Manifest.model_validate_json((directory / "manifest.json").read_text())
    actual = file_sha256(directory / manifest.file)
    if actual != manifest.sha256:
        raise SystemExit(
            f"{name}: {manifest.file} has sha256 {actual[:12]}…, its manifest says "
            f"{manifest.sha256[:12]}…: export the model again"
        )
    return manifest, directory


def session(path: Path, threads: int) -> ort.InferenceSession:
    return ort.InferenceSession(
        str(path), session_options(threads), providers=["CPUExecutionProvider"]
    )


def run(
    sess: ort.InferenceSession, x: NDArray[np.float32], batch: int
) -> list[NDArray[np.float32]]:
    outs = [
        sess.run(None, {sess.get_inputs()[0].name: x[i : i + batch]})
        for i in range(0, len(x), batch)
    ]
    return [np.concatenate([o[k] for o in outs]) for k in range(len(outs[0]))]


# ---------------------------------------------------------------------------------------------
# Per-series records
# ---------------------------------------------------------------------------------------------


@dataclass
class SegSeries:
    """Counts and lesion-level records of one series, after the manifest's component filters."""

    counts: NDArray[np.float64]  # [lung inter, lung pred+gt, nodule inter, nodule pred+gt]
    lesion_diam: list[float]
    lesion_score: list[float]  # best score of a predicted component touching the lesion (0: none)
    fp_scores: list[float]
    counts_unfiltered: NDArray[np.float64] | None = None  # the same counts without the filters
    candidates: list[Candidate] = field(default_factory=list)  # every component, unfiltered


@dataclass(frozen=True)
class Candidate:
    """One predicted nodule component before filtering: what the filter fit looks at."""

    volume_mm3: float
    score: float
    lesions: tuple[int, ...]  # the lesions it touches, as indices into ``SegSeries.lesion_diam``
    voxels: int = 0  # its voxels in the 512 × 512 labels
    true_voxels: int = 0  # of which are nodule in the ground truth


@dataclass
class ClsSeries:
    logits: NDArray[np.float32]
    labels: NDArray[np.bool_]
    pointing: list[bool] = field(default_factory=list)
    energy_ratio: list[float] = field(default_factory=list)


def _dice_counts(pred: NDArray[np.uint8], labels: NDArray[np.uint8]) -> NDArray[np.float64]:
    counts = np.zeros(4)
    for j, k in enumerate((LABEL_LUNG, LABEL_NODULE)):
        p, t = pred == k, labels == k
        counts[2 * j] = np.count_nonzero(p & t)
        counts[2 * j + 1] = np.count_nonzero(p) + np.count_nonzero(t)
    return counts


def served_probabilities(
    manifest: Manifest, sess: ort.InferenceSession, x: NDArray[np.float32]
) -> NDArray[np.float32]:
    """A segmenter's class probabilities on the network grid, as the workers compute them:
    the softmax, or the mean over the manifest's test-time augmentation members
    (``workers.pipeline.postprocess.averaged_probabilities``)."""
    batch = manifest.preprocessing.batch_size
    return postprocess.averaged_probabilities(
        lambda b: run(sess, b, batch)[0], x, manifest.test_time_augmentation
    )


def seg_series(
    manifest: Manifest,
    probs: NDArray[np.float32],
    s: Any,
) -> SegSeries:
    """Score one series exactly as the workers would serve it.

    ``probs`` are the served class probabilities on the network grid
    (``served_probabilities``); then ``workers.pipeline.postprocess.segment`` (argmax → the
    manifest's component filters) and a nearest-neighbour resize to 512 × 512, the labels a
    SEG or mask PNG carries. Lesions are matched to the 3-D components of the served nodule
    mask; a component's score is its highest nodule probability.
    """
    size = s.labels.shape[1:]
    grid = probs.shape[-2:]
    voxel = (
        s.pixel_spacing[0]
        * s.pixel_spacing[1]
        * s.slice_thickness
        * (size[0] * size[1])
        / (grid[0] * grid[1])
    )
    rules = structure_rules(manifest)
    if not any(r.value == LABEL_NODULE for r in rules):
        # a rule that removes nothing, only to have the nodule components listed
        rules.append(postprocess.StructureRule(LABEL_NODULE, LABEL_LUNG, 0.0, 0.0))
    served = postprocess.segment(probs, rules, voxel_mm3=voxel)
    raw = served.components[LABEL_NODULE]  # every component, with the filter's verdict
    counts = _dice_counts(postprocess.resize_label_map(served.labels, size), s.labels)
    unfiltered = postprocess.labels_from_probabilities(probs, axis=1)
    counts_unfiltered = _dice_counts(postprocess.resize_label_map(unfiltered, size), s.labels)
    ids = postprocess.resize_nearest(raw.ids, size)
    kept = np.array([False] + [c.kept for c in raw.components])
    scores = np.array([0.0] + [c.max_probability for c in raw.components])
    hit_any = np.zeros(len(raw.components) + 1, bool)
    touched: dict[int, list[int]] = {}
    diam, lscore = [], []
    for les in s.lesions:
        if les.voxels == 0:
            continue  # fell between slices: nothing to detect
        touching = np.unique(ids[s.lesion_map == les.lesion_id])
        touching = touching[touching > 0]
        for c in touching:
            touched.setdefault(int(c), []).append(len(diam))
        served_touching = touching[kept[touching]]
        hit_any[served_touching] = True
        diam.append(les.diameter_mm)
        lscore.append(float(scores[served_touching].max()) if len(served_touching) else 0.0)
    fp = [float(scores[c]) for c in range(1, len(scores)) if kept[c] and not hit_any[c]]
    n = len(raw.components) + 1
    voxels = np.bincount(ids.ravel(), minlength=n)
    true_voxels = np.bincount(ids[s.labels == LABEL_NODULE], minlength=n)
    candidates = [
        Candidate(
            volume_mm3=float(c.volume_mm3 or 0.0),
            score=c.max_probability,
            lesions=tuple(touched.get(i + 1, ())),
            voxels=int(voxels[i + 1]),
            true_voxels=int(true_voxels[i + 1]),
        )
        for i, c in enumerate(raw.components)
    ]
    return SegSeries(counts, diam, lscore, fp, counts_unfiltered, candidates)


def on_grid(mask: NDArray[np.bool_], size: tuple[int, ...]) -> NDArray[np.bool_]:
    """A label-grid mask on a finer map grid (an integer multiple), nearest-neighbour as the
    served masks are resized (``postprocess.resize_nearest``)."""
    h, w = mask.shape
    if size[0] % h or size[1] % w:
        raise ValueError(f"map {tuple(size)} is not a multiple of the label grid {mask.shape}")
    fine: NDArray[np.bool_] = postprocess.resize_nearest(mask, (size[0], size[1]))
    return fine


def cam_localisation(cam: NDArray[np.float32], nodule: NDArray[np.bool_]) -> tuple[bool, float]:
    """Strict pointing game and (positive energy in lesion) / (lesion area fraction)."""
    hit = bool(nodule.flat[int(np.argmax(cam))])
    pos = np.clip(cam, 0, None)
    total = float(pos.sum())
    frac = float(nodule.mean())
    energy = float(pos[nodule].sum()) / total if total > 0 else 0.0
    return hit, energy / frac if frac > 0 else 0.0


# ---------------------------------------------------------------------------------------------
# Aggregate metrics with bootstrap CIs
# ---------------------------------------------------------------------------------------------


def _ci(values: list[float]) -> list[float] | None:
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)])
    if len(v) == 0:
        return None
    return [round(float(np.percentile(v, 2.5)), 4), round(float(np.percentile(v, 97.5)), 4)]


def _boot(n: int, rng: np.random.Generator) -> Iterator[NDArray[np.int64]]:
    for _ in range(RESAMPLES):
        yield rng.integers(0, n, n)


def froc_sensitivity(series: list[SegSeries], max_fp: float = 1.0) -> dict[str, Any]:
    """Per-lesion sensitivity by size band at the lowest score threshold with ≤ max_fp FP/series."""
    fps = np.sort(np.concatenate([np.asarray(s.fp_scores) for s in series]) if series else [])[::-1]
    allowed = math.floor(max_fp * len(series))
    # Threshold just above the (allowed+1)-th highest FP score; 0.5 is the argmax floor anyway.
    thr = float(fps[allowed]) + 1e-6 if len(fps) > allowed else 0.0
    diam = np.concatenate([np.asarray(s.lesion_diam) for s in series]) if series else np.zeros(0)
    score = np.concatenate([np.asarray(s.lesion_score) for s in series]) if series else np.zeros(0)
    det = score >= max(thr, 1e-9)
    out: dict[str, Any] = {
        "threshold": thr,
        "fp_per_series": float(np.sum(fps >= thr) / max(len(series), 1)),
    }
    for lo, hi in SIZE_BANDS:
        sel = (diam >= lo) & (diam < hi)
        out[f"{lo:g}-{min(hi, 30):g} mm"] = (
            int(sel.sum()),
            float(det[sel].mean()) if sel.any() else float("nan"),
        )
    sel = diam >= 6.0
    out[">=6 mm"] = (int(sel.sum()), float(det[sel].mean()) if sel.any() else float("nan"))
    sel = diam >= 0
    out["all"] = (int(sel.sum()), float(det[sel].mean()) if sel.any() else float("nan"))
    return out


FIT_VOLUMES_MM3 = (0.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 65.0)


def refilter(series: SegSeries, min_volume_mm3: float, min_score: float = 0.0) -> SegSeries:
    """``series`` as if its candidates had been filtered at ``min_volume_mm3`` and
    ``min_score``: lesion records, and nodule Dice counts (lung counts left as they were)."""
    kept = [c for c in series.candidates if c.volume_mm3 >= min_volume_mm3 and c.score >= min_score]
    score = [0.0] * len(series.lesion_diam)
    for c in kept:
        for j in c.lesions:
            score[j] = max(score[j], c.score)
    fp = [c.score for c in kept if not c.lesions]
    counts = series.counts_unfiltered if series.counts_unfiltered is not None else series.counts
    truth = counts[3] - sum(c.voxels for c in series.candidates)  # nodule voxels of the truth
    nodule = [sum(c.true_voxels for c in kept), sum(c.voxels for c in kept) + truth]
    return SegSeries(np.array([*counts[:2], *nodule]), series.lesion_diam, score, fp)


def fit_component_filter(series: list[SegSeries]) -> dict[str, Any]:
    """Choose the nodule component filter on validation series (never the test split).

    For each minimum volume in ``FIT_VOLUMES_MM3`` the per-lesion sensitivity for nodules of
    6 mm and more at ≤ 1 false-positive component per series is computed, and the minimum
    probability is that operating point's score threshold (so the served mask itself runs at
    ≤ 1 FP per series). The volume with the highest sensitivity wins; ties go to the higher
    sensitivity over all sizes, then to the higher nodule Dice of the filtered masks.
    The candidates must come from an unfiltered model (``SegSeries.candidates``).
    """
    table = []
    for volume in FIT_VOLUMES_MM3:
        froc = froc_sensitivity([refilter(s, volume) for s in series])
        # rounded down, never up: a floor of 0.99996 stored as 1.0 would drop components the
        # fit kept (a saturated network's scores sit that close to 1)
        threshold = math.floor(max(froc["threshold"], 0.5) * 1e6) / 1e6
        counts = np.sum([refilter(s, volume, threshold).counts for s in series], axis=0)
        table.append(
            {
                "min_volume_mm3": volume,
                "min_probability": threshold,
                "sensitivity_ge6mm": round(froc[">=6 mm"][1], 4),
                "sensitivity_all": round(froc["all"][1], 4),
                "fp_per_series": round(froc["fp_per_series"], 3),
                "nodule_dice": round(float(2 * counts[2] / max(counts[3], 1)), 4),
            }
        )
    best = max(
        table, key=lambda r: (r["sensitivity_ge6mm"], r["sensitivity_all"], r["nodule_dice"])
    )
    return {
        "min_volume_mm3": best["min_volume_mm3"],
        "min_probability": best["min_probability"],
        "fitted": {
            "split": "val",
            "series": len(series),
            "lesions_ge6mm": int(sum(np.sum(np.asarray(s.lesion_diam) >= 6.0) for s in series)),
            "criterion": "max per-lesion sensitivity >= 6 mm at <= 1 FP/series, then for all "
            "sizes, then nodule Dice of the filtered masks",
            "candidates": table,
        },
    }


def fit_components(manifest: Manifest, sess: ort.InferenceSession, n_series: int) -> dict[str, Any]:
    """Fit the nodule component filter of a segmentation export on the validation series."""
    bare = Manifest.model_validate({**manifest.model_dump(mode="json"), "components": []})
    records = []
    for i in range(n_series):
        s = make_series("val", i)
        x = preprocess_frames(s.hu.astype(np.float32), bare.preprocessing)
        records.append(seg_series(bare, served_probabilities(bare, sess, x), s))
    return fit_component_filter(records)


def seg_metrics(series: list[SegSeries], rng: np.random.Generator) -> dict[str, Any]:
    counts = np.stack([s.counts for s in series])

    def dice(idx: NDArray[np.int64]) -> tuple[float, float]:
        c = counts[idx].sum(0)
        return 2 * c[0] / c[1], 2 * c[2] / max(c[3], 1)

    lung, nod = dice(np.arange(len(series)))
    raw = np.stack([s.counts_unfiltered for s in series if s.counts_unfiltered is not None])
    nod_unfiltered = 2 * raw[:, 2].sum() / max(raw[:, 3].sum(), 1) if len(raw) else float("nan")
    boots = [dice(i) for i in _boot(len(series), rng)]
    froc = froc_sensitivity(series)
    froc_boot = [froc_sensitivity([series[j] for j in i]) for i in _boot(len(series), rng)]
    per_band = {
        band: {
            "lesions": froc[band][0],
            "value": round(froc[band][1], 4),
            "ci95": _ci([b[band][1] for b in froc_boot]),
        }
        for band in froc
        if band not in ("threshold", "fp_per_series")
    }
    return {
        "lung_dice": {"value": round(lung, 4), "ci95": _ci([b[0] for b in boots])},
        "nodule_dice": {"value": round(nod, 4), "ci95": _ci([b[1] for b in boots])},
        "nodule_dice_without_component_filter": round(float(nod_unfiltered), 4),
        "lesion_sensitivity_ge6mm_at_1fp": {
            "value": per_band[">=6 mm"]["value"],
            "ci95": per_band[">=6 mm"]["ci95"],
        },
        "lesion_sensitivity_all_at_1fp": {
            "value": per_band["all"]["value"],
            "ci95": per_band["all"]["ci95"],
        },
        "lesion_sensitivity_by_size": per_band,
        "froc_operating_point": {
            "component_score_threshold": round(froc["threshold"], 4),
            "fp_per_series": round(froc["fp_per_series"], 3),
        },
    }


def auc(score: NDArray[np.float64], label: NDArray[np.bool_]) -> float:
    from scipy.stats import rankdata

    n1, n0 = int(label.sum()), int((~label).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(score)
    return float((r[label].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def ece(prob: NDArray[np.float64], label: NDArray[np.bool_], bins: int = 15) -> float:
    """Expected calibration error with equal-width bins (Guo et al. 2017)."""
    idx = np.minimum((prob * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            total += sel.mean() * abs(prob[sel].mean() - label[sel].mean())
    return float(total)


def cls_metrics(
    series: list[ClsSeries], manifest: Manifest, rng: np.random.Generator
) -> dict[str, Any]:
    c = manifest.classification
    assert c is not None
    # the temperature fitted alone on the same validation data, for comparison (export)
    t_only = manifest.provenance.get("calibration", {}).get("temperature_only")

    def compute(idx: NDArray[np.int64]) -> dict[str, float]:
        z = np.concatenate([series[i].logits for i in idx]).astype(np.float64)
        y = np.concatenate([series[i].labels for i in idx])
        p = calibrated_probabilities(z, c.temperature, c.bias)
        pred = p >= c.threshold
        ps = np.array(
            [
                aggregate_series(
                    calibrated_probabilities(series[i].logits, c.temperature, c.bias),
                    c.series_aggregation,
                )
                for i in idx
            ]
        )
        ys = np.array([series[i].labels.any() for i in idx])
        return {
            "auc": auc(z, y),
            "sensitivity": float(pred[y].mean()) if y.any() else float("nan"),
            "specificity": float((~pred[~y]).mean()) if (~y).any() else float("nan"),
            "ece": ece(p, y),
            **(
                {"ece_temperature_only": ece(calibrated_probabilities(z, t_only), y)}
                if t_only
                else {}
            ),
            "ece_uncalibrated": ece(calibrated_probabilities(z, 1.0), y),
            "series_auc": auc(ps, ys),
            "series_sensitivity": float((ps[ys] >= c.series_operating_point).mean())
            if ys.any()
            else float("nan"),
            "series_specificity": float((ps[~ys] < c.series_operating_point).mean())
            if (~ys).any()
            else float("nan"),
        }

    point = compute(np.arange(len(series)))
    boots = [compute(i) for i in _boot(len(series), rng)]
    out: dict[str, Any] = {
        k: {"value": round(v, 4), "ci95": _ci([b[k] for b in boots])} for k, v in point.items()
    }
    pg = [h for s in series for h in s.pointing]
    er = [r for s in series for r in s.energy_ratio]
    out["cam_pointing_game_tp"] = {
        "value": round(float(np.mean(pg)), 4) if pg else None,
        "ci95": _ci([float(np.mean(rng.choice(pg, len(pg)))) for _ in range(RESAMPLES)])
        if pg
        else None,
        "slices": len(pg),
    }
    out["cam_energy_over_area_fraction_median"] = {
        "value": round(float(np.median(er)), 2) if er else None,
        "ci95": _ci([float(np.median(rng.choice(er, len(er)))) for _ in range(RESAMPLES)])
        if er
        else None,
    }
    out["slice_definition"] = (
        "a slice is positive when its nodule label covers at least one 256 x 256 network pixel "
        "(area majority of the 512 x 512 label)"
    )
    return out


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def _gen(index: int) -> tuple[int, Any]:
    """The ``index``-th test series, cached on disk so several evaluations share it."""
    path = CACHE_DIR / "test_series" / f"{series_seed('test', index)}.pkl"
    if path.exists():
        with path.open("rb") as f:
            return index, pickle.load(f)  # our own cache file, written below
    series = make_series("test", index)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("wb") as f:
        pickle.dump(series, f, protocol=pickle.HIGHEST_PROTOCOL)
    tmp.rename(path)
    return index, series


def prepare(n_series: int, workers: int) -> None:
    """Generate (and cache) the test series without evaluating anything."""
    with mp.get_context("spawn").Pool(workers) as pool:
        for i, _ in pool.imap_unordered(_gen, range(n_series)):
            print(f"test series {i} ready", flush=True)


def _record_path(manifest: Manifest, index: int) -> Path:
    """Per-series result cache, keyed by the model file's hash and by what else decides the
    served output (test-time augmentation, component filters): shards fill it in parallel."""
    served = json.dumps(
        [manifest.test_time_augmentation, [c.model_dump(mode="json") for c in manifest.components]],
        sort_keys=True,
    )
    name = f"{manifest.sha256[:16]}_{hashlib.sha256(served.encode()).hexdigest()[:8]}_{index}.pkl"
    return CACHE_DIR / "eval" / "records" / manifest.name / name


def _series_record(m: Manifest, sess: ort.InferenceSession, s: Any) -> SegSeries | ClsSeries:
    x = preprocess_frames(s.hu.astype(np.float32), m.preprocessing)
    if m.task is Task.SEGMENTATION:
        return seg_series(m, served_probabilities(m, sess, x), s)
    outs = run(sess, x, m.preprocessing.batch_size)
    # The slice label is defined on the 256 × 256 grid whatever the input size, so classifiers
    # of different input resolutions are scored against the same positives.
    grid = labels_to_grid(s.labels, PREPROCESSING.size) == LABEL_NODULE
    y = grid.any(axis=(1, 2))
    rec = ClsSeries(outs[0][:, 0], y)
    c = m.classification
    assert c is not None
    prob = calibrated_probabilities(outs[0][:, 0], c.temperature, c.bias)
    for k in np.nonzero(y & (prob >= c.threshold))[0]:
        hit, ratio = cam_localisation(outs[1][k, 0], on_grid(grid[k], outs[1].shape[-2:]))
        rec.pointing.append(hit)
        rec.energy_ratio.append(ratio)
    return rec


def evaluate(
    names: list[str],
    n_series: int,
    threads: int = 1,
    workers: int = 1,
    write: bool = True,
    shard: tuple[int, int] | None = None,
) -> dict[str, dict[str, Any]]:
    models = {n: load_manifest(n) for n in names}
    sessions = {n: session(d / m.file, threads) for n, (m, d) in models.items()}
    seg: dict[str, list[SegSeries]] = {n: [] for n in names}
    cls: dict[str, list[ClsSeries]] = {n: [] for n in names}
    t0 = time.time()
    slices = 0
    todo = [i for i in range(n_series) if shard is None or i % shard[1] == shard[0]]
    for i in todo:
        cached = {name: _record_path(m, i) for name, (m, _d) in models.items()}
        if all(p.exists() for p in cached.values()):
            recs = {name: pickle.loads(p.read_bytes()) for name, p in cached.items()}
            slices += recs[names[0]][0]
        else:
            _, s = _gen(i)
            slices += s.n_slices
            recs = {
                name: (s.n_slices, _series_record(m, sessions[name], s))
                for name, (m, _d) in models.items()
            }
            for name, p in cached.items():
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(pickle.dumps(recs[name]))
        for name, (m, _d) in models.items():
            rec = recs[name][1]
            (seg if m.task is Task.SEGMENTATION else cls)[name].append(rec)
        print(f"series {i + 1}/{n_series} done ({time.time() - t0:.0f} s)", flush=True)
    if shard is not None:
        return {}
    results = {}
    for name, (m, d) in models.items():
        rng = np.random.default_rng(12345)
        metrics = (
            seg_metrics(seg[name], rng)
            if m.task is Task.SEGMENTATION
            else cls_metrics(cls[name], m, rng)
        )
        metrics.update(
            {
                "test_series": n_series,
                "test_slices": slices,
                "test_seeds": f"{SPLITS['test']['seed']}..{int(SPLITS['test']['seed']) + n_series - 1}",  # type: ignore[call-overload]
                "bootstrap": {
                    "resamples": RESAMPLES,
                    "unit": "series",
                    "ci": "percentile 2.5-97.5",
                },
                "command": f"python -m models.training.evaluate {name} --series {n_series}",
                "seconds": round(time.time() - t0, 1),
            }
        )
        results[name] = metrics
        if write:
            publish(Manifest.model_validate({**m.model_dump(mode="json"), "metrics": metrics}), d)
        out = CACHE_DIR / "eval" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(metrics, indent=2))
        print(
            name,
            json.dumps(
                {k: v for k, v in metrics.items() if isinstance(v, dict) and "value" in v}, indent=1
            ),
        )
    return results


README_START = "<!-- comparison:start -->"
README_END = "<!-- comparison:end -->"


def _cell(m: dict[str, Any], key: str) -> str:
    v = m.get(key)
    if not isinstance(v, dict) or v.get("value") is None:
        return "–"
    ci = v.get("ci95")
    return f"{v['value']:.3f} ({ci[0]:.3f}–{ci[1]:.3f})" if ci else f"{v['value']:.3f}"


def comparison_table() -> str:
    """Markdown table U-Net vs SegNet from the shipped manifests."""
    rows = [
        "| model | lung Dice (95% CI) | nodule Dice (95% CI) | lesion sens. ≥ 6 mm @ ≤ 1 FP/series "
        "| parameters | GFLOP / slice | ORT latency, 1 thread (ms) | ONNX MiB | training |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    released = latest_versions(load_registry(MODELS_DIR))
    for name in ("unet", "segnet"):
        if name not in released:
            continue
        m = released[name].manifest
        p = m.provenance
        arch, tr = p.get("architecture", {}), p.get("training", {})
        rows.append(
            f"| {name} | {_cell(m.metrics, 'lung_dice')} | {_cell(m.metrics, 'nodule_dice')} | "
            f"{_cell(m.metrics, 'lesion_sensitivity_ge6mm_at_1fp')} | {arch.get('parameters', 0):,} | "
            f"{arch.get('gflops_per_slice')} | {p.get('latency_ms_1x256_1thread')} | "
            f"{p.get('export', {}).get('bytes', 0) / 2**20:.2f} | "
            f"{tr.get('steps')} steps, {float(tr.get('seconds') or 0) / 60:.0f} min |"
        )
    return "\n".join(rows)


def refresh_readme() -> None:
    readme = MODELS_DIR / "README.md"
    if not readme.exists():
        return
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        return
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_START}\n{comparison_table()}\n{README_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Evaluate exported models on held-out phantoms.")
    p.add_argument(
        "models",
        nargs="*",
        help="unet, segnet and/or classifier (newest release), or model:version",
    )
    p.add_argument("--prepare", action="store_true", help="only generate the test series")
    p.add_argument("--shard", default=None, help="K/N: only fill the cache for series i % N == K")
    p.add_argument("--series", type=int, default=int(SPLITS["test"]["series"]))  # type: ignore[call-overload]
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="processes generating test series")
    args = p.parse_args(argv)
    if args.prepare:
        prepare(args.series, args.workers)
        return 0
    unknown = {m for m in args.models if m.split(":")[0] not in ("unet", "segnet", "classifier")}
    if unknown or not args.models:
        p.error(
            "name one or more of unet, segnet, classifier, or a version of one as "
            f"model:version (got {sorted(unknown)})"
        )
    if args.shard:
        k, n = (int(v) for v in args.shard.split("/"))
        evaluate(args.models, args.series, args.threads, args.workers, shard=(k, n))
        return 0
    evaluate(args.models, args.series, args.threads, args.workers)
    refresh_readme()
    return 0


if __name__ == "__main__":
    sys.exit(main())
