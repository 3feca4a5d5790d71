"""Saliency and uncertainty maps computed with forward passes only.

Pure functions: arrays and a prediction callable in, arrays out. Nothing here imports an
inference runtime; the caller wraps its session in a callable

* ``Predict``: ``(N, C, H, W) float32 -> (N,) float32``, the scalar score to explain — a
  classifier logit, or for segmentation the summed target-class logits inside a region
  (see ``region_predict``);
* ``PredictProbabilities``: ``(N, C, H, W) float32 -> (N, K, H, W) float32`` per-pixel class
  probabilities, for the test-time-augmentation uncertainty map.

Images are channel-first ``(C, H, W)`` float32 network inputs (the output of
``preprocess_frames`` for one frame, C = 1); maps are ``(H, W)`` float32 in the same pixel
grid, row-major (axis 0 = rows, top to bottom; axis 1 = columns, left to right, as in the
DICOM Pixel Data of the frame they explain, PS3.3 C.7.6.3.1.4).

Methods (background and measurements: Zhou 2016 CAM; Zeiler & Fergus 2014 occlusion;
Petsiuk 2018 RISE; Wang 2019 test-time augmentation; Adebayo 2018 sanity checks):

* the classifier's class activation map comes out of the graph (signed, exact
  decomposition of the logit for a GAP + linear head) and is only resampled here;
* occlusion and RISE are model-agnostic and cost a bounded number of forward passes;
  both replace pixels by a local median of the image (``median_baseline``), not by a
  constant, because constant squares are out of distribution and make the map highlight
  anatomy instead of evidence, and not by a Gaussian blur, because a blurred nodule is still
  a soft blob: to a CT model, a ground-glass nodule;
* softmax entropy and flip-TTA standard deviation are per-pixel uncertainty, not
  attribution: they say where a mask may be wrong, not why.

The metrics at the end (pointing game, energy in region, deletion/insertion, Spearman rank,
ROC AUC) and the difference-of-Gaussians baseline are used by the offline evaluation.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
from numpy.typing import NDArray
from scipy import ndimage, stats

FloatArray = NDArray[np.float32]
BoolArray = NDArray[np.bool_]
Predict = Callable[[FloatArray], FloatArray]
PredictProbabilities = Callable[[FloatArray], FloatArray]
ParamValue = int | float | str
Fill = Literal["median", "gaussian_blur"]

TTA_FLIPS: Final = ("identity", "horizontal", "vertical", "horizontal+vertical")
_FLOAT16_MAX: Final = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class SaliencyResult:
    """A map and what it cost.

    Attributes
    ----------
    map : float32, shape (H, W), in the units of the explained score (occlusion: score
        drop; RISE: score change relative to the mean masked score) or of the uncertainty.
    forward_passes : number of images the prediction callable was run on.
    params : the parameters actually used (after budget adjustment), for provenance.
    """

    map: FloatArray
    forward_passes: int
    params: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True)
class MapEncoding:
    """How a stored map was encoded (kept beside the bytes, e.g. in the saliency record).

    Attributes
    ----------
    dtype : ``"float16"`` or ``"float32"`` (the ``.npy`` header says the same).
    shape : (H, W).
    max_abs_error : largest absolute difference between the encoded and the input map.
    """

    dtype: str
    shape: tuple[int, ...]
    max_abs_error: float

    def to_json(self) -> dict[str, object]:
        """A JSON-serialisable dict of the fields."""
        return {"dtype": self.dtype, "shape": list(self.shape), "max_abs_error": self.max_abs_error}


@dataclass(frozen=True)
class DeletionInsertion:
    """Deletion / insertion AUCs (Petsiuk et al. 2018) of one map.

    Attributes
    ----------
    deletion_auc : area under score vs fraction of pixels replaced by the baseline, most
        salient first (lower = the map found what the score depends on).
    insertion_auc : area under score vs fraction of pixels restored from the baseline, most
        salient first (higher is better).
    forward_passes : 2 * (steps + 1).
    """

    deletion_auc: float
    insertion_auc: float
    forward_passes: int


# ---------------------------------------------------------------------------------------
# input checks and small utilities
# ---------------------------------------------------------------------------------------
def _as_image(x: NDArray[np.floating]) -> FloatArray:
    """Validate a (C, H, W) network input and return it as contiguous float32."""
    if x.ndim != 3:
        raise ValueError(f"image must be (C, H, W), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("image contains NaN or infinite values")
    return np.ascontiguousarray(x, dtype=np.float32)


def _as_map(m: NDArray[np.floating], name: str = "map") -> FloatArray:
    if m.ndim != 2:
        raise ValueError(f"{name} must be (H, W), got shape {m.shape}")
    if not np.all(np.isfinite(m)):
        raise ValueError(f"{name} contains NaN or infinite values")
    return np.asarray(m, dtype=np.float32)


def _scores(predict: Predict, batch: FloatArray) -> NDArray[np.float64]:
    """Run ``predict`` and check it returned one finite score per image."""
    out = np.asarray(predict(batch), dtype=np.float64).reshape(-1)
    if out.shape[0] != batch.shape[0]:
        raise ValueError(
            f"predict returned {out.shape[0]} scores for a batch of {batch.shape[0]} images"
        )
    if not np.all(np.isfinite(out)):
        raise ValueError("predict returned NaN or infinite scores")
    return out


def _linear_weights(coords: NDArray[np.float64], n_nodes: int) -> NDArray[np.float64]:
    """Linear-interpolation weights of sample positions on nodes ``0 .. n_nodes - 1``.

    ``coords`` (any shape, in node units) is clamped to the node range (edge replication);
    the result has shape ``coords.shape + (n_nodes,)`` and rows summing to 1 (hat functions).
    """
    u = np.clip(coords, 0.0, n_nodes - 1)
    nodes = np.arange(n_nodes, dtype=np.float64)
    weights: NDArray[np.float64] = np.maximum(0.0, 1.0 - np.abs(u[..., None] - nodes))
    return weights


def _centre_coords(n_out: int, n_in: int) -> NDArray[np.float64]:
    """Input coordinates of output pixel centres when resampling n_in -> n_out samples.

    Pixel centres are aligned (``align_corners=False`` in PyTorch, PIL's convention), so a
    map covering the whole network input covers the whole source frame.
    """
    return (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5


# ---------------------------------------------------------------------------------------
# class activation maps
# ---------------------------------------------------------------------------------------
def upsample_bilinear(m: NDArray[np.floating], shape: tuple[int, int]) -> FloatArray:
    """Resample a map to another pixel grid with bilinear interpolation.

    Parameters
    ----------
    m : float, shape (h, w).
    shape : (H, W) of the target grid, e.g. the source frame's (Rows, Columns)
        (PS3.3 C.7.6.3.1) when the network input was resized from it.

    Returns
    -------
    float32, shape (H, W). Pixel centres are aligned and edges replicated, matching
    PyTorch ``interpolate(..., mode="bilinear", align_corners=False)`` for upsampling.
    No anti-aliasing: down-sampling a map this way samples rather than averages it.
    """
    src = _as_map(m).astype(np.float64)
    h, w = src.shape
    rows = _linear_weights(_centre_coords(shape[0], h), h)  # (H, h)
    cols = _linear_weights(_centre_coords(shape[1], w), w)  # (W, w)
    out: FloatArray = (rows @ src @ cols.T).astype(np.float32)
    return out


def cam_map(
    cam: NDArray[np.floating],
    *,
    class_index: int = 0,
    output_shape: tuple[int, int] | None = None,
) -> FloatArray:
    """The signed class activation map of one class, as computed by the graph.

    Parameters
    ----------
    cam : float32, shape (K, h, w) (the graph's ``cam`` output for one frame) or (h, w).
        For a GAP + linear head, ``logit_k = mean(cam[k]) + bias_k`` exactly, so the map is
        in logit units per pixel.
    class_index : which class channel to take when ``cam`` has a class axis.
    output_shape : if given, (H, W) to resample to (see ``upsample_bilinear``), e.g. the
        source frame geometry.

    Returns
    -------
    float32, shape (h, w) or ``output_shape``. Signed: negative values are evidence against
    the class and are kept (rectify only for display, see ``display_map``).
    """
    arr = np.asarray(cam)
    if arr.ndim == 3:
        if not 0 <= class_index < arr.shape[0]:
            raise ValueError(f"class_index {class_index} out of range for {arr.shape[0]} classes")
        arr = arr[class_index]
    signed = _as_map(arr, "cam")
    if output_shape is not None and tuple(output_shape) != signed.shape:
        return upsample_bilinear(signed, output_shape)
    return signed.copy()


def display_map(m: NDArray[np.floating], display_range: tuple[float, float]) -> FloatArray:
    """Scale a map to [0, 1] on a fixed, model-specific range.

    Parameters
    ----------
    m : float, shape (H, W), in the map's own units.
    display_range : (vmin, vmax) from the model manifest. With vmin = 0 (the usual case)
        this keeps the positive part only — evidence *for* the explained score.

    Returns
    -------
    float32 (H, W) in [0, 1]: 0 at or below vmin, 1 at or above vmax. Never per-image
    min-max: a weak map must look weak.
    """
    vmin, vmax = float(display_range[0]), float(display_range[1])
    if not vmax > vmin:
        raise ValueError(f"display range must have vmax > vmin, got ({vmin}, {vmax})")
    scaled = (_as_map(m).astype(np.float64) - vmin) / (vmax - vmin)
    out: FloatArray = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------
# perturbation maps
# ---------------------------------------------------------------------------------------
def blurred_baseline(x: NDArray[np.floating], sigma: float) -> FloatArray:
    """The image with its information removed but its statistics kept: a Gaussian blur.

    Parameters
    ----------
    x : float32, shape (C, H, W).
    sigma : Gaussian standard deviation in pixels (spatial axes only; edges replicated).

    Returns
    -------
    float32, shape (C, H, W).
    """
    img = _as_image(x)
    if sigma <= 0:
        return img.copy()
    out: FloatArray = ndimage.gaussian_filter(
        img, sigma=(0.0, sigma, sigma), mode="nearest"
    ).astype(np.float32)
    return out


def median_baseline(x: NDArray[np.floating], size: int) -> FloatArray:
    """The image with its small structures removed but its edges kept: a local median.

    A median over a ``size`` x ``size`` window replaces any bright or dark structure narrower
    than about half the window (a nodule, a vessel) by the tissue around it, and keeps the
    large edges (pleura, body wall) where they are. This is what occlusion and RISE put in
    place of the pixels they hide. A Gaussian blur does not remove a nodule: it spreads it
    into a faint round blob, which a CT model reads as a ground-glass nodule. Measured once on
    the shipped classifier (1.1.0, 8 held-out true-positive slices): replacing the 16-pixel
    square around a nodule by its blur (sigma 8) *raised* the logit on 4 of them, by 14 to
    26, so occlusion pointed away from the lesion; the median (15-pixel window) of the same
    square lowered it on 7 and left the eighth unchanged. ``models/README.md`` has the
    evaluation's figures.

    For cost, the median is taken at half resolution (2 x 2 block means, window ``size / 2``)
    and resampled bilinearly to the input grid, a quarter of the work at full resolution: for
    a 5 x 256 x 256 input with a 32-pixel window, about a third of a second, under a tenth of
    what the occlusion map's 226 forward passes of the classifier cost.

    Parameters
    ----------
    x : float32, shape (C, H, W).
    size : window side in pixels of the input grid (spatial axes only; edges replicated).

    Returns
    -------
    float32, shape (C, H, W).
    """
    img = _as_image(x)
    if size < 2:
        return img.copy()
    c, h, w = img.shape
    if h < 4 or w < 4:  # too small to halve: the median at full resolution
        full: FloatArray = ndimage.median_filter(img, size=(1, size, size), mode="nearest")
        return full.astype(np.float32)
    h2, w2 = h // 2, w // 2
    small = img[:, : 2 * h2, : 2 * w2].reshape(c, h2, 2, w2, 2).mean(axis=(2, 4))
    window = max(3, (size // 2) | 1)  # odd, so the window is centred
    med = ndimage.median_filter(small, size=(1, window, window), mode="nearest")
    out = np.stack([upsample_bilinear(m, (h, w)) for m in med])
    return out.astype(np.float32)


def fill_image(x: NDArray[np.floating], fill: Fill, scale: float) -> FloatArray:
    """What a perturbation puts in place of hidden pixels.

    ``fill`` "median" is ``median_baseline(x, round(scale))`` (the default everywhere);
    "gaussian_blur" is ``blurred_baseline(x, scale / 2)``, kept for comparison.
    """
    if fill == "median":
        return median_baseline(x, round(scale))
    if fill == "gaussian_blur":
        return blurred_baseline(x, scale / 2.0)
    raise ValueError(f"unknown fill {fill!r}; expected 'median' or 'gaussian_blur'")


def _axis_starts(size: int, patch: int, stride: int) -> list[int]:
    """Patch start positions along one axis, the last one flush with the edge."""
    starts = list(range(0, size - patch + 1, stride))
    if starts[-1] + patch < size:
        starts.append(size - patch)
    return starts


def occlusion_grid(
    shape: tuple[int, int], *, patch: int, stride: int, max_passes: int
) -> tuple[tuple[int, int], int, list[int], list[int]]:
    """Plan an occlusion sweep that fits a forward-pass budget.

    Parameters
    ----------
    shape : (H, W) of the network input.
    patch : requested square patch side in pixels (clamped to the image).
    stride : requested stride in pixels.
    max_passes : budget, including the one unoccluded reference pass; at least 2.

    Returns
    -------
    ((patch_h, patch_w), stride, row_starts, column_starts). The stride is increased until
    ``1 + len(row_starts) * len(column_starts) <= max_passes``; when it exceeds the patch, the
    patch grows with it so that every pixel stays covered.
    """
    h, w = shape
    if patch < 1 or stride < 1:
        raise ValueError(f"patch and stride must be >= 1, got {patch} and {stride}")
    if max_passes < 2:
        raise ValueError(f"occlusion needs at least 2 forward passes, budget is {max_passes}")
    while True:
        ph, pw = min(max(patch, stride), h), min(max(patch, stride), w)
        ys, xs = _axis_starts(h, ph, stride), _axis_starts(w, pw, stride)
        if 1 + len(ys) * len(xs) <= max_passes:
            return (ph, pw), stride, ys, xs
        stride += 1


def occlusion_map(
    predict: Predict,
    x: NDArray[np.floating],
    *,
    patch: int,
    stride: int,
    batch_size: int = 64,
    max_passes: int = 512,
    fill: Fill = "median",
    refine_patch: int | None = None,
    refine_stride: int = 4,
) -> SaliencyResult:
    """Occlusion sensitivity (Zeiler & Fergus 2014) with a local-median fill, optionally
    refined around its strongest patch.

    Each patch position is replaced by the same region of the image's local median
    (``fill_image`` at the scale of the requested patch: structures up to about half a patch
    wide are removed); the drop of the score (reference - occluded) is added to every pixel
    the patch covered, and each pixel's sum is divided by the number of patches that covered
    it.

    A patch large enough for its fill to remove a lesion is too coarse to say where in the
    patch the lesion is: the map is made of stride x stride plateaus, and the lesion may sit
    anywhere under the strongest ones. With ``refine_patch`` a second sweep follows: patches
    of ``refine_patch`` pixels, ``refine_stride`` apart, whose centres cover the patch whose
    occlusion lowered the score most, filled from the *same* coarse-scale image (a smaller
    fill window would leave the lesion in place). Their per-pixel mean drop is added to the
    map inside that window, so the map keeps the coarse sweep's values everywhere and gains
    the finer sweep's detail where the evidence is (``refine_window`` in the params). The
    second sweep runs only when what is left of ``max_passes`` pays for all of it
    (``refine_passes`` 0 otherwise).

    Parameters
    ----------
    predict : ``(N, C, H, W) float32 -> (N,)`` score to explain; use the logit, not a
        saturating probability.
    x : float32, shape (C, H, W), the network input.
    patch, stride : patch side and stride in pixels; a patch of 1-2 lesion diameters and a
        stride of patch / 2 work well.
    batch_size : images per ``predict`` call (bounds memory: batch_size * C * H * W floats).
    max_passes : forward-pass budget including the reference pass; the stride grows to fit.
    fill : "median" (default) or "gaussian_blur" (sigma ``patch / 2``), see ``fill_image``.
    refine_patch, refine_stride : the second sweep's patch side and stride in pixels (None:
        no second sweep); see ``refine_starts``.

    Returns
    -------
    SaliencyResult with a float32 (H, W) map in score units (positive = occluding it lowers
    the score) and ``params`` = the patch/stride actually used.
    """
    img = _as_image(x)
    _, h, w = img.shape
    (ph, pw), used_stride, ys, xs = occlusion_grid(
        (h, w), patch=patch, stride=stride, max_passes=max_passes
    )
    filled = fill_image(img, fill, patch)
    reference = _scores(predict, img[None])[0]
    positions = [(y, x0) for y in ys for x0 in xs]
    drops = _occlusion_drops(predict, img, filled, positions, (ph, pw), reference, batch_size)
    result = _mean_cover(drops, positions, (ph, pw), (h, w))
    passes = 1 + len(positions)
    refined: list[tuple[int, int]] = []
    window = ""  # rows and columns the second sweep covered: y0,x0,y1,x1
    if refine_patch is not None:
        if refine_patch < 1 or refine_stride < 1:
            raise ValueError(
                f"refine patch and stride must be >= 1, got {refine_patch} and {refine_stride}"
            )
        best = positions[int(np.argmax(drops))]
        rp, planned = refine_positions((h, w), best, (ph, pw), refine_patch, refine_stride)
        if passes + len(planned) <= max_passes:
            refined = planned
            fine = _occlusion_drops(predict, img, filled, refined, rp, reference, batch_size)
            result += _mean_cover(fine, refined, rp, (h, w))
            passes += len(refined)
            (y0, x0), (y1, x1) = refined[0], refined[-1]
            window = f"{y0},{x0},{y1 + rp[0]},{x1 + rp[1]}"
    params: dict[str, ParamValue] = {
        "patch_h": ph,
        "patch_w": pw,
        "stride": used_stride,
        "requested_patch": patch,
        "requested_stride": stride,
        "fill": fill,
        "fill_scale_px": patch,
        "max_passes": max_passes,
    }
    if refine_patch is not None:
        params["refine_patch"] = refine_patch
        params["refine_stride"] = refine_stride
        params["refine_passes"] = len(refined)
        if refined:
            params["refine_window"] = window
    return SaliencyResult(map=result, forward_passes=passes, params=params)


def refine_positions(
    shape: tuple[int, int],
    best: tuple[int, int],
    patch: tuple[int, int],
    refine_patch: int,
    refine_stride: int,
) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The second occlusion sweep around the coarse patch starting at ``best``: its patch
    size (``refine_patch`` clamped to the image) and its patch positions, row-major."""
    h, w = shape
    rp = (min(refine_patch, h), min(refine_patch, w))
    ys = refine_starts(h, best[0], patch[0], rp[0], refine_stride)
    xs = refine_starts(w, best[1], patch[1], rp[1], refine_stride)
    return rp, [(y, x0) for y in ys for x0 in xs]


def refine_starts(
    size: int, best: int, patch: int, refine_patch: int, refine_stride: int
) -> list[int]:
    """Start positions along one axis of the second occlusion sweep.

    The refined patches' centres run from one edge of the coarse patch that starts at
    ``best`` to its other edge, ``refine_stride`` apart, clamped to the image: with a
    32-pixel coarse patch, 16-pixel refined patches and a stride of 4, nine starts per axis,
    81 passes.
    """
    half = refine_patch // 2
    starts = range(best - half, best + patch - half + 1, refine_stride)
    return sorted({min(max(v, 0), size - refine_patch) for v in starts})


def _occlusion_drops(
    predict: Predict,
    img: FloatArray,
    filled: FloatArray,
    positions: list[tuple[int, int]],
    patch: tuple[int, int],
    reference: float,
    batch_size: int,
) -> NDArray[np.float64]:
    """The score drop (reference - occluded) for each patch position, in batches."""
    ph, pw = patch
    drops = np.empty(len(positions), dtype=np.float64)
    step = max(1, batch_size)
    for start in range(0, len(positions), step):
        chunk = positions[start : start + step]
        batch = np.repeat(img[None], len(chunk), axis=0)
        for j, (y, x0) in enumerate(chunk):
            batch[j, :, y : y + ph, x0 : x0 + pw] = filled[:, y : y + ph, x0 : x0 + pw]
        drops[start : start + len(chunk)] = reference - _scores(predict, batch)
    return drops


def _mean_cover(
    drops: NDArray[np.float64],
    positions: list[tuple[int, int]],
    patch: tuple[int, int],
    shape: tuple[int, int],
) -> FloatArray:
    """Each pixel's mean drop over the patches that covered it (0 where none did)."""
    ph, pw = patch
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.float64)
    for d, (y, x0) in zip(drops, positions, strict=True):
        total[y : y + ph, x0 : x0 + pw] += d
        count[y : y + ph, x0 : x0 + pw] += 1.0
    out: FloatArray = (total / np.maximum(count, 1.0)).astype(np.float32)
    return out


def rise_map(
    predict: Predict,
    x: NDArray[np.floating],
    *,
    n_masks: int = 256,
    grid: int = 8,
    p_keep: float = 0.5,
    seed: int = 0,
    batch_size: int = 64,
    fill: Fill = "median",
    max_passes: int | None = None,
) -> SaliencyResult:
    """RISE (Petsiuk et al. 2018) with a local-median baseline.

    Random ``grid x grid`` binary masks (keep probability ``p_keep``) are bilinearly
    upsampled with a random sub-cell shift; each masked image is ``M * x + (1 - M) * b``,
    where ``b = fill_image(x, fill, cell)`` removes structures up to about half a grid cell.
    The map is ``sum_i (f_i - mean(f)) * M_i / (N * p_keep)``: the RISE estimator minus the
    mean masked score, so 0 means "no effect" and positive values mark pixels whose presence
    raises the score (in score units, suitable for a fixed display range).

    Parameters
    ----------
    predict : ``(N, C, H, W) float32 -> (N,)`` score to explain.
    x : float32, shape (C, H, W).
    n_masks : number of masks = forward passes (Monte-Carlo noise falls as 1/sqrt(n)).
    grid : cells per side of the low-resolution mask.
    p_keep : probability that a cell keeps the image.
    seed : seeds the masks; the same seed gives the same map regardless of ``batch_size``.
    batch_size : images per ``predict`` call.
    fill : "median" (default) or "gaussian_blur" (sigma half a grid cell), see ``fill_image``.
    max_passes : optional budget; ``n_masks`` is reduced to it.

    Returns
    -------
    SaliencyResult with a float32 (H, W) map.
    """
    img = _as_image(x)
    _, h, w = img.shape
    if grid < 1 or not 0.0 < p_keep < 1.0:
        raise ValueError(f"need grid >= 1 and 0 < p_keep < 1, got {grid} and {p_keep}")
    n = n_masks if max_passes is None else min(n_masks, max_passes)
    if n < 1:
        raise ValueError(f"RISE needs at least one mask, got n_masks={n_masks}")
    cell_h, cell_w = math.ceil(h / grid), math.ceil(w / grid)
    rng = np.random.default_rng(seed)
    # Draw all random numbers up front (small: n * (grid+1)^2) so the map does not depend on
    # how the masks are batched.
    cells = (rng.random((n, grid + 1, grid + 1)) < p_keep).astype(np.float32)
    shift_y = rng.integers(0, cell_h, size=n)
    shift_x = rng.integers(0, cell_w, size=n)
    baseline = fill_image(img, fill, max(cell_h, cell_w))
    weighted = np.zeros((h, w), dtype=np.float64)
    mask_sum = np.zeros((h, w), dtype=np.float64)
    score_sum = 0.0
    step = max(1, batch_size)
    rows_px = np.arange(h, dtype=np.float64)
    cols_px = np.arange(w, dtype=np.float64)
    for start in range(0, n, step):
        sl = slice(start, min(n, start + step))
        # Node coordinate of each pixel centre in the shifted, upsampled mask.
        wy = _linear_weights((rows_px[None] + shift_y[sl, None] + 0.5) / cell_h - 0.5, grid + 1)
        wx = _linear_weights((cols_px[None] + shift_x[sl, None] + 0.5) / cell_w - 0.5, grid + 1)
        # (b, H, W) masks in [0, 1]; float32 keeps a batch of large frames affordable.
        masks = wy.astype(np.float32) @ cells[sl] @ wx.astype(np.float32).transpose(0, 2, 1)
        batch = masks[:, None] * img[None] + (1.0 - masks[:, None]) * baseline[None]
        s = _scores(predict, np.ascontiguousarray(batch, dtype=np.float32))
        weighted += np.tensordot(s, masks.astype(np.float64), axes=(0, 0))
        mask_sum += masks.sum(axis=0, dtype=np.float64)
        score_sum += float(s.sum())
    centred = (weighted - (score_sum / n) * mask_sum) / (n * p_keep)
    params: dict[str, ParamValue] = {
        "n_masks": n,
        "grid": grid,
        "p_keep": p_keep,
        "seed": seed,
        "baseline": fill,
        "fill_scale_px": max(cell_h, cell_w),
    }
    return SaliencyResult(map=centred.astype(np.float32), forward_passes=n, params=params)


# ---------------------------------------------------------------------------------------
# segmentation: region score and uncertainty
# ---------------------------------------------------------------------------------------
def region_score(
    logits: NDArray[np.floating],
    label: int,
    region: NDArray[np.bool_],
    *,
    reduction: Literal["sum", "mean"] = "sum",
) -> NDArray[np.float32]:
    """The scalar a segmentation saliency map explains: target-class logits in a region.

    Parameters
    ----------
    logits : float, shape (N, K, H, W), the segmentation graph's logits.
    label : class index (channel) whose logits are summed.
    region : bool, shape (H, W), e.g. one predicted connected component.
    reduction : ``"sum"`` (Seg-Grad-CAM's target, Vinogradova et al. 2020) or ``"mean"``,
        which keeps the score independent of region size so that one fixed display range
        suits small and large structures.

    Returns
    -------
    float32, shape (N,).
    """
    if logits.ndim != 4:
        raise ValueError(f"logits must be (N, K, H, W), got shape {logits.shape}")
    if region.shape != logits.shape[2:]:
        raise ValueError(f"region shape {region.shape} does not match logits {logits.shape}")
    if not 0 <= label < logits.shape[1]:
        raise ValueError(f"label {label} out of range for {logits.shape[1]} classes")
    mask = np.asarray(region, dtype=bool)
    n_px = int(mask.sum())
    if n_px == 0:
        raise ValueError("region is empty")
    total = np.asarray(logits[:, label], dtype=np.float64)[:, mask].sum(axis=1)
    out: NDArray[np.float32] = (total / n_px if reduction == "mean" else total).astype(np.float32)
    return out


def region_predict(
    predict_logits: Callable[[FloatArray], FloatArray],
    *,
    label: int,
    region: NDArray[np.bool_],
    reduction: Literal["sum", "mean"] = "sum",
) -> Predict:
    """Turn a segmentation model into a ``Predict`` for occlusion/RISE of one structure.

    Parameters
    ----------
    predict_logits : ``(N, C, H, W) float32 -> (N, K, H, W)`` logits.
    label, region, reduction : see ``region_score``.

    Returns
    -------
    ``(N, C, H, W) float32 -> (N,) float32``.
    """
    frozen_region = np.array(region, dtype=bool)

    def predict(batch: FloatArray) -> FloatArray:
        return region_score(predict_logits(batch), label, frozen_region, reduction=reduction)

    return predict


def softmax(logits: NDArray[np.floating], axis: int = 0) -> FloatArray:
    """Numerically stable softmax along ``axis`` (the class axis), float32 out."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    out: FloatArray = (e / e.sum(axis=axis, keepdims=True)).astype(np.float32)
    return out


def softmax_entropy(probabilities: NDArray[np.floating]) -> FloatArray:
    """Per-pixel predictive entropy, normalised to [0, 1].

    Parameters
    ----------
    probabilities : float, shape (K, H, W), class probabilities summing to 1 over axis 0.
        K = 1 is read as a sigmoid foreground probability p (classes 1 - p and p).

    Returns
    -------
    float32, shape (H, W): ``-sum_k p_k log p_k / log K`` (0 = certain, 1 = uniform).
    """
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 3:
        raise ValueError(f"probabilities must be (K, H, W), got shape {p.shape}")
    if p.shape[0] == 1:
        p = np.concatenate([1.0 - p, p], axis=0)
    p = np.clip(p, 0.0, 1.0)
    k = p.shape[0]
    # 0 * log 0 = 0: evaluate the log only where p > 0.
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    out: FloatArray = np.clip(-plogp.sum(axis=0) / math.log(k), 0.0, 1.0).astype(np.float32)
    return out


def _flip(a: NDArray[np.floating], k: int) -> NDArray[np.floating]:
    """Flip ``k`` of ``TTA_FLIPS`` on the last two axes (each flip is its own inverse)."""
    if k == 1:
        return a[..., ::-1]
    if k == 2:
        return a[..., ::-1, :]
    if k == 3:
        return a[..., ::-1, ::-1]
    return a


def tta_flip_std_series(
    predict_probs: PredictProbabilities,
    x: NDArray[np.floating],
    *,
    label: int | None = None,
    identity_probs: NDArray[np.floating] | None = None,
) -> FloatArray:
    """Test-time-augmentation uncertainty of every frame of a series (Wang et al. 2019).

    Each frame is flipped four ways (identity, horizontal = columns reversed, vertical = rows
    reversed, both), run through the model, each output flipped back, and the per-pixel
    population standard deviation of the class probabilities taken over the four.

    Parameters
    ----------
    predict_probs : ``(N, C, H, W) float32 -> (N, K, H, W)`` class probabilities.
    x : float32, shape (F, C, H, W): the frames' network inputs.
    label : class index of one structure; ``None`` (default) takes, per pixel, the largest
        std of any class, so a disagreement about any boundary (lung or nodule) shows.
    identity_probs : (F, K, H, W) probabilities of the unflipped frames, when the caller
        already has them (the served prediction): then only 3 passes per frame are run.

    Returns
    -------
    float32, shape (F, H, W): std in probability units (at most 0.5).
    """
    frames = np.asarray(x, dtype=np.float32)
    if frames.ndim != 4:
        raise ValueError(f"x must be (F, C, H, W), got shape {frames.shape}")
    n = frames.shape[0]
    ks = [1, 2, 3] if identity_probs is not None else [0, 1, 2, 3]
    batch = np.ascontiguousarray(np.concatenate([_flip(frames, k) for k in ks]))
    probs = np.asarray(predict_probs(batch), dtype=np.float32)
    if probs.ndim != 4 or probs.shape[0] != len(ks) * n or probs.shape[2:] != frames.shape[2:]:
        raise ValueError(f"predict_probs returned shape {probs.shape} for {batch.shape}")
    restored = [_flip(probs[j * n : (j + 1) * n], k) for j, k in enumerate(ks)]
    if identity_probs is not None:
        restored.insert(0, np.asarray(identity_probs, dtype=np.float32))
    stack = np.stack(restored)  # (4, F, K, H, W)
    if label is not None:
        stack = stack[:, :, label : label + 1]
    std = stack.astype(np.float64).std(axis=0).max(axis=1)
    out: FloatArray = std.astype(np.float32)
    return out


def tta_flip_std(
    predict_probs: PredictProbabilities,
    x: NDArray[np.floating],
    *,
    label: int | None = None,
) -> SaliencyResult:
    """Test-time-augmentation uncertainty of one image (see ``tta_flip_std_series``).

    Parameters
    ----------
    predict_probs : ``(N, C, H, W) float32 -> (N, K, H, W)`` class probabilities.
    x : float32, shape (C, H, W).
    label : class index of one structure, or ``None`` for the largest std of any class.

    Returns
    -------
    SaliencyResult: float32 (H, W) std in probability units (at most 0.5), 4 forward passes.
    """
    img = _as_image(x)
    std = tta_flip_std_series(predict_probs, img[None], label=label)[0]
    params: dict[str, ParamValue] = {
        "flips": ",".join(TTA_FLIPS),
        "classes": "all" if label is None else str(label),
    }
    return SaliencyResult(map=std, forward_passes=4, params=params)


# ---------------------------------------------------------------------------------------
# compact storage
# ---------------------------------------------------------------------------------------
def encode_map(m: NDArray[np.floating]) -> tuple[bytes, MapEncoding]:
    """Serialise a map compactly as ``.npy`` bytes (NumPy format 1.0, no pickle).

    float16 halves the size and keeps ~3 significant digits, plenty for display and
    metrics; a map whose magnitude exceeds float16's range is stored as float32 instead.

    Parameters
    ----------
    m : float, shape (H, W), finite.

    Returns
    -------
    (bytes, MapEncoding).
    """
    src = _as_map(m).astype(np.float32)
    peak = float(np.abs(src).max()) if src.size else 0.0
    dtype = np.float16 if peak <= _FLOAT16_MAX else np.float32
    stored = src.astype(dtype)
    buf = io.BytesIO()
    np.save(buf, stored, allow_pickle=False)
    error = float(np.abs(stored.astype(np.float64) - src).max()) if src.size else 0.0
    return buf.getvalue(), MapEncoding(np.dtype(dtype).name, tuple(src.shape), error)


def decode_map(data: bytes) -> FloatArray:
    """Inverse of ``encode_map``: ``.npy`` bytes -> float32 (H, W). Pickles are refused."""
    arr = np.load(io.BytesIO(data), allow_pickle=False)
    if arr.dtype not in (np.float16, np.float32) or arr.ndim != 2:
        raise ValueError(f"not an encoded map: dtype {arr.dtype}, shape {arr.shape}")
    out: FloatArray = arr.astype(np.float32)
    return out


# ---------------------------------------------------------------------------------------
# evaluation metrics and the model-free baseline
# ---------------------------------------------------------------------------------------
def pointing_location(m: NDArray[np.floating]) -> tuple[int, int]:
    """Where a map points: its arg-max pixel, ties broken toward the centre of the tied set.

    Occlusion maps are piecewise constant (plateaus of stride x stride pixels), so the first
    maximum in raster order would sit on a plateau's top-left corner; the tied maximum
    nearest to the centroid of all tied maxima is the plateau's centre instead.

    Parameters
    ----------
    m : float, shape (H, W).

    Returns
    -------
    (row, column).
    """
    sal = _as_map(m)
    ys, xs = np.nonzero(sal == sal.max())
    d2 = (ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2
    k = int(np.argmin(d2))
    return int(ys[k]), int(xs[k])


def pointing_game(
    m: NDArray[np.floating], lesion_mask: NDArray[np.bool_], tolerance_px: float = 0.0
) -> bool:
    """Pointing game (Zhang et al. 2016): does the map's maximum fall on the lesion?

    Parameters
    ----------
    m : float, shape (H, W).
    lesion_mask : bool, shape (H, W), ground truth.
    tolerance_px : a hit also counts if the pointing location (see ``pointing_location``) is
        within this Euclidean distance (in pixels) of the lesion.

    Returns
    -------
    True for a hit. A constant map points nowhere and never hits.
    """
    sal = _as_map(m)
    mask = np.asarray(lesion_mask, dtype=bool)
    if mask.shape != sal.shape:
        raise ValueError(f"mask shape {mask.shape} does not match map {sal.shape}")
    if not mask.any() or sal.max() == sal.min():
        return False
    yx = pointing_location(sal)
    if mask[yx]:
        return True
    if tolerance_px <= 0:
        return False
    distance = ndimage.distance_transform_edt(~mask)
    return bool(distance[yx] <= tolerance_px)


def energy_in_region(m: NDArray[np.floating], mask: NDArray[np.bool_]) -> float:
    """Share of the map's positive part that lies inside ``mask`` (energy pointing game).

    Parameters
    ----------
    m : float, shape (H, W).
    mask : bool, shape (H, W).

    Returns
    -------
    float in [0, 1]; 0 if the map has no positive values. Chance level is the mask's area
    fraction.
    """
    sal = _as_map(m).astype(np.float64)
    region = np.asarray(mask, dtype=bool)
    if region.shape != sal.shape:
        raise ValueError(f"mask shape {region.shape} does not match map {sal.shape}")
    positive = np.maximum(sal, 0.0)
    total = float(positive.sum())
    return float(positive[region].sum() / total) if total > 0 else 0.0


def deletion_insertion_auc(
    predict: Predict,
    x: NDArray[np.floating],
    m: NDArray[np.floating],
    *,
    steps: int = 32,
    baseline: NDArray[np.floating] | None = None,
    batch_size: int = 64,
) -> DeletionInsertion:
    """Causal faithfulness of a map (Petsiuk et al. 2018).

    Pixels are ordered by decreasing map value (ties in raster order). Deletion replaces the
    first k pixels by ``baseline``; insertion starts from ``baseline`` and restores them;
    k runs over ``steps + 1`` evenly spaced counts from 0 to H * W. The AUC is the trapezoid
    area of score vs fraction of pixels changed.

    Parameters
    ----------
    predict : ``(N, C, H, W) float32 -> (N,)``; pass a probability (sigmoid of the logit) to
        get AUCs in [0, 1] that are comparable between maps of the same model.
    x : float32, shape (C, H, W).
    m : float, shape (H, W), the map to evaluate.
    steps : number of intervals of the curves.
    baseline : float32 (C, H, W) "removed" image; default ``blurred_baseline(x, max(H, W)/16)``.
    batch_size : images per ``predict`` call.

    Returns
    -------
    DeletionInsertion (compare with the AUCs of a random ordering of the same image).
    """
    img = _as_image(x)
    sal = _as_map(m)
    c, h, w = img.shape
    if sal.shape != (h, w):
        raise ValueError(f"map shape {sal.shape} does not match image {(h, w)}")
    base = blurred_baseline(img, max(h, w) / 16.0) if baseline is None else _as_image(baseline)
    if base.shape != img.shape:
        raise ValueError(f"baseline shape {base.shape} does not match image {img.shape}")
    n = h * w
    rank = np.empty(n, dtype=np.int64)
    rank[np.argsort(-sal.ravel(), kind="stable")] = np.arange(n)
    rank_map = rank.reshape(h, w)
    counts = np.linspace(0, n, steps + 1).round().astype(np.int64)
    jobs = [(k, deleting) for deleting in (True, False) for k in counts]
    scores = np.empty(len(jobs), dtype=np.float64)
    step = max(1, batch_size)
    for start in range(0, len(jobs), step):
        chunk = jobs[start : start + step]
        batch = np.empty((len(chunk), c, h, w), dtype=np.float32)
        for j, (k, deleting) in enumerate(chunk):
            changed = (rank_map < k)[None]
            batch[j] = np.where(changed, base, img) if deleting else np.where(changed, img, base)
        scores[start : start + len(chunk)] = _scores(predict, batch)
    fraction = counts / n
    deletion = float(np.trapezoid(scores[: steps + 1], fraction))
    insertion = float(np.trapezoid(scores[steps + 1 :], fraction))
    return DeletionInsertion(deletion, insertion, len(jobs))


def spearman_rank(a: NDArray[np.floating], b: NDArray[np.floating]) -> float:
    """Spearman rank correlation of two maps (flattened), as in Adebayo et al. 2018.

    Returns
    -------
    float in [-1, 1] (average ranks for ties); NaN if either map is constant.
    """
    x = np.asarray(a, dtype=np.float64).ravel()
    y = np.asarray(b, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"maps differ in size: {np.shape(a)} vs {np.shape(b)}")
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def roc_auc(scores: NDArray[np.floating], labels: NDArray[np.bool_]) -> float:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Parameters
    ----------
    scores : float, any shape; higher = more likely positive (e.g. an uncertainty map).
    labels : bool, same shape (e.g. the pixels the segmentation got wrong).

    Returns
    -------
    float in [0, 1]; NaN if only one class is present.
    """
    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels, dtype=bool).ravel()
    if s.shape != y.shape:
        raise ValueError(f"scores and labels differ in size: {s.shape} vs {y.shape}")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def dog_blob_map(x: NDArray[np.floating], sigmas: tuple[float, float] = (2.0, 6.0)) -> FloatArray:
    """Model-free baseline: a difference-of-Gaussians blob detector.

    A saliency method that does not beat this on lesion localisation explains nothing about
    the model (on phantoms, bright round lesions are found by image statistics alone).

    Parameters
    ----------
    x : float, shape (C, H, W) (channels are averaged) or (H, W).
    sigmas : (inner, outer) Gaussian standard deviations in pixels; tune the inner one to
        about the lesion radius / sqrt(2).

    Returns
    -------
    float32, shape (H, W): ``G(inner) * x - G(outer) * x`` (bright blobs positive).
    """
    arr = np.asarray(x, dtype=np.float64)
    img = arr.mean(axis=0) if arr.ndim == 3 else arr
    if img.ndim != 2:
        raise ValueError(f"image must be (C, H, W) or (H, W), got shape {arr.shape}")
    inner = ndimage.gaussian_filter(img, sigmas[0], mode="nearest")
    outer = ndimage.gaussian_filter(img, sigmas[1], mode="nearest")
    out: FloatArray = (inner - outer).astype(np.float32)
    return out
