"""Post-processing: network outputs → probabilities, labels and maps in source geometry.

Pure numpy. Resampling is centre-aligned (pixel centres at ``i + 0.5``, the convention
of Pillow and of ``align_corners=False`` in deep-learning frameworks), so a map resized
from the network grid back to Rows × Columns lines up with the pixels it came from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

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
    arr = np.asarray(labels, dtype=np.uint8)
    h, w = arr.shape[-2:]
    height, width = size
    if (h, w) == (height, width):
        return arr.copy()
    rows, cols = _centre_indices(h, height), _centre_indices(w, width)
    return arr[..., rows[:, None], cols[None, :]]


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


def calibrated_probability(logit: float, temperature: float) -> float:
    """Temperature-scaled probability of a binary classifier logit: σ(logit / T).

    Temperature scaling (Guo et al., 2017) divides the logit by a T fitted on held-out
    data (``manifest.classification.temperature``); T > 1 softens over-confident models.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    return float(sigmoid(np.float32(logit / temperature)))


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
