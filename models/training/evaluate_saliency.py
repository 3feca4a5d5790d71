"""Measure how faithful medcad's saliency and uncertainty maps are, on held-out phantoms.

    python -m models.training.evaluate_saliency [--models-dir models] [--budget-seconds 540]

Every model version found under ``<models-dir>/<name>/<version>/manifest.json`` is run with
onnxruntime alone (as the workers run it) on slices of held-out phantom series (the ``test``
split of ``models.training.data``: seeds disjoint from training and validation), preprocessed
by ``workers.pipeline.preprocess.preprocess_frames`` with the model's own manifest. The maps
are the ones the workers serve (``workers.pipeline.saliency``):

* classifiers: the in-graph CAM, occlusion and RISE (the manifest's parameters and budget);
* segmenters: softmax entropy, flip-TTA standard deviation and occlusion of the predicted
  nodule's mean logit;
* every model: a difference-of-Gaussians blob detector on the same slices (model-free
  baseline a real explanation must beat) and a random ordering (deletion/insertion floor).

Metrics, each with a percentile-bootstrap 95 % CI over slices: pointing game (strict, and
within one lesion radius) on true-positive slices; energy of the positive map inside the
lesion vs the lesion's area fraction; deletion/insertion AUC vs a random ordering; the
cascading model-randomisation test (Adebayo et al. 2018: ONNX weight initializers re-drawn
from the head backwards with the ``onnx`` package, Spearman rank correlation of the maps of
the trained and the randomised model); cost per image; for uncertainty maps the ROC AUC for
flagging the pixels the segmentation got wrong. Results go to ``models/saliency_metrics.json``
and a markdown summary is printed. Perturbation methods are subsampled so that the whole run
keeps to ``--budget-seconds``; the JSON records how many slices each number rests on.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import numpy_helper
from scipy import ndimage

from app.registry.manifest import Manifest, OutputRole, Preprocessing, Task
from models.training.data import SPLITS, labels_to_grid
from models.training.phantoms import LABEL_LUNG, LABEL_NODULE, generate_series
from workers.pipeline import saliency as S
from workers.pipeline.preprocess import preprocess_frames

MODELS_DIR = Path(__file__).resolve().parents[1]
TARGETS = {
    "cam_pointing_game_tp": 0.90,
    "energy_over_area_fraction": 10.0,
    "randomisation_abs_spearman": 0.30,
    "cam_cost_fraction": 0.05,
    "uncertainty_error_auc": 0.90,
}
_LAYER_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
# The randomisation target is judged after re-drawing the head and the layer feeding it
# (Adebayo et al.'s "head + last block"); randomising everything would be too lenient.
TARGET_STAGE_LAYERS = 2
_HIST_BINS = 2048

Array = NDArray[Any]


# --------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------
def bootstrap_ci(
    n: int, statistic: Callable[[Array], float], *, n_boot: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap 95 % CI of ``statistic(indices)`` resampling ``n`` units."""
    if n == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    values = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)], dtype=float)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (math.nan, math.nan)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return (float(lo), float(hi))


def summarise(values: Sequence[float] | Array, *, n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean with bootstrap CI of a per-slice quantity."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        return {"mean": None, "ci95": None, "n": 0}
    lo, hi = bootstrap_ci(v.size, lambda i: float(v[i].mean()), n_boot=n_boot, seed=seed)
    return {"mean": _r(float(v.mean())), "ci95": [_r(lo), _r(hi)], "n": int(v.size)}


def _r(x: float | None, digits: int = 4) -> float | None:
    if x is None or not math.isfinite(x):
        return None
    return round(float(x), digits)


def hist_auc(pos_hist: Array, neg_hist: Array) -> float:
    """ROC AUC from score histograms of positives and negatives (ties within a bin = 1/2)."""
    n_pos, n_neg = float(pos_hist.sum()), float(neg_hist.sum())
    if n_pos == 0 or n_neg == 0:
        return math.nan
    neg_below = np.cumsum(neg_hist) - neg_hist
    wins = float((pos_hist * (neg_below + 0.5 * neg_hist)).sum())
    return wins / (n_pos * n_neg)


# --------------------------------------------------------------------------------------------
# ONNX models and cascading randomisation
# --------------------------------------------------------------------------------------------
class OnnxModel:
    """An onnxruntime session with the manifest's tensor names and batch size."""

    def __init__(self, manifest: Manifest, model: bytes, threads: int) -> None:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        self.input = manifest.inputs[0].name
        self.batch = manifest.preprocessing.batch_size

    def run(self, x: Array, names: list[str]) -> list[Array]:
        parts: list[list[Array]] = [[] for _ in names]
        for start in range(0, len(x), self.batch):
            chunk = np.ascontiguousarray(x[start : start + self.batch], dtype=np.float32)
            for part, out in zip(parts, self.session.run(names, {self.input: chunk}), strict=True):
                part.append(np.asarray(out))
        return [np.concatenate(p) for p in parts]


def cascade_layers(model: onnx.ModelProto) -> list[tuple[str, list[str]]]:
    """Learned layers from the output backwards: (node name, its weight/bias initializers).

    ONNX graphs are topologically sorted, so walking the nodes in reverse visits the head
    first (for a U-Net the decoder before the encoder), the order of Adebayo et al.'s
    cascading randomisation.
    """
    initializers = {init.name for init in model.graph.initializer}
    layers = []
    for node in reversed(model.graph.node):
        if node.op_type in _LAYER_OPS:
            params = [name for name in node.input[1:] if name in initializers]
            if params:
                layers.append((node.name or params[0], params))
    return layers


def cascade_stages(n_layers: int) -> list[int]:
    """How many layers (from the head) each randomisation stage re-draws."""
    counts = {1, TARGET_STAGE_LAYERS, math.ceil(n_layers / 4), math.ceil(n_layers / 2), n_layers}
    return sorted(c for c in counts if 1 <= c <= n_layers)


def randomised_model(
    model: onnx.ModelProto, layers: list[tuple[str, list[str]]], n_layers: int, seed: int
) -> bytes:
    """The model with the first ``n_layers`` layers' initializers re-drawn from N(0, std).

    Each tensor keeps its own standard deviation (so activations keep their scale) and gets
    a seed derived from its name's position, so stage k+1 re-uses stage k's random weights.
    """
    chosen = {name for _, params in layers[:n_layers] for name in params}
    order = {name: i for i, (_, params) in enumerate(layers) for name in params}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for init in out.graph.initializer:
        if init.name not in chosen:
            continue
        w = numpy_helper.to_array(init)
        std = float(w.std()) if w.size > 1 else float(np.abs(w).mean())
        rng = np.random.default_rng([seed, order[init.name]])
        new = rng.normal(0.0, std or 0.01, size=w.shape).astype(w.dtype)
        init.CopyFrom(numpy_helper.from_array(new, init.name))
    return out.SerializeToString()


def logit_only_model(model: onnx.ModelProto, input_name: str, logit_name: str) -> bytes:
    """The sub-graph that computes the logit alone (no CAM), to time what the CAM costs."""
    sub = onnx.utils.Extractor(model).extract_model([input_name], [logit_name])
    return sub.SerializeToString()


# --------------------------------------------------------------------------------------------
# held-out data
# --------------------------------------------------------------------------------------------
@dataclass
class HeldOut:
    """Held-out phantom series in HU with labels, at the source geometry."""

    hu: list[Array]
    labels: list[Array]
    seeds: list[int]


def _generate(args: tuple[int, int, int]) -> tuple[Array, Array]:
    seed, n_slices, image_size = args
    s = generate_series(seed, n_slices=n_slices, image_size=image_size)
    return s.hu, s.labels


def load_heldout(n_series: int, n_slices: int, image_size: int, workers: int) -> HeldOut:
    """The first ``n_series`` series of the ``test`` split (same seeds as ``data.make_series``)."""
    base = SPLITS["test"]["seed"]
    assert isinstance(base, int)
    jobs = [(base + i, n_slices, image_size) for i in range(n_series)]
    if workers > 1 and n_series > 1:
        with mp.get_context("spawn").Pool(min(workers, n_series)) as pool:
            parts = pool.map(_generate, jobs, chunksize=1)
    else:
        parts = [_generate(j) for j in jobs]
    return HeldOut([p[0] for p in parts], [p[1] for p in parts], [j[0] for j in jobs])


@dataclass
class Slices:
    """Network inputs of selected slices with ground truth on the network grid."""

    x: Array  # (S, 1, h, w) float32
    labels: Array  # (S, h, w) uint8
    positive: Array  # (S,) bool: at least ``min_lesion_px`` nodule pixels
    ids: list[tuple[int, int]]  # (series seed, slice index)

    def lesion(self, i: int) -> Array:
        out: Array = self.labels[i] == LABEL_NODULE
        return out


def select_slices(
    data: HeldOut, spec: Preprocessing, *, min_lesion_px: int, max_negatives: int, seed: int
) -> tuple[Slices, dict[str, int]]:
    """All positive slices and a seeded sample of negatives, preprocessed for one model."""
    xs, ys, ids = [], [], []
    for hu, labels, series_seed in zip(data.hu, data.labels, data.seeds, strict=True):
        xs.append(preprocess_frames(hu.astype(np.float32), spec))
        ys.append(labels_to_grid(labels, spec.size))
        ids.extend((series_seed, k) for k in range(len(hu)))
    x, y = np.concatenate(xs), np.concatenate(ys)
    lesion_px = (y == LABEL_NODULE).sum(axis=(1, 2))
    pos = np.flatnonzero(lesion_px >= min_lesion_px)
    neg = np.flatnonzero(lesion_px == 0)
    rng = np.random.default_rng(seed)
    neg = np.sort(rng.permutation(neg)[:max_negatives])
    keep = np.concatenate([pos, neg])
    counts = {
        "slices_total": len(x),
        "positive_slices": len(pos),
        "negative_slices_used": len(neg),
        "slices_with_tiny_lesions_excluded": int(
            ((lesion_px > 0) & (lesion_px < min_lesion_px)).sum()
        ),
    }
    sl = Slices(x[keep], y[keep], lesion_px[keep] >= min_lesion_px, [ids[i] for i in keep])
    return sl, counts


# --------------------------------------------------------------------------------------------
# per-map metrics
# --------------------------------------------------------------------------------------------
def hit_within_radius(m: Array, lesion: Array) -> bool:
    """Pointing game with a tolerance of one lesion radius (each lesion its own radius).

    The radius of a lesion is that of the disc with the area of its connected component on
    the slice, so small and large nodules get proportionate tolerance.
    """
    if m.max() == m.min() or not lesion.any():
        return False
    y, x = S.pointing_location(m)
    components, n = ndimage.label(lesion)
    for c in range(1, n + 1):
        py, px = np.nonzero(components == c)
        radius = math.sqrt(py.size / math.pi)
        if float(np.min((py - y) ** 2 + (px - x) ** 2)) <= radius**2:
            return True
    return False


def map_metrics(m: Array, lesion: Array) -> dict[str, float]:
    return {
        "hit": float(S.pointing_game(m, lesion)),
        "hit_radius": float(hit_within_radius(m, lesion)),
        "energy": S.energy_in_region(m, lesion),
        "area_fraction": float(lesion.mean()),
    }


def summarise_maps(
    rows: list[dict[str, float]], *, n_boot: int, baseline: list[dict[str, float]] | None = None
) -> dict[str, Any]:
    """Pointing game / energy summary; with ``baseline`` rows (same slices), paired margins."""
    if not rows:
        return {"n": 0}
    hit = np.array([r["hit"] for r in rows])
    hit_r = np.array([r["hit_radius"] for r in rows])
    energy = np.array([r["energy"] for r in rows])
    area = np.array([r["area_fraction"] for r in rows])
    ratio = _r(float(energy.mean() / area.mean())) if area.mean() > 0 else None
    ratio_ci = bootstrap_ci(
        len(rows), lambda i: float(energy[i].mean() / area[i].mean()), n_boot=n_boot, seed=1
    )
    out: dict[str, Any] = {
        "n": len(rows),
        "pointing_game": summarise(hit, n_boot=n_boot),
        "pointing_game_lesion_radius": summarise(hit_r, n_boot=n_boot),
        "energy_in_lesion": summarise(energy, n_boot=n_boot),
        "lesion_area_fraction": summarise(area, n_boot=n_boot),
        "energy_over_area_fraction": {"value": ratio, "ci95": [_r(v) for v in ratio_ci]},
    }
    if baseline is not None and len(baseline) == len(rows):
        b_hit = np.array([r["hit"] for r in baseline])
        b_energy = np.array([r["energy"] for r in baseline])
        out["margin_over_dog"] = {
            "pointing_game": summarise(hit - b_hit, n_boot=n_boot, seed=2),
            "energy_in_lesion": summarise(energy - b_energy, n_boot=n_boot, seed=3),
        }
    return out


def summarise_delins(
    rows: list[tuple[S.DeletionInsertion, S.DeletionInsertion]], n_boot: int
) -> dict[str, Any]:
    """Deletion/insertion of a map and of a random ordering of the same slices."""
    if not rows:
        return {"n": 0}
    d = np.array([a.deletion_auc for a, _ in rows])
    i = np.array([a.insertion_auc for a, _ in rows])
    rd = np.array([b.deletion_auc for _, b in rows])
    ri = np.array([b.insertion_auc for _, b in rows])
    return {
        "n": len(rows),
        "deletion_auc": summarise(d, n_boot=n_boot),
        "insertion_auc": summarise(i, n_boot=n_boot),
        "random_deletion_auc": summarise(rd, n_boot=n_boot),
        "random_insertion_auc": summarise(ri, n_boot=n_boot),
        "deletion_gain_over_random": summarise(rd - d, n_boot=n_boot, seed=4),
        "insertion_gain_over_random": summarise(i - ri, n_boot=n_boot, seed=5),
        "forward_passes_per_curve_pair": rows[0][0].forward_passes,
    }


class Clock:
    """Wall-clock budget shared by the sections of a run."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())


def run_capped(
    items: Sequence[Any], fn: Callable[[Any], Any], seconds: float, min_items: int = 2
) -> tuple[list[Any], bool]:
    """Apply ``fn`` to items in order until the next one would overrun ``seconds``."""
    out: list[Any] = []
    t0 = time.monotonic()
    for item in items:
        elapsed = time.monotonic() - t0
        per_item = elapsed / len(out) if out else 0.0
        if len(out) >= min_items and elapsed + per_item > seconds:
            return out, True
        out.append(fn(item))
    return out, False


def _spearman_rows(original: list[Array], randomised: list[Array]) -> dict[str, Any]:
    signed = [S.spearman_rank(a, b) for a, b in zip(original, randomised, strict=True)]
    absolute = [
        S.spearman_rank(np.abs(a), np.abs(b)) for a, b in zip(original, randomised, strict=True)
    ]
    return {"signed": signed, "abs": absolute}


def _summarise_spearman(values: list[float], n_boot: int) -> dict[str, Any]:
    """Mean rank correlation; a map that became constant (NaN) shares no ranks: counted as 0."""
    constant = sum(1 for v in values if not math.isfinite(v))
    cleaned = [v if math.isfinite(v) else 0.0 for v in values]
    return summarise(cleaned, n_boot=n_boot) | {"n_constant_maps": constant}


def perturbation_stages(stages: list[int]) -> set[int]:
    """Stages at which the costly perturbation maps are recomputed: the target one and all."""
    return {min(TARGET_STAGE_LAYERS, stages[-1]), stages[-1]}


def target_stage(res: dict[str, Any]) -> dict[str, Any]:
    """The randomisation stage the target is judged on (see ``TARGET_STAGE_LAYERS``)."""
    stages = res.get("randomisation", {}).get("stages") or [{}]
    n = min(TARGET_STAGE_LAYERS, stages[-1].get("layers_randomised", 1))
    return next((st for st in stages if st.get("layers_randomised") == n), stages[-1])


# --------------------------------------------------------------------------------------------
# classifier
# --------------------------------------------------------------------------------------------
def _sigmoid(z: Array) -> Array:
    out: Array = 1.0 / (1.0 + np.exp(-z))
    return out


def _channel_of(manifest: Manifest, label_name: str, n_channels: int) -> int:
    if n_channels == 1:
        return 0
    values = sorted(label.value for label in manifest.labels)
    label = next(lab for lab in manifest.labels if lab.name == label_name)
    return values.index(label.value) if n_channels == len(values) else label.value


def _time_per_image(model: OnnxModel, x: Array, names: list[str], reps: int) -> float:
    times = []
    for k in range(reps):
        xi = x[k % len(x)][None]
        t0 = time.perf_counter()
        model.session.run(names, {model.input: xi})
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def evaluate_classifier(
    manifest: Manifest, path: Path, sl: Slices, args: argparse.Namespace, seconds: float
) -> dict[str, Any]:
    clock = Clock(seconds)
    nb = args.bootstrap
    proto = onnx.load(str(path))
    full = OnnxModel(manifest, proto.SerializeToString(), args.threads)
    logit_spec, cam_spec = manifest.output(OutputRole.LOGITS), manifest.output(OutputRole.CAM)
    assert logit_spec is not None and manifest.classification is not None
    plain = OnnxModel(manifest, logit_only_model(proto, full.input, logit_spec.name), args.threads)
    cls = manifest.classification
    names = [logit_spec.name] + ([cam_spec.name] if cam_spec else [])
    outs = full.run(sl.x, names)
    ch = _channel_of(manifest, cls.positive_label, outs[0].shape[1])
    logit = outs[0][:, ch].astype(np.float64)
    prob = _sigmoid(logit / cls.temperature)
    predicted = prob >= cls.threshold
    result: dict[str, Any] = {
        "task": "classification",
        "quality": {
            "slice_auc": _r(S.roc_auc(prob, sl.positive)),
            "sensitivity": _r(float(predicted[sl.positive].mean())) if sl.positive.any() else None,
            "specificity": _r(float((~predicted[~sl.positive]).mean()))
            if (~sl.positive).any()
            else None,
            "positives": int(sl.positive.sum()),
            "negatives": int((~sl.positive).sum()),
        },
    }
    tp = np.flatnonzero(sl.positive & predicted)
    result["quality"]["true_positive_slices"] = len(tp)
    rng = np.random.default_rng(args.seed)
    subset = rng.permutation(tp)
    spec = manifest.saliency

    def predict_logit(batch: Array) -> Array:
        out: Array = plain.run(batch, [logit_spec.name])[0][:, ch]
        return out

    def predict_prob(batch: Array) -> Array:
        out: Array = _sigmoid(predict_logit(batch).astype(np.float64) / cls.temperature)
        return out.astype(np.float32)

    # Cost: the CAM comes out of the same pass; compare with the logit-only sub-graph.
    reps = max(10, args.timing_reps)
    t_full = _time_per_image(full, sl.x, names, reps)
    t_plain = _time_per_image(plain, sl.x, [logit_spec.name], reps)
    result["cost"] = {
        "forward_seconds_per_image_logit_only": _r(t_plain, 5),
        "forward_seconds_per_image_with_cam": _r(t_full, 5),
        "cam_cost_fraction": _r((t_full - t_plain) / t_plain) if cam_spec else None,
    }

    maps: dict[str, dict[int, Array]] = {"dog": {}, "cam": {}, "occlusion": {}, "rise": {}}
    cost: dict[str, dict[str, float]] = {}
    for i in tp:
        maps["dog"][i] = S.dog_blob_map(sl.x[i], tuple(args.dog_sigmas))
        if cam_spec:
            maps["cam"][i] = S.cam_map(
                outs[1][i], class_index=min(ch, outs[1].shape[1] - 1), output_shape=sl.x.shape[2:]
            )
    cost["cam"] = {"forward_passes": 1, "seconds_per_image": t_full}
    cost["dog"] = {"forward_passes": 0, "seconds_per_image": 0.0}

    def occlusion(i: int) -> tuple[int, S.SaliencyResult, float]:
        t0 = time.perf_counter()
        res = S.occlusion_map(
            predict_logit,
            sl.x[i],
            patch=spec.occlusion_patch,
            stride=spec.occlusion_stride,
            max_passes=spec.max_forward_passes,
            batch_size=full.batch,
        )
        return i, res, time.perf_counter() - t0

    def rise(i: int) -> tuple[int, S.SaliencyResult, float]:
        t0 = time.perf_counter()
        res = S.rise_map(
            predict_logit,
            sl.x[i],
            n_masks=spec.rise_masks,
            max_passes=spec.max_forward_passes,
            seed=args.seed + int(i),
            batch_size=full.batch,
        )
        return i, res, time.perf_counter() - t0

    truncated: dict[str, bool] = {}
    limit = subset[: args.max_perturbation_slices]
    for name, fn, share in (("occlusion", occlusion, 0.3), ("rise", rise, 0.3)):
        done, truncated[name] = run_capped(limit, fn, clock.remaining() * share)
        for i, res, _ in done:
            maps[name][i] = res.map
        if done:
            cost[name] = {
                "forward_passes": float(np.mean([r.forward_passes for _, r, _ in done])),
                "seconds_per_image": float(np.mean([s for _, _, s in done])),
            }
            result.setdefault("perturbation_params", {})[name] = done[0][1].params

    methods: dict[str, Any] = {}
    for name, mp_ in maps.items():
        if not mp_:
            continue
        ids = list(mp_)
        rows = [map_metrics(mp_[i], sl.lesion(i)) for i in ids]
        base = None if name == "dog" else [map_metrics(maps["dog"][i], sl.lesion(i)) for i in ids]
        methods[name] = summarise_maps(rows, n_boot=nb, baseline=base)
        methods[name]["cost"] = {k: _r(v, 5) for k, v in cost.get(name, {}).items()}
        methods[name]["truncated_by_budget"] = truncated.get(name, False)

    # Deletion / insertion (classifier probability), against a random ordering per slice.
    delins_ids = [i for i in subset if all(i in maps[m] for m in maps if maps[m])]
    delins_ids = delins_ids[: args.max_delins_slices] or list(tp[: args.max_delins_slices])
    random_cache: dict[int, S.DeletionInsertion] = {}

    def delins(item: tuple[str, int]) -> tuple[str, S.DeletionInsertion, S.DeletionInsertion]:
        name, i = item
        if i not in random_cache:
            rmap = np.random.default_rng([args.seed, int(i)]).random(sl.x.shape[2:])
            random_cache[i] = S.deletion_insertion_auc(
                predict_prob,
                sl.x[i],
                rmap.astype(np.float32),
                steps=args.delins_steps,
                batch_size=full.batch,
            )
        res = S.deletion_insertion_auc(
            predict_prob, sl.x[i], maps[name][i], steps=args.delins_steps, batch_size=full.batch
        )
        return name, res, random_cache[i]

    items = [(m, i) for i in delins_ids for m in maps if i in maps[m]]
    done_di, _ = run_capped(items, delins, clock.remaining() * 0.45)
    for name in methods:
        rows_di = [(a, b) for n, a, b in done_di if n == name]
        methods[name]["deletion_insertion"] = summarise_delins(rows_di, nb)
    result["methods"] = methods

    # Cascading randomisation: CAM on many slices (1 pass each), perturbation maps on a few.
    layers = cascade_layers(proto)
    stages = cascade_stages(len(layers))
    sanity_ids = list(subset[: args.max_sanity_slices])
    perturb_ids = [i for i in subset if i in maps["occlusion"] or i in maps["rise"]][
        : args.max_sanity_perturbation_slices
    ]
    sanity: list[dict[str, Any]] = []
    for n_layers in stages:
        rnd = OnnxModel(
            manifest, randomised_model(proto, layers, n_layers, args.seed), args.threads
        )
        entry: dict[str, Any] = {"layers_randomised": n_layers, "down_to": layers[n_layers - 1][0]}
        if cam_spec and sanity_ids:
            r_out = rnd.run(sl.x[sanity_ids], names)
            r_cams = [
                S.cam_map(
                    r_out[1][k],
                    class_index=min(ch, r_out[1].shape[1] - 1),
                    output_shape=sl.x.shape[2:],
                )
                for k in range(len(sanity_ids))
            ]
            sp = _spearman_rows([maps["cam"][i] for i in sanity_ids], r_cams)
            entry["cam"] = {
                "spearman_signed": _summarise_spearman(sp["signed"], nb),
                "spearman_abs": _summarise_spearman(sp["abs"], nb),
                "pointing_game": summarise(
                    [
                        S.pointing_game(m, sl.lesion(i))
                        for m, i in zip(r_cams, sanity_ids, strict=True)
                    ],
                    n_boot=nb,
                ),
            }
        if n_layers in perturbation_stages(stages) and perturb_ids and clock.remaining() > 0:
            r_plain_bytes = logit_only_model(
                onnx.load_from_string(randomised_model(proto, layers, n_layers, args.seed)),
                full.input,
                logit_spec.name,
            )
            r_plain = OnnxModel(manifest, r_plain_bytes, args.threads)

            def r_predict(batch: Array, _m: OnnxModel = r_plain) -> Array:
                out: Array = _m.run(batch, [logit_spec.name])[0][:, ch]
                return out

            for name in ("occlusion", "rise"):
                ids = [i for i in perturb_ids if i in maps[name]]

                def one(i: int, _name: str = name) -> tuple[int, Array]:
                    if _name == "occlusion":
                        res = S.occlusion_map(
                            r_predict,
                            sl.x[i],
                            patch=spec.occlusion_patch,
                            stride=spec.occlusion_stride,
                            max_passes=spec.max_forward_passes,
                            batch_size=full.batch,
                        )
                    else:
                        res = S.rise_map(
                            r_predict,
                            sl.x[i],
                            n_masks=spec.rise_masks,
                            max_passes=spec.max_forward_passes,
                            seed=args.seed + int(i),
                            batch_size=full.batch,
                        )
                    return i, res.map

                done_r, _ = run_capped(ids, one, clock.remaining() * 0.4, min_items=1)
                if done_r:
                    sp = _spearman_rows([maps[name][i] for i, _ in done_r], [m for _, m in done_r])
                    entry[name] = {
                        "spearman_signed": _summarise_spearman(sp["signed"], nb),
                        "spearman_abs": _summarise_spearman(sp["abs"], nb),
                    }
        sanity.append(entry)
    result["randomisation"] = {"n_layers": len(layers), "stages": sanity}
    return result


# --------------------------------------------------------------------------------------------
# segmenters
# --------------------------------------------------------------------------------------------
def _error_histograms(u: Array, err: Array, roi: Array, hi: float) -> tuple[Array, Array]:
    bins = np.clip((u[roi] / hi * _HIST_BINS).astype(np.int64), 0, _HIST_BINS - 1)
    e = err[roi]
    return (
        np.bincount(bins[e], minlength=_HIST_BINS).astype(float),
        np.bincount(bins[~e], minlength=_HIST_BINS).astype(float),
    )


def _uncertainty_auc(
    maps: list[Array], errors: list[Array], rois: list[Array], hi: float, n_boot: int
) -> dict[str, Any]:
    """Pooled-pixel ROC AUC for flagging wrong pixels, CI by resampling slices."""
    if not maps:
        return {"n": 0}
    hists = [_error_histograms(m, e, r, hi) for m, e, r in zip(maps, errors, rois, strict=True)]
    pos = np.stack([h[0] for h in hists])
    neg = np.stack([h[1] for h in hists])
    auc = hist_auc(pos.sum(0), neg.sum(0))
    ci = bootstrap_ci(
        len(maps), lambda i: hist_auc(pos[i].sum(0), neg[i].sum(0)), n_boot=n_boot, seed=6
    )
    return {
        "auc": _r(auc),
        "ci95": [_r(v) for v in ci],
        "n_slices": len(maps),
        "error_pixels": int(pos.sum()),
        "pixels": int(pos.sum() + neg.sum()),
    }


def evaluate_segmenter(
    manifest: Manifest, path: Path, sl: Slices, args: argparse.Namespace, seconds: float
) -> dict[str, Any]:
    clock = Clock(seconds)
    nb = args.bootstrap
    proto = onnx.load(str(path))
    model = OnnxModel(manifest, proto.SerializeToString(), args.threads)
    logit_spec = manifest.output(OutputRole.LOGITS)
    assert logit_spec is not None
    spec = manifest.saliency
    target = spec.target_label or "nodule"
    nod = next(lab.value for lab in manifest.labels if lab.name == target)

    t0 = time.perf_counter()
    logits = model.run(sl.x, [logit_spec.name])[0]
    forward_s = (time.perf_counter() - t0) / len(sl.x)
    probs = S.softmax(logits, axis=1)
    pred = probs.argmax(axis=1).astype(np.uint8)
    truth = sl.labels
    pred_nod, true_nod = pred == nod, truth == nod
    inter = (pred_nod & true_nod).sum(axis=(1, 2))
    denom = pred_nod.sum(axis=(1, 2)) + true_nod.sum(axis=(1, 2))
    dice = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
    result: dict[str, Any] = {
        "task": "segmentation",
        "quality": {
            "nodule_dice_positive_slices": summarise(dice[sl.positive], n_boot=nb),
            "negative_slices_with_false_nodule": _r(
                float(pred_nod[~sl.positive].any(axis=(1, 2)).mean())
            )
            if (~sl.positive).any()
            else None,
        },
        "cost": {"forward_seconds_per_image": _r(forward_s, 5)},
    }

    def predict_logits(batch: Array) -> Array:
        out: Array = model.run(batch, [logit_spec.name])[0]
        return out

    def predict_probs(batch: Array) -> Array:
        return S.softmax(predict_logits(batch), axis=1)

    # Where a segmentation decision matters: the lung field (truth or prediction) plus a margin.
    fg = (truth >= LABEL_LUNG) | (pred >= LABEL_LUNG)
    rois = [ndimage.binary_dilation(f, iterations=5) for f in fg]
    errors = [p != t for p, t in zip(pred, truth, strict=True)]
    nod_errors = [(p == nod) != (t == nod) for p, t in zip(pred, truth, strict=True)]

    t0 = time.perf_counter()
    entropy = [S.softmax_entropy(p) for p in probs]
    entropy_s = (time.perf_counter() - t0) / len(probs)
    order = np.random.default_rng(args.seed).permutation(len(sl.x))[: args.max_tta_slices]

    def tta_one(i: int) -> tuple[int, S.SaliencyResult, float]:
        t0 = time.perf_counter()
        res = S.tta_flip_std(predict_probs, sl.x[i], label=nod)
        return int(i), res, time.perf_counter() - t0

    tta_done, tta_cut = run_capped(list(order), tta_one, clock.remaining() * 0.2)
    tta = {i: r.map for i, r, _ in tta_done}
    t_tta = [secs for _, _, secs in tta_done] or [math.nan]
    tta_ids = sorted(tta)
    uncertainty = {
        "entropy": {
            "error_auc": _uncertainty_auc(entropy, errors, rois, 1.0, nb),
            "nodule_error_auc": _uncertainty_auc(entropy, nod_errors, rois, 1.0, nb),
            "cost": {"forward_passes": 0, "seconds_per_image": _r(entropy_s, 5)},
        },
        "tta_std": {
            "error_auc": _uncertainty_auc(
                [tta[i] for i in tta_ids],
                [errors[i] for i in tta_ids],
                [rois[i] for i in tta_ids],
                0.5,
                nb,
            ),
            "nodule_error_auc": _uncertainty_auc(
                [tta[i] for i in tta_ids],
                [nod_errors[i] for i in tta_ids],
                [rois[i] for i in tta_ids],
                0.5,
                nb,
            ),
            "entropy_error_auc_same_slices": _uncertainty_auc(
                [entropy[i] for i in tta_ids],
                [errors[i] for i in tta_ids],
                [rois[i] for i in tta_ids],
                1.0,
                nb,
            ),
            "cost": {"forward_passes": 4, "seconds_per_image": _r(float(np.mean(t_tta)), 5)},
            "truncated_by_budget": tta_cut,
        },
    }
    result["uncertainty"] = uncertainty

    # Occlusion of the predicted nodule's mean logit, on true-positive slices.
    tp_regions: dict[int, Array] = {}
    for i in np.flatnonzero(sl.positive):
        components, n = ndimage.label(pred_nod[i])
        if n == 0:
            continue
        overlaps = ndimage.sum(true_nod[i], components, index=np.arange(1, n + 1))
        best = int(np.argmax(overlaps))
        if overlaps[best] > 0:
            tp_regions[int(i)] = components == best + 1
    result["quality"]["true_positive_slices"] = len(tp_regions)
    tp_ids = [int(i) for i in np.random.default_rng(args.seed + 1).permutation(sorted(tp_regions))]

    def region_fns(i: int, logits_fn: Callable[[Array], Array]) -> tuple[S.Predict, S.Predict]:
        score = S.region_predict(logits_fn, label=nod, region=tp_regions[i], reduction="mean")
        region = tp_regions[i]

        def prob(batch: Array) -> Array:
            p = S.softmax(logits_fn(batch), axis=1)[:, nod][:, region]
            return p.mean(axis=1).astype(np.float32)

        return score, prob

    def occlusion(
        i: int, logits_fn: Callable[[Array], Array] = predict_logits
    ) -> tuple[int, S.SaliencyResult, float]:
        t0 = time.perf_counter()
        score, _ = region_fns(i, logits_fn)
        res = S.occlusion_map(
            score,
            sl.x[i],
            patch=spec.occlusion_patch,
            stride=spec.occlusion_stride,
            max_passes=spec.max_forward_passes,
            batch_size=model.batch,
        )
        return i, res, time.perf_counter() - t0

    occ_done, occ_cut = run_capped(
        tp_ids[: args.max_perturbation_slices], occlusion, clock.remaining() * 0.35
    )
    occ = {i: r.map for i, r, _ in occ_done}
    all_tp = sorted(tp_regions)
    maps: dict[str, dict[int, Array]] = {
        "occlusion_region": occ,
        "entropy": {i: entropy[i] for i in all_tp},
        "dog": {i: S.dog_blob_map(sl.x[i], tuple(args.dog_sigmas)) for i in all_tp},
    }
    if tta:
        maps["tta_std"] = {i: tta[i] for i in all_tp if i in tta}
    methods: dict[str, Any] = {}
    for name, mp_ in maps.items():
        ids = list(mp_)
        rows = [map_metrics(mp_[i], sl.lesion(i)) for i in ids]
        base = None if name == "dog" else [map_metrics(maps["dog"][i], sl.lesion(i)) for i in ids]
        methods[name] = summarise_maps(rows, n_boot=nb, baseline=base)
    if occ_done:
        methods["occlusion_region"]["cost"] = {
            "forward_passes": _r(float(np.mean([r.forward_passes for _, r, _ in occ_done]))),
            "seconds_per_image": _r(float(np.mean([s for _, _, s in occ_done])), 5),
        }
        methods["occlusion_region"]["truncated_by_budget"] = occ_cut
        result["perturbation_params"] = {"occlusion_region": occ_done[0][1].params}
    methods["dog"]["cost"] = {"forward_passes": 0}
    for name in ("entropy", "tta_std"):
        if name in methods:
            methods[name]["note"] = "uncertainty map: localisation numbers are descriptive only"

    # Deletion / insertion of the region's mean nodule probability (attribution maps only).
    random_cache: dict[int, S.DeletionInsertion] = {}

    def delins(item: tuple[str, int]) -> tuple[str, S.DeletionInsertion, S.DeletionInsertion]:
        name, i = item
        _, prob = region_fns(i, predict_logits)
        if i not in random_cache:
            rmap = np.random.default_rng([args.seed, i]).random(sl.x.shape[2:]).astype(np.float32)
            random_cache[i] = S.deletion_insertion_auc(
                prob, sl.x[i], rmap, steps=args.delins_steps, batch_size=model.batch
            )
        res = S.deletion_insertion_auc(
            prob, sl.x[i], maps[name][i], steps=args.delins_steps, batch_size=model.batch
        )
        return name, res, random_cache[i]

    di_ids = [i for i in tp_ids if i in occ][: args.max_delins_slices]
    items = [(m, i) for i in di_ids for m in ("occlusion_region", "dog")]
    done_di, _ = run_capped(items, delins, clock.remaining() * 0.4)
    for name in ("occlusion_region", "dog"):
        methods[name]["deletion_insertion"] = summarise_delins(
            [(a, b) for n, a, b in done_di if n == name], nb
        )
    result["methods"] = methods

    # Cascading randomisation: entropy on many slices, TTA and occlusion on a few.
    layers = cascade_layers(proto)
    stages = cascade_stages(len(layers))
    sanity_ids = [int(i) for i in order[: args.max_sanity_slices]]
    perturb_ids = [i for i in tp_ids if i in occ][: args.max_sanity_perturbation_slices]
    tta_sanity = [i for i in sanity_ids if i in tta][: args.max_sanity_perturbation_slices * 2]
    sanity: list[dict[str, Any]] = []
    for n_layers in stages:
        rnd = OnnxModel(
            manifest, randomised_model(proto, layers, n_layers, args.seed), args.threads
        )

        def r_logits(batch: Array, _m: OnnxModel = rnd) -> Array:
            out: Array = _m.run(batch, [logit_spec.name])[0]
            return out

        entry: dict[str, Any] = {"layers_randomised": n_layers, "down_to": layers[n_layers - 1][0]}
        r_probs = S.softmax(r_logits(sl.x[sanity_ids]), axis=1)
        sp = _spearman_rows(
            [entropy[i] for i in sanity_ids], [S.softmax_entropy(p) for p in r_probs]
        )
        entry["entropy"] = {
            "spearman_signed": _summarise_spearman(sp["signed"], nb),
        }
        if tta_sanity and clock.remaining() > 0:
            r_tta = [
                S.tta_flip_std(lambda b: S.softmax(r_logits(b), axis=1), sl.x[i], label=nod).map
                for i in tta_sanity
            ]
            sp = _spearman_rows([tta[i] for i in tta_sanity], r_tta)
            entry["tta_std"] = {"spearman_signed": _summarise_spearman(sp["signed"], nb)}
        if n_layers in perturbation_stages(stages) and perturb_ids and clock.remaining() > 0:
            done_r, _ = run_capped(
                perturb_ids, lambda i: occlusion(i, r_logits), clock.remaining() * 0.4, min_items=1
            )
            if done_r:
                sp = _spearman_rows([occ[i] for i, _, _ in done_r], [r.map for _, r, _ in done_r])
                entry["occlusion_region"] = {
                    "spearman_signed": _summarise_spearman(sp["signed"], nb),
                    "spearman_abs": _summarise_spearman(sp["abs"], nb),
                }
        sanity.append(entry)
    result["randomisation"] = {"n_layers": len(layers), "stages": sanity}
    return result


# --------------------------------------------------------------------------------------------
# targets, report, command line
# --------------------------------------------------------------------------------------------
def _mean(d: dict[str, Any] | None, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d if isinstance(d, int | float) else None


def check_targets(res: dict[str, Any]) -> dict[str, Any]:
    """Compare one model's results with the saliency targets (None = not measurable here)."""
    out: dict[str, Any] = {}
    methods = res.get("methods", {})
    judged = target_stage(res)
    head_only = (res.get("randomisation", {}).get("stages") or [{}])[0]
    for name, m in methods.items():
        if name == "dog" or name in ("entropy", "tta_std"):
            continue
        t: dict[str, Any] = {}
        pg = _mean(m, "pointing_game", "mean")
        ratio = _mean(m, "energy_over_area_fraction", "value")
        margin_pg = m.get("margin_over_dog", {}).get("pointing_game", {}).get("ci95")
        margin_en = m.get("margin_over_dog", {}).get("energy_in_lesion", {}).get("ci95")
        if name == "cam":
            t["pointing_game_tp>=0.90"] = (
                None if pg is None else pg >= TARGETS["cam_pointing_game_tp"]
            )
            frac = _mean(res, "cost", "cam_cost_fraction")
            t["cost<=5%_of_inference"] = (
                None if frac is None else frac <= TARGETS["cam_cost_fraction"]
            )
        t["energy>=10x_area_fraction"] = (
            None if ratio is None else ratio >= TARGETS["energy_over_area_fraction"]
        )
        t["beats_dog_pointing_game(ci_low>0)"] = None if not margin_pg else margin_pg[0] > 0
        t["beats_dog_energy(ci_low>0)"] = None if not margin_en else margin_en[0] > 0
        rho = _mean(judged.get(name), "spearman_signed", "mean")
        rho_abs = _mean(judged.get(name), "spearman_abs", "mean")
        worst = max((abs(v) for v in (rho, rho_abs) if v is not None), default=None)
        t[f"randomised_{judged.get('layers_randomised')}_layers_|spearman|<=0.3"] = (
            None if worst is None else worst <= TARGETS["randomisation_abs_spearman"]
        )
        head_abs = _mean(head_only.get(name), "spearman_abs", "mean")
        if head_abs is not None:
            # Warning sign from the reference experiment: a head-only re-draw that leaves the
            # |map| ranks in place means the map mostly shows where features are active.
            t["head_only_|map|_spearman<=0.5"] = abs(head_abs) <= 0.5
        out[name] = t
    for name, u in res.get("uncertainty", {}).items():
        auc = _mean(u, "error_auc", "auc")
        out[name] = {
            "error_auc>=0.90": None if auc is None else auc >= TARGETS["uncertainty_error_auc"]
        }
    return out


def _fmt(summary: dict[str, Any] | None) -> str:
    if not summary or summary.get("mean") is None:
        return "–"
    lo, hi = summary["ci95"]
    return f"{summary['mean']:.2f} ({lo:.2f}–{hi:.2f})"


def _fmt_auc(d: dict[str, Any]) -> str:
    if d.get("auc") is None:
        return "–"
    return f"{d['auc']:.3f} ({d['ci95'][0]}–{d['ci95'][1]})"


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "| Model | Map | n | Pointing game (TP) | within 1 radius | Energy in lesion | "
        "Energy / area | Deletion AUC (random) | Insertion AUC (random) | "
        "ρ after re-drawing head + 1 layer (signed / abs) | Passes | s / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, res in report["models"].items():
        judged = target_stage(res)
        for name, m in res.get("methods", {}).items():
            di = m.get("deletion_insertion", {})
            del_s = (
                f"{_fmt(di.get('deletion_auc'))} ({_mean(di, 'random_deletion_auc', 'mean')})"
                if di.get("n")
                else "–"
            )
            ins_s = (
                f"{_fmt(di.get('insertion_auc'))} ({_mean(di, 'random_insertion_auc', 'mean')})"
                if di.get("n")
                else "–"
            )
            rand = judged.get(name, {})
            rho = "/".join(
                f"{_mean(rand, k, 'mean'):.2f}" if _mean(rand, k, "mean") is not None else "–"
                for k in ("spearman_signed", "spearman_abs")
            )
            ratio = _mean(m, "energy_over_area_fraction", "value")
            cost = m.get("cost", {})
            lines.append(
                f"| {key} | {name} | {m.get('n', 0)} | {_fmt(m.get('pointing_game'))} | "
                f"{_fmt(m.get('pointing_game_lesion_radius'))} | {_fmt(m.get('energy_in_lesion'))} | "
                f"{'–' if ratio is None else f'{ratio:.1f}×'} | {del_s} | {ins_s} | {rho} | "
                f"{cost.get('forward_passes', '–')} | {cost.get('seconds_per_image', '–')} |"
            )
    lines += [
        "",
        "| Model | Uncertainty map | Error-pixel AUC | Nodule-error AUC | slices |",
        "|---|---|---|---|---|",
    ]
    for key, res in report["models"].items():
        for name, u in res.get("uncertainty", {}).items():
            e, ne = u.get("error_auc", {}), u.get("nodule_error_auc", {})
            lines.append(
                f"| {key} | {name} | {_fmt_auc(e)} | {_fmt_auc(ne)} | {e.get('n_slices', 0)} |"
            )
    lines += ["", "| Model | Map | Target | Met |", "|---|---|---|---|"]
    for key, res in report["models"].items():
        for name, checks in res.get("targets", {}).items():
            for target, ok in checks.items():
                met = "n/a" if ok is None else ("yes" if ok else "**no**")
                lines.append(f"| {key} | {name} | {target} | {met} |")
    return "\n".join(lines)


def find_models(models_dir: Path, selected: list[str] | None) -> list[tuple[Manifest, Path]]:
    found = []
    for manifest_path in sorted(models_dir.glob("*/*/manifest.json")):
        manifest = Manifest.model_validate_json(manifest_path.read_text())
        if selected and manifest.key not in selected and manifest.name not in selected:
            continue
        onnx_path = manifest_path.parent / manifest.file
        if onnx_path.exists():
            found.append((manifest, onnx_path))
    return found


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m models.training.evaluate_saliency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--models-dir", type=Path, default=MODELS_DIR)
    ap.add_argument("--models", default="", help="comma list of name or name:version")
    ap.add_argument(
        "--out", type=Path, default=None, help="default <models-dir>/saliency_metrics.json"
    )
    ap.add_argument("--series", type=int, default=8, help="held-out series (test split)")
    ap.add_argument("--slices", type=int, default=None, help="slices per series (split default)")
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--min-lesion-px", type=int, default=4)
    ap.add_argument("--max-negatives", type=int, default=40)
    ap.add_argument("--max-perturbation-slices", type=int, default=12)
    ap.add_argument("--max-delins-slices", type=int, default=10)
    ap.add_argument("--max-tta-slices", type=int, default=60)
    ap.add_argument("--max-sanity-slices", type=int, default=24)
    ap.add_argument("--max-sanity-perturbation-slices", type=int, default=3)
    ap.add_argument("--delins-steps", type=int, default=16)
    ap.add_argument("--dog-sigmas", type=float, nargs=2, default=(2.0, 6.0))
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--budget-seconds", type=float, default=540.0)
    ap.add_argument("--timing-reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.monotonic()
    selected = [m.strip() for m in args.models.split(",") if m.strip()] or None
    models = find_models(args.models_dir, selected)
    if not models:
        print(f"no models with manifest.json under {args.models_dir}")
        return 1
    n_slices = args.slices or SPLITS["test"]["slices"]
    assert isinstance(n_slices, int)
    data = load_heldout(args.series, n_slices, args.image_size, args.threads)
    data_s = time.monotonic() - t_start
    print(f"held-out data: {args.series} series x {n_slices} slices in {data_s:.0f} s", flush=True)
    report: dict[str, Any] = {
        "generated_by": "python -m models.training.evaluate_saliency",
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("models_dir", "out")
        },
        "versions": {
            "onnxruntime": ort.__version__,
            "onnx": onnx.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "data": {"split": "test", "series_seeds": data.seeds, "slices_per_series": n_slices},
        "targets": TARGETS,
        "models": {},
    }
    for k, (manifest, path) in enumerate(models):
        remaining = args.budget_seconds - (time.monotonic() - t_start)
        seconds = max(remaining / (len(models) - k), 5.0)
        t0 = time.monotonic()
        sl, counts = select_slices(
            data,
            manifest.preprocessing,
            min_lesion_px=args.min_lesion_px,
            max_negatives=args.max_negatives,
            seed=args.seed,
        )
        if manifest.task is Task.CLASSIFICATION:
            res = evaluate_classifier(manifest, path, sl, args, seconds)
        else:
            res = evaluate_segmenter(manifest, path, sl, args, seconds)
        res["slices"] = counts
        res["display_range"] = list(manifest.saliency.display_range)
        res["targets"] = check_targets(res)
        res["seconds"] = round(time.monotonic() - t0, 1)
        report["models"][manifest.key] = res
        print(f"{manifest.key}: evaluated in {res['seconds']} s", flush=True)
    report["seconds_total"] = round(time.monotonic() - t_start, 1)
    out = args.out or args.models_dir / "saliency_metrics.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(markdown(report))
    print(f"\nwrote {out} ({report['seconds_total']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
