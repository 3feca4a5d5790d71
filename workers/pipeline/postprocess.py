"""Post-processing: network outputs → probabilities, labels and maps in source geometry.

Pure numpy, and scipy for connected components. Resampling is centre-aligned (pixel centres
at ``i + 0.5``, the convention of Pillow and of ``align_corners=False`` in deep-learning
frameworks), so a map resized from the network grid back to Rows × Columns lines up with the
pixels it came from.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import ndimage

FloatArray = NDArray[np.float32]
LabelArray = NDArray[np.uint8]

Aggregation = Literal["max", "mean", "noisy_or"]
_EPS: Final = 1e-12


def probabilities_from_logits(logits: ArrayLike, axis: int = 1) -> FloatArray:
    """Softmax over the class axis.

    Parameters
    ----------
    logits : float array, any shape; for segmentation (N, K, H, W) with classes on
        ``axis`` = 1.
    axis : the class axis.

    Returns
    -------
    float32 array of the same shape, non-negative, summing to 1 along ``axis``.
    Stable for large logits: the per-pixel maximum is subtracted before ``exp``.
    """
    z = np.asarray(logits, dtype=np.float32)
    z = z - z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    probabilities: FloatArray = z
    return probabilities


TTA_TRANSFORMS: Final = ("flip_columns", "reverse_context")


def averaged_probabilities(
    predict_logits: Callable[[FloatArray], FloatArray],
    x: FloatArray,
    transforms: Collection[str] = (),
    *,
    identity_logits: FloatArray | None = None,
) -> FloatArray:
    """Test-time augmentation: the mean softmax over every combination of input transforms.

    Parameters
    ----------
    predict_logits : ``(N, C, H, W) -> (N, K, H, W)`` segmentation logits (batched by the
        caller).
    x : (N, C, H, W) network inputs; with a 2.5-D input the C channels are the neighbouring
        slices in order.
    transforms : any of ``TTA_TRANSFORMS`` (a manifest's ``test_time_augmentation``):
        ``flip_columns`` adds the left-right mirror of every frame (its output is mirrored
        back); ``reverse_context`` adds the input with its neighbour slices in reverse order
        (the centre channel stays, so the output needs no mapping back).
    identity_logits : the untransformed input's logits, when the caller already has them.

    Returns
    -------
    float32 (N, K, H, W) probabilities: the plain softmax when no transform is asked for,
    else the mean over the 2, or 4, members (nnU-Net averages mirrored predictions the same
    way). Ask only for transforms the model was trained with: any other member is an input
    out of its distribution.
    """
    unknown = set(transforms) - set(TTA_TRANSFORMS)
    if unknown:
        raise ValueError(f"unknown test-time transforms {sorted(unknown)}")
    flips = (False, True) if "flip_columns" in transforms else (False,)
    reversals = (False, True) if "reverse_context" in transforms else (False,)
    members = [(f, r) for f in flips for r in reversals]
    total: FloatArray | None = None
    for flip, reverse in members:
        if not flip and not reverse and identity_logits is not None:
            logits = identity_logits
        else:
            xi = x[..., ::-1] if flip else x
            xi = xi[:, ::-1] if reverse else xi
            logits = predict_logits(np.ascontiguousarray(xi))
            logits = logits[..., ::-1] if flip else logits
        p = probabilities_from_logits(logits, axis=1)
        total = p if total is None else total + p
    assert total is not None
    if len(members) > 1:
        total /= np.float32(len(members))
    return total


def labels_from_probabilities(probabilities: ArrayLike, axis: int = 1) -> LabelArray:
    """Arg-max label per pixel.

    Parameters
    ----------
    probabilities : (N, K, H, W) (or any shape with classes on ``axis``), K ≤ 256.

    Returns
    -------
    uint8 array with ``axis`` removed, e.g. (N, H, W); ties go to the lower label.
    """
    p = np.asarray(probabilities)
    if p.shape[axis] > 256:
        raise ValueError(f"{p.shape[axis]} classes do not fit uint8 labels")
    labels: LabelArray = np.argmax(p, axis=axis).astype(np.uint8)
    return labels


def _centre_indices(source: int, target: int) -> NDArray[np.intp]:
    """Nearest source index for each target pixel centre."""
    centres = (np.arange(target, dtype=np.float64) + 0.5) * (source / target)
    return np.minimum(np.floor(centres).astype(np.intp), source - 1)


def resize_label_map(labels: ArrayLike, size: tuple[int, int]) -> LabelArray:
    """Nearest-neighbour resize of a label map (labels are categories: never interpolate).

    Parameters
    ----------
    labels : uint8, shape (h, w) (leading axes, e.g. frames, are kept).
    size : (H, W), typically (Rows, Columns) of the source image.

    Returns
    -------
    uint8 array of shape (..., H, W).
    """
    resized: LabelArray = resize_nearest(np.asarray(labels, dtype=np.uint8), size)
    return resized


def resize_nearest(values: NDArray[Any], size: tuple[int, int]) -> NDArray[Any]:
    """Nearest-neighbour resize of the last two axes of any array, keeping its dtype."""
    h, w = values.shape[-2:]
    height, width = size
    if (h, w) == (height, width):
        return values.copy()
    rows, cols = _centre_indices(h, height), _centre_indices(w, width)
    out: NDArray[Any] = values[..., rows[:, None], cols[None, :]]
    return out


def _linear_weights(
    source: int, target: int
) -> tuple[NDArray[np.intp], NDArray[np.intp], FloatArray]:
    """Neighbour indices and the weight of the upper one, centre-aligned, edge-clamped."""
    positions = (np.arange(target, dtype=np.float64) + 0.5) * (source / target) - 0.5
    positions = np.clip(positions, 0.0, source - 1)
    low = np.floor(positions).astype(np.intp)
    high = np.minimum(low + 1, source - 1)
    return low, high, (positions - low).astype(np.float32)


def resize_float_map(values: ArrayLike, size: tuple[int, int]) -> FloatArray:
    """Bilinear resize of a continuous map (probabilities, saliency, CAM).

    Parameters
    ----------
    values : float, shape (h, w) (leading axes are kept).
    size : (H, W).

    Returns
    -------
    float32 array of shape (..., H, W). Plain bilinear interpolation between the two
    nearest source centres on each axis (no anti-aliasing): values stay within the
    source range, which keeps probabilities in [0, 1].
    """
    arr = np.asarray(values, dtype=np.float32)
    h, w = arr.shape[-2:]
    height, width = size
    if (h, w) == (height, width):
        return arr.copy()
    r0, r1, fr = _linear_weights(h, height)
    c0, c1, fc = _linear_weights(w, width)
    # rows, then columns, each a weighted sum of two gathered neighbours; np.take and in-place
    # products give the same float32 values as the plain expression with fewer temporaries
    # (on a stack of frames the broadcast expression was about 5x slower)
    rows = np.take(arr, r0, axis=-2)
    rows *= (1 - fr)[:, None]
    below = np.take(arr, r1, axis=-2)
    below *= fr[:, None]
    rows += below
    out = np.take(rows, c0, axis=-1)
    out *= 1 - fc
    right = np.take(rows, c1, axis=-1)
    right *= fc
    out += right
    return out


def sigmoid(x: ArrayLike) -> FloatArray:
    """Logistic function, float32, without overflow for large |x|."""
    z = np.asarray(x, dtype=np.float32)
    out = np.empty_like(z)
    positive = z >= 0
    out[positive] = 1.0 / (1.0 + np.exp(-z[positive]))
    e = np.exp(z[~positive])
    out[~positive] = e / (1.0 + e)
    return out


def calibrated_probability(logit: float, temperature: float, bias: float = 0.0) -> float:
    """Calibrated probability of a binary classifier logit: σ(logit / T + b).

    Temperature scaling (Guo et al., 2017) divides the logit by a T fitted on held-out
    data (``manifest.classification.temperature``); T > 1 softens over-confident models. The
    bias ``b`` (Platt scaling, ``manifest.classification.bias``) corrects logits that are
    offset as well as over-confident; 0 is plain temperature scaling.
    """
    return float(calibrated_probabilities(np.float64(logit), temperature, bias))


def calibrated_probabilities(
    logits: ArrayLike, temperature: float, bias: float = 0.0
) -> NDArray[np.float64]:
    """``calibrated_probability`` of every logit, float64, same shape."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    z = np.asarray(logits, dtype=np.float64) / temperature + bias
    # σ without overflow: exp of a non-positive number only
    e = np.exp(-np.abs(z))
    out: NDArray[np.float64] = np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return out


def aggregate_series(probabilities: Sequence[float] | ArrayLike, method: Aggregation) -> float:
    """One probability for a series from per-image probabilities.

    Methods
    -------
    max : the most suspicious image decides.
    mean : average over images.
    noisy_or : ``1 - Π(1 - p_i)``, the probability that at least one image is positive
        if images were independent; computed in log space for stability.
    """
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), 0.0, 1.0)
    if p.size == 0:
        raise ValueError("cannot aggregate an empty series")
    if method == "max":
        return float(p.max())
    if method == "mean":
        return float(p.mean())
    if method == "noisy_or":
        return float(-np.expm1(np.sum(np.log1p(-np.minimum(p, 1.0 - _EPS)))))
    raise ValueError(f"unknown aggregation method {method!r}")


@dataclass(frozen=True)
class LabelStatistics:
    """Size of one label in a label map.

    ``area_mm2`` is pixel count × row spacing × column spacing (PS3.3 10.7.1.3 Pixel
    Spacing), summed over frames; None when the spacing is unknown.
    """

    value: int
    pixel_count: int
    area_mm2: float | None


def label_statistics(
    labels: ArrayLike,
    *,
    pixel_spacing: tuple[float, float] | None = None,
    include_background: bool = False,
) -> list[LabelStatistics]:
    """Pixel counts and physical areas per label present in ``labels``.

    Parameters
    ----------
    labels : uint8, shape (H, W) or (F, H, W), in source geometry.
    pixel_spacing : (row spacing, column spacing) in mm, or None.
    include_background : also report label 0.

    Returns
    -------
    One entry per label value present, in increasing value order.
    """
    arr = np.asarray(labels, dtype=np.uint8)
    counts = np.bincount(arr.ravel(), minlength=256)
    pixel_area = None
    if pixel_spacing is not None:
        pixel_area = float(pixel_spacing[0]) * float(pixel_spacing[1])
    first = 0 if include_background else 1
    return [
        LabelStatistics(
            value=value,
            pixel_count=int(counts[value]),
            area_mm2=None if pixel_area is None else float(counts[value]) * pixel_area,
        )
        for value in range(first, 256)
        if counts[value] > 0
    ]


@dataclass(frozen=True)
class Component:
    """One 3-D connected component of a segmented structure in a series.

    ``frames`` is the inclusive (first, last) frame index it spans; ``volume_mm3`` is its voxel
    count times the voxel volume (None when the geometry is unknown); ``max_probability`` is the
    highest probability of the structure inside it, the component's detection score.
    ``centroid`` is its centre of mass (frame, row, column) on the grid it was found on, and
    ``key_frame`` the frame holding most of its voxels (its largest cross-section).
    """

    voxels: int
    volume_mm3: float | None
    max_probability: float
    frames: tuple[int, int]
    kept: bool
    centroid: tuple[float, float, float] = (0.0, 0.0, 0.0)
    key_frame: int = 0

    @property
    def equivalent_diameter_mm(self) -> float | None:
        """Diameter of the sphere of the same volume, (6 V / π)^(1/3); None without geometry."""
        if self.volume_mm3 is None:
            return None
        return float((6.0 * self.volume_mm3 / np.pi) ** (1.0 / 3.0))


@dataclass(frozen=True)
class ComponentMap:
    """The result of ``filter_components``.

    ``labels`` are the cleaned labels; ``ids`` gives, per voxel, the 1-based index into
    ``components`` of the component it belonged to before cleaning (0: none).
    """

    labels: LabelArray
    ids: NDArray[np.int32]
    components: list[Component]


def filter_components(
    labels: ArrayLike,
    probability: ArrayLike,
    *,
    value: int,
    replacement: int,
    voxel_mm3: float | None,
    min_volume_mm3: float = 0.0,
    min_probability: float = 0.0,
) -> ComponentMap:
    """Remove the small or unconvincing 3-D components of one structure.

    Parameters
    ----------
    labels : uint8 (F, H, W), the frames of one series in order along the slice normal.
    probability : float (F, H, W), the probability of ``value`` on the same grid.
    value : the structure's label (e.g. nodule).
    replacement : the label removed voxels take (e.g. lung: a rejected nodule candidate lies
        in the lung it was found in).
    voxel_mm3 : volume of one voxel of this grid (row × column spacing × slice spacing), or
        None when the geometry is unknown: then the volume rule is not applied.
    min_volume_mm3 : components smaller than this are removed.
    min_probability : components whose highest probability is below this are removed.

    Components are 26-connected across frames, as a lesion spans neighbouring slices; every
    component found is reported, kept or not, in label order.
    """
    arr = np.asarray(labels, dtype=np.uint8)
    prob = np.asarray(probability, dtype=np.float32)
    if arr.ndim != 3 or prob.shape != arr.shape:
        raise ValueError(f"labels {arr.shape} and probability {prob.shape} must be equal (F, H, W)")
    out = arr.copy()
    ids, n = ndimage.label(arr == value, structure=np.ones((3, 3, 3), bool), output=np.int32)
    if n == 0:
        return ComponentMap(out, ids, [])
    fg = ids > 0
    members = ids[fg]
    voxels = np.bincount(members, minlength=n + 1)
    # highest probability per component: np.maximum.at over the few foreground voxels
    # (ndimage.maximum would sort the whole volume)
    best = np.zeros(n + 1, np.float32)
    np.maximum.at(best, members, prob[fg])
    extents = ndimage.find_objects(ids)
    coords = np.nonzero(fg)  # (frame, row, column) of each foreground voxel, ``members`` order
    sums = [np.bincount(members, weights=axis, minlength=n + 1) for axis in coords]
    # voxels per (component, frame): the key frame is each component's most populated frame
    per_frame = np.zeros((n + 1, arr.shape[0]), np.int64)
    np.add.at(per_frame, (members, coords[0]), 1)
    found: list[Component] = []
    drop = np.zeros(n + 1, bool)
    for c in range(1, n + 1):
        volume = None if voxel_mm3 is None else float(voxels[c]) * voxel_mm3
        small = volume is not None and volume < min_volume_mm3
        drop[c] = small or float(best[c]) < min_probability
        z = extents[c - 1][0]
        found.append(
            Component(
                voxels=int(voxels[c]),
                volume_mm3=volume,
                max_probability=float(best[c]),
                frames=(int(z.start), int(z.stop) - 1),
                kept=not bool(drop[c]),
                centroid=(
                    float(sums[0][c] / voxels[c]),
                    float(sums[1][c] / voxels[c]),
                    float(sums[2][c] / voxels[c]),
                ),
                key_frame=int(np.argmax(per_frame[c])),
            )
        )
    out[drop[ids] & fg] = replacement
    return ComponentMap(out, ids, found)


@dataclass(frozen=True)
class StructureRule:
    """One component filter with its label values resolved (see ``ComponentFilter``)."""

    value: int
    replacement: int
    min_volume_mm3: float
    min_probability: float


@dataclass(frozen=True)
class Segmentation:
    """Labels on the network grid after the component filters, and what the filters saw."""

    labels: LabelArray  # (F, h, w)
    components: dict[int, ComponentMap]  # by structure value


def segment(
    probabilities: ArrayLike,
    rules: Sequence[StructureRule] = (),
    *,
    voxel_mm3: float | None = None,
) -> Segmentation:
    """Per-pixel labels of a series from class probabilities, then the component filters.

    The one path from network output to served labels: the workers and the held-out
    evaluation both call it, so the reported metrics are those of the served masks.

    Parameters
    ----------
    probabilities : float (F, K, h, w) softmax output for the frames of one series, in order
        along the slice normal.
    rules : component filters, applied in order.
    voxel_mm3 : volume of one network-grid voxel, or None when the geometry is unknown.
    """
    p = np.asarray(probabilities, dtype=np.float32)
    labels = labels_from_probabilities(p, axis=1)
    maps: dict[int, ComponentMap] = {}
    for rule in rules:
        result = filter_components(
            labels,
            p[:, rule.value],
            value=rule.value,
            replacement=rule.replacement,
            voxel_mm3=voxel_mm3,
            min_volume_mm3=rule.min_volume_mm3,
            min_probability=rule.min_probability,
        )
        labels = result.labels
        maps[rule.value] = result
    return Segmentation(labels, maps)
