"""Per-model analysis of a decoded series: inference, post-processing and saliency.

Pure orchestration over numpy arrays: the model is a ``run`` callable (an onnxruntime session's
``run``), there is no database, storage or settings access here. The runner turns the results
into records, blobs and DICOM objects.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.registry.manifest import Manifest, OutputRole, SaliencyMethod, Task
from workers.pipeline import postprocess, saliency
from workers.pipeline.infer import RunFn, run_batched
from workers.pipeline.preprocess import preprocess_frames

FloatArray = NDArray[np.float32]


@dataclass
class SaliencyResult:
    """One saliency map in source geometry (float32, rows × columns) for frame ``index``."""

    index: int
    method: SaliencyMethod
    values: FloatArray
    display_range: tuple[float, float]
    suppressed: bool = False
    target: str | None = None
    params: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Lesion:
    """One kept 3-D component of a filtered structure (e.g. a nodule), in source geometry.

    ``number`` ranks the lesions of a structure by decreasing volume (1 = largest);
    ``centroid`` is (frame, row, column) in source pixels; ``frames`` the inclusive (first,
    last) frame indices it spans and ``key_frame`` the one with its largest cross-section.
    ``volume_mm3`` and ``equivalent_diameter_mm`` (the sphere of the same volume) are None
    when Pixel Spacing or the slice spacing is unknown.
    """

    structure: str
    value: int
    number: int
    max_probability: float
    volume_mm3: float | None
    equivalent_diameter_mm: float | None
    frames: tuple[int, int]
    key_frame: int
    centroid: tuple[float, float, float]
    uncertain: bool = False  # peak probability inside the manifest's review band


@dataclass
class SegmentationResult:
    """Label maps in source geometry, per-frame label statistics, lesions and saliency maps."""

    labels: NDArray[np.uint8]  # (F, H, W)
    stats: list[list[dict[str, Any]]]  # per frame: [{"value", "name", "pixels"}]
    saliency: list[SaliencyResult]
    uncertain: bool
    mean_entropy: float
    components: dict[str, list[postprocess.Component]] = field(default_factory=dict)
    lesions: list[Lesion] = field(default_factory=list)


@dataclass
class ClassificationResult:
    """Calibrated per-frame probabilities, the series aggregate and the CAMs."""

    probabilities: NDArray[np.float64]  # (F,)
    positive: NDArray[np.bool_]  # (F,)
    uncertain: NDArray[np.bool_]  # (F,)
    series_probability: float
    series_positive: bool
    series_uncertain: bool
    series_index: int  # frame that drives the series probability (max)
    saliency: list[SaliencyResult]


@dataclass
class ModelAnalysis:
    """The result of one model on one series, with per-stage timings (seconds)."""

    manifest: Manifest
    segmentation: SegmentationResult | None = None
    classification: ClassificationResult | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def saliency(self) -> list[SaliencyResult]:
        """Every saliency map of this model's result (segmentation or classification)."""
        if self.segmentation is not None:
            return self.segmentation.saliency
        if self.classification is not None:
            return self.classification.saliency
        return []


def _in_band(p: float, band: tuple[float, float]) -> bool:
    return band[0] <= p <= band[1]


PERTURBATION = (SaliencyMethod.OCCLUSION, SaliencyMethod.RISE)
# Methods a request may add to the manifest's: the perturbation maps, and flip TTA (three extra
# passes per frame; segmentation only, a classifier ignores it).
ON_REQUEST = (*PERTURBATION, SaliencyMethod.TTA_STD)


def effective_methods(
    manifest: Manifest, requested: Sequence[SaliencyMethod] = ()
) -> tuple[SaliencyMethod, ...]:
    """The saliency methods to compute: the manifest's, plus ``ON_REQUEST`` methods asked for.

    A classifier without a CAM output and without a perturbation method in its manifest (a
    user-supplied model) still gets occlusion sensitivity: no finding goes unexplained.
    """
    methods = list(manifest.saliency.methods)
    for method in requested:
        if method in ON_REQUEST and method not in methods:
            methods.append(method)
    if (
        manifest.task is Task.CLASSIFICATION
        and manifest.output(OutputRole.CAM) is None
        and not any(m in PERTURBATION for m in methods)
    ):
        methods.append(SaliencyMethod.OCCLUSION)
    return tuple(methods)


def analyze_series(
    run: RunFn,
    manifest: Manifest,
    frames: FloatArray,
    *,
    max_forward_passes: int,
    extra_methods: Sequence[SaliencyMethod] = (),
    preprocessed: dict[str, FloatArray] | None = None,
    voxel_mm3: float | None = None,
) -> ModelAnalysis:
    """Run one model over a (F, H, W) float32 stack in modality units.

    ``max_forward_passes`` bounds the perturbation saliency cost of this model on this series
    (its manifest may set a lower bound); flip TTA costs a fixed three passes per frame.
    ``extra_methods`` are ``ON_REQUEST`` methods the request asked for on top of the manifest's
    defaults. ``preprocessed``, if given, is a cache of
    network inputs for these ``frames`` keyed by preprocessing section: models that share one
    (window, size, resampling, normalisation) reuse its tensor, which nothing here modifies.
    ``voxel_mm3`` is the volume of one source voxel (row × column spacing × slice spacing),
    which the segmentation component filters need; None when the geometry is unknown.
    """
    analysis = ModelAnalysis(manifest=manifest)
    methods = effective_methods(manifest, extra_methods)
    t0 = time.perf_counter()
    key = manifest.preprocessing.model_dump_json()
    x = preprocessed.get(key) if preprocessed is not None else None
    if x is None:
        x = preprocess_frames(frames, manifest.preprocessing)
        if preprocessed is not None:
            preprocessed[key] = x
    t1 = time.perf_counter()
    outputs = run_batched(run, manifest, x)
    probs = (
        served_probabilities(run, manifest, x, outputs[OutputRole.LOGITS])
        if manifest.task is Task.SEGMENTATION
        else None
    )
    t2 = time.perf_counter()
    analysis.timings = {"preprocess": t1 - t0, "infer": t2 - t1}
    source_size = (int(frames.shape[1]), int(frames.shape[2]))
    budget = max_forward_passes
    if probs is not None:
        analysis.segmentation = _segment(
            run, manifest, x, outputs, probs, source_size, budget, methods, voxel_mm3
        )
    else:
        analysis.classification = _classify(run, manifest, x, outputs, source_size, budget, methods)
    analysis.timings["postprocess_saliency"] = time.perf_counter() - t2
    return analysis


def served_probabilities(
    run: RunFn, manifest: Manifest, x: FloatArray, logits: FloatArray
) -> FloatArray:
    """A segmenter's served class probabilities (N, K, h, w) on the network grid: the softmax
    of ``logits`` (the untransformed input's), or with the manifest's test-time augmentation
    the mean over its members (extra forward passes of the whole series, in its batches)."""
    return postprocess.averaged_probabilities(
        lambda batch: run_batched(run, manifest, batch)[OutputRole.LOGITS],
        x,
        manifest.test_time_augmentation,
        identity_logits=logits,
    )


def _segment(
    run: RunFn,
    manifest: Manifest,
    x: FloatArray,
    outputs: dict[OutputRole, FloatArray],
    probs: FloatArray,
    size: tuple[int, int],
    budget: int,
    methods: Sequence[SaliencyMethod],
    voxel_mm3: float | None = None,
) -> SegmentationResult:
    grid = (int(probs.shape[-2]), int(probs.shape[-1]))
    grid_voxel = (
        None if voxel_mm3 is None else voxel_mm3 * (size[0] * size[1]) / (grid[0] * grid[1])
    )
    seg = postprocess.segment(probs, structure_rules(manifest), voxel_mm3=grid_voxel)
    small = seg.labels
    labels = postprocess.resize_label_map(small, size)  # (F, H, W): leading axes are kept
    names = {label.value: label.name for label in manifest.labels}
    # a histogram per frame: labels are uint8, so bincount (one pass) replaces np.unique (a sort)
    counts = [np.bincount(frame.ravel(), minlength=1) for frame in labels]
    stats = [
        [
            {"value": v, "name": names.get(v, str(v)), "pixels": int(c)}
            for v, c in enumerate(frame_counts)
            if v != 0 and c > 0
        ]
        for frame_counts in counts
    ]
    maps: list[SaliencyResult] = []
    entropy_small = np.stack([saliency.softmax_entropy(p) for p in probs])
    foreground = small > 0
    mean_entropy = float(entropy_small[foreground].mean()) if foreground.any() else 0.0
    if SaliencyMethod.ENTROPY in methods:
        for i, e in enumerate(entropy_small):
            maps.append(
                SaliencyResult(
                    index=i,
                    method=SaliencyMethod.ENTROPY,
                    values=postprocess.resize_float_map(e, size),
                    display_range=(0.0, 1.0),
                    params={"normalised_by": "log(K)"},
                )
            )
    if SaliencyMethod.TTA_STD in methods:
        # the flip-std map's identity member is the plain prediction, not a TTA mean
        identity = (
            postprocess.probabilities_from_logits(outputs[OutputRole.LOGITS], axis=1)
            if manifest.test_time_augmentation
            else probs
        )
        maps.extend(_segmentation_tta(run, manifest, x, identity, size))
    lesions = lesions_in_source(seg, names, grid, size, manifest.review.probability_band)
    if SaliencyMethod.OCCLUSION in methods:
        maps.extend(_segmentation_occlusion(run, manifest, x, small, size, budget, lesions))
    limit = manifest.review.max_mean_entropy
    uncertain = limit is not None and mean_entropy > limit
    return SegmentationResult(
        labels=labels.astype(np.uint8),
        stats=stats,
        saliency=maps,
        uncertain=uncertain,
        mean_entropy=mean_entropy,
        components={
            names.get(value, str(value)): result.components
            for value, result in seg.components.items()
        },
        lesions=lesions,
    )


def lesions_in_source(
    seg: postprocess.Segmentation,
    names: dict[int, str],
    grid: tuple[int, int],
    size: tuple[int, int],
    review_band: tuple[float, float],
) -> list[Lesion]:
    """The kept components of every filtered structure, largest first, in source pixels.

    Components are found on the network grid; a centroid moves to source pixels by the
    centre-aligned scale of each axis (pixel centres at ``i + 0.5``). A lesion is uncertain
    when its peak probability lies in ``review_band``.
    """
    sy, sx = size[0] / grid[0], size[1] / grid[1]
    out: list[Lesion] = []
    for value, result in seg.components.items():
        kept = sorted((c for c in result.components if c.kept), key=lambda c: -c.voxels)
        for number, c in enumerate(kept, start=1):
            f, r, col = c.centroid
            out.append(
                Lesion(
                    structure=names.get(value, str(value)),
                    value=value,
                    number=number,
                    max_probability=c.max_probability,
                    volume_mm3=c.volume_mm3,
                    equivalent_diameter_mm=c.equivalent_diameter_mm,
                    frames=c.frames,
                    key_frame=c.key_frame,
                    centroid=(f, (r + 0.5) * sy - 0.5, (col + 0.5) * sx - 0.5),
                    uncertain=_in_band(c.max_probability, review_band),
                )
            )
    return out


def structure_rules(manifest: Manifest) -> list[postprocess.StructureRule]:
    """The manifest's component filters with their label names resolved to values."""
    return [
        postprocess.StructureRule(
            value=manifest.label_value(rule.label),
            replacement=manifest.label_value(rule.replace_with),
            min_volume_mm3=rule.min_volume_mm3,
            min_probability=rule.min_probability,
        )
        for rule in manifest.components
    ]


def _target_value(manifest: Manifest) -> int | None:
    target = manifest.saliency.target_label
    return next((lab.value for lab in manifest.labels if lab.name == target), None)


def _segmentation_tta(
    run: RunFn,
    manifest: Manifest,
    x: FloatArray,
    probs: FloatArray,
    size: tuple[int, int],
) -> list[SaliencyResult]:
    """Flip test-time-augmentation uncertainty of every frame (Wang et al. 2019).

    The served prediction is the identity member of the four flips, so each frame costs three
    more passes, run in the manifest's batches, a batch of frames at a time (memory stays
    that of three batches, whatever the series length). The map is, per pixel, the largest
    standard deviation of any class probability over the flips (0 to 0.5).
    """

    def predict(batch: FloatArray) -> FloatArray:
        logits = run_batched(run, manifest, batch)[OutputRole.LOGITS]
        return postprocess.probabilities_from_logits(logits, axis=1)

    step = max(1, manifest.preprocessing.batch_size)
    std = np.concatenate(
        [
            saliency.tta_flip_std_series(
                predict, x[i : i + step], identity_probs=probs[i : i + step]
            )
            for i in range(0, x.shape[0], step)
        ]
    )
    params = {"flips": ",".join(saliency.TTA_FLIPS), "statistic": "max over classes of the std"}
    return [
        SaliencyResult(
            index=i,
            method=SaliencyMethod.TTA_STD,
            values=postprocess.resize_float_map(m, size),
            display_range=(0.0, 0.5),
            params=dict(params),
        )
        for i, m in enumerate(std)
    ]


def _segmentation_occlusion(
    run: RunFn,
    manifest: Manifest,
    x: FloatArray,
    small: NDArray[np.uint8],
    size: tuple[int, int],
    budget: int,
    lesions: Sequence[Lesion] = (),
) -> list[SaliencyResult]:
    """Occlusion of the target structure's score on the frames where it is predicted.

    The budget (forward passes per job and model) is spent on the key frames of the target
    structure's ``lesions`` (largest first, so every lesion gets its explanation), then on
    the other frames with the largest predicted target area first, so cost stays predictable
    on long series.
    """
    value = _target_value(manifest)
    if value is None:
        return []
    areas = (small == value).reshape(small.shape[0], -1).sum(axis=1)
    by_area = [int(i) for i in np.argsort(-areas) if areas[i] > 0]
    first = [les.key_frame for les in lesions if les.value == value and areas[les.key_frame] > 0]
    order = list(dict.fromkeys([*first, *by_area]))
    spec = manifest.saliency
    maps: list[SaliencyResult] = []
    remaining = budget
    input_name = manifest.inputs[0].name
    logits_name = next(o.name for o in manifest.outputs if o.role is OutputRole.LOGITS)
    for i in order:
        if remaining <= 1:
            break
        region = small[i] == value

        def predict(batch: FloatArray, region: NDArray[np.bool_] = region) -> FloatArray:
            out = run([logits_name], {input_name: batch})[0]
            return saliency.region_score(np.asarray(out, dtype=np.float32), value, region)

        result = saliency.occlusion_map(
            predict,
            x[i],
            patch=spec.occlusion_patch,
            stride=spec.occlusion_stride,
            batch_size=manifest.preprocessing.batch_size,
            max_passes=remaining,
            refine_patch=spec.occlusion_refine_patch,
            refine_stride=spec.occlusion_refine_stride,
        )
        values, passes = result.map, result.forward_passes
        remaining -= passes
        maps.append(
            SaliencyResult(
                index=i,
                method=SaliencyMethod.OCCLUSION,
                values=postprocess.resize_float_map(np.asarray(values, np.float32), size),
                display_range=spec.display_range,
                target=spec.target_label,
                params=dict(result.params, passes=passes),
            )
        )
    return maps


def _classify(
    run: RunFn,
    manifest: Manifest,
    x: FloatArray,
    outputs: dict[OutputRole, FloatArray],
    size: tuple[int, int],
    budget: int,
    methods: Sequence[SaliencyMethod],
) -> ClassificationResult:
    spec = manifest.classification
    assert spec is not None
    logits = outputs[OutputRole.LOGITS].reshape(outputs[OutputRole.LOGITS].shape[0], -1)[:, -1]
    probs = postprocess.calibrated_probabilities(logits, spec.temperature, spec.bias)
    positive = probs >= spec.threshold
    band = manifest.review.probability_band
    uncertain = np.array([_in_band(float(p), band) for p in probs], dtype=bool)
    series_p = float(postprocess.aggregate_series(probs, spec.series_aggregation))
    series_index = int(np.argmax(probs))
    maps: list[SaliencyResult] = []
    sal = manifest.saliency
    if SaliencyMethod.CAM in methods and OutputRole.CAM in outputs:
        cams = outputs[OutputRole.CAM]
        for i in range(cams.shape[0]):
            cam = cams[i].reshape(-1, *cams.shape[-2:])[-1]
            maps.append(
                SaliencyResult(
                    index=i,
                    method=SaliencyMethod.CAM,
                    values=postprocess.resize_float_map(cam.astype(np.float32), size),
                    display_range=sal.display_range,
                    suppressed=not bool(positive[i]),
                    target=spec.positive_label,
                    params={"source": "graph output", "units": "logit contribution"},
                )
            )
    wanted = [m for m in PERTURBATION if m in methods]
    if wanted:
        maps.extend(
            _classifier_perturbation(run, manifest, x, probs, positive, size, budget, wanted)
        )
    return ClassificationResult(
        probabilities=probs,
        positive=positive,
        uncertain=uncertain,
        series_probability=series_p,
        series_positive=series_p >= spec.series_operating_point,
        series_uncertain=_in_band(series_p, band),
        series_index=series_index,
        saliency=maps,
    )


def _classifier_perturbation(
    run: RunFn,
    manifest: Manifest,
    x: FloatArray,
    probs: NDArray[np.float64],
    positive: NDArray[np.bool_],
    size: tuple[int, int],
    budget: int,
    wanted: Sequence[SaliencyMethod],
) -> list[SaliencyResult]:
    """Occlusion / RISE for a classifier, spent on the most probable frames within budget."""
    input_name = manifest.inputs[0].name
    logit_name = next(o.name for o in manifest.outputs if o.role is OutputRole.LOGITS)
    sal = manifest.saliency

    def predict(batch: FloatArray) -> FloatArray:
        out = np.asarray(run([logit_name], {input_name: batch})[0], dtype=np.float32)
        return out.reshape(out.shape[0], -1)[:, -1]

    maps: list[SaliencyResult] = []
    remaining = budget
    for i in [int(j) for j in np.argsort(-probs)]:
        if remaining <= 1:
            break
        for method in wanted:
            if remaining <= 1:
                continue
            result = _perturb(method, predict, x[i], manifest, remaining)
            values, passes = np.asarray(result.map, dtype=np.float32), result.forward_passes
            remaining -= passes
            maps.append(
                SaliencyResult(
                    index=i,
                    method=method,
                    values=postprocess.resize_float_map(values, size),
                    display_range=sal.display_range,
                    suppressed=not bool(positive[i]),
                    target=manifest.classification.positive_label
                    if manifest.classification
                    else None,
                    params=dict(result.params, passes=passes),
                )
            )
    return maps


def _perturb(
    method: SaliencyMethod,
    predict: Callable[[FloatArray], FloatArray],
    image: FloatArray,
    manifest: Manifest,
    remaining: int,
) -> saliency.SaliencyResult:
    sal = manifest.saliency
    if method is SaliencyMethod.OCCLUSION:
        return saliency.occlusion_map(
            predict,
            image,
            patch=sal.occlusion_patch,
            stride=sal.occlusion_stride,
            batch_size=manifest.preprocessing.batch_size,
            max_passes=remaining,
            refine_patch=sal.occlusion_refine_patch,
            refine_stride=sal.occlusion_refine_stride,
        )
    return saliency.rise_map(
        predict,
        image,
        n_masks=sal.rise_masks,
        grid=8,
        p_keep=0.5,
        seed=0,
        batch_size=manifest.preprocessing.batch_size,
        max_passes=remaining,
    )
