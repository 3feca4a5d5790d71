"""Saliency and uncertainty maps against prediction functions whose answer is known.

The models here are analytic callables (a score that reads pixels inside a known disc, a
pixel-wise probability with a known flip behaviour), so every expected map follows from the
definition of the method, not from a stored output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from workers.pipeline import saliency as S

H = W = 64
CENTRE = (40, 22)
RADIUS = 7


def _disc(shape: tuple[int, int] = (H, W), centre=CENTRE, radius=RADIUS) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _phantom() -> np.ndarray:
    """A bright disc on a textured background, shape (1, H, W)."""
    rng = np.random.default_rng(3)
    x = 0.25 + 0.05 * rng.standard_normal((H, W))
    x[_disc()] = 0.9
    return x[None].astype(np.float32)


class CountingDiscScore:
    """Score = mean intensity inside the disc; counts the images it was run on."""

    def __init__(self) -> None:
        self.images = 0
        self.calls = 0
        self.mask = _disc()

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32 and batch.ndim == 4
        self.images += batch.shape[0]
        self.calls += 1
        return batch[:, 0][:, self.mask].mean(axis=1).astype(np.float32)


# ----------------------------------------------------------------------------- CAM
def test_upsample_bilinear_matches_pillow_and_keeps_constants() -> None:
    rng = np.random.default_rng(0)
    small = rng.random((8, 6)).astype(np.float32)
    ours = S.upsample_bilinear(small, (32, 24))
    pil = np.asarray(
        Image.fromarray(small, mode="F").resize((24, 32), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    assert ours.shape == (32, 24) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, pil, atol=1e-5)
    const = S.upsample_bilinear(np.full((4, 4), 2.5, np.float32), (17, 9))
    np.testing.assert_allclose(const, 2.5, atol=1e-6)


def test_cam_map_selects_class_keeps_sign_and_resamples() -> None:
    cam = np.zeros((2, 4, 4), np.float32)
    cam[1, 0, 0] = -3.0
    cam[1, 3, 3] = 5.0
    out = S.cam_map(cam, class_index=1)
    assert out.min() == -3.0 and out.max() == 5.0  # signed, not rectified
    big = S.cam_map(cam, class_index=1, output_shape=(16, 16))
    assert big.shape == (16, 16)
    # scale 4, pixel centres aligned: output rows 14-15 sample input row 3 (edge replicated)
    np.testing.assert_allclose(big[14:, 14:], 5.0)
    np.testing.assert_allclose(big[:2, :2], -3.0)
    assert big[13, 13] < 5.0
    with pytest.raises(ValueError, match="class_index"):
        S.cam_map(cam, class_index=2)
    with pytest.raises(ValueError, match="NaN"):
        S.cam_map(np.full((3, 3), np.nan, np.float32))


def test_display_map_uses_the_fixed_range_not_the_image_maximum() -> None:
    strong = np.array([[0.0, 1.0], [2.0, -1.0]], np.float32)
    weak = strong / 4
    d_strong = S.display_map(strong, (0.0, 2.0))
    d_weak = S.display_map(weak, (0.0, 2.0))
    np.testing.assert_allclose(d_strong, [[0.0, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(d_weak, [[0.0, 0.125], [0.25, 0.0]])
    with pytest.raises(ValueError, match="vmax > vmin"):
        S.display_map(strong, (1.0, 1.0))


# ----------------------------------------------------------------------- occlusion
def test_blurred_baseline_blurs_space_not_channels() -> None:
    x = np.zeros((2, 21, 21), np.float32)
    x[0, 10, 10] = 1.0
    b = S.blurred_baseline(x, 2.0)
    assert b.shape == x.shape and b.dtype == np.float32
    assert b[1].max() == 0.0  # nothing leaked into the other channel
    assert b[0].sum() == pytest.approx(1.0, rel=1e-4)
    assert b[0, 10, 10] == pytest.approx(1 / (2 * math.pi * 4), rel=0.05)


def test_median_baseline_removes_small_structures_and_keeps_edges() -> None:
    """A nodule-sized disc disappears into its surroundings; a large edge stays in place."""
    x = np.zeros((2, 64, 64), np.float32)
    x[0, :, 32:] = 1.0  # a large edge (body wall, pleura)
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 16) ** 2 + (xx - 12) ** 2 <= 3**2  # a 7-pixel nodule on the dark side
    x[0][disc] = 1.0
    b = S.median_baseline(x, 16)
    assert b.shape == x.shape and b.dtype == np.float32
    assert b[0][disc].max() < 0.05  # the disc is gone, not spread into a faint blob
    assert b[1].max() == 0.0  # channels are filtered separately
    np.testing.assert_allclose(b[0, :, :28], 0.0, atol=1e-6)
    np.testing.assert_allclose(b[0, :, 36:], 1.0, atol=1e-6)
    # the blur keeps a soft blob where the disc was
    assert S.blurred_baseline(x, 8.0)[0, 16, 12] > 0.05
    assert S.median_baseline(x, 1)[0][disc].min() == 1.0  # no window: the image itself
    odd = S.median_baseline(np.ones((1, 3, 5), np.float32), 4)
    np.testing.assert_allclose(odd, 1.0)


def test_fill_image_names_its_fills() -> None:
    x = np.random.default_rng(0).random((1, 16, 16)).astype(np.float32)
    np.testing.assert_array_equal(S.fill_image(x, "median", 8), S.median_baseline(x, 8))
    np.testing.assert_array_equal(S.fill_image(x, "gaussian_blur", 8), S.blurred_baseline(x, 4))
    with pytest.raises(ValueError, match="unknown fill"):
        S.fill_image(x, "mean", 8)  # type: ignore[arg-type]


@pytest.mark.parametrize(("y0", "x0"), [(13, 18), (1, 30)])  # interior; edge (less coverage)
def test_occlusion_of_a_single_pixel_score_is_exact(y0: int, x0: int) -> None:
    """score = x[y0, x0]; every patch covering that pixel drops it by x - fill(x) there."""
    rng = np.random.default_rng(1)
    x = rng.random((1, 32, 32)).astype(np.float32)
    patch, stride = 8, 4

    def predict(batch: np.ndarray) -> np.ndarray:
        return batch[:, 0, y0, x0].copy()

    res = S.occlusion_map(predict, x, patch=patch, stride=stride, max_passes=10_000)
    fill = S.median_baseline(x, patch)
    drop = float(x[0, y0, x0] - fill[0, y0, x0])
    starts = np.arange(0, 32 - patch + 1, stride)
    cover = [s for s in starts if s <= y0 < s + patch]
    assert res.map[y0, x0] == pytest.approx(drop, rel=1e-5)
    # A pixel sharing only some covering patches gets the proportional share.
    py, px = y0, x0 - stride - 2
    own = [s for s in starts if s <= px < s + patch]
    shared = [s for s in own if s <= x0 < s + patch]
    expected = drop * (len(cover) * len(shared)) / (len(cover) * len(own))
    assert res.map[py, px] == pytest.approx(expected, rel=1e-5)
    assert res.map[31, 0] == 0.0  # no patch over (31, 0) touches the scored pixel
    assert res.forward_passes == 1 + len(starts) ** 2


def test_occlusion_map_peaks_inside_the_disc() -> None:
    predict = CountingDiscScore()
    res = S.occlusion_map(predict, _phantom(), patch=8, stride=4, max_passes=1000)
    disc = _disc()
    assert S.pointing_game(res.map, disc)
    assert S.energy_in_region(res.map, disc) > 10 * disc.mean()
    far = np.ones((H, W), bool)
    far[: CENTRE[0] + RADIUS + 12, : CENTRE[1] + RADIUS + 12] = False
    np.testing.assert_allclose(res.map[far], 0.0, atol=1e-5)  # float32 batch-order noise


@pytest.mark.parametrize("budget", [2, 17, 50, 200])
def test_occlusion_respects_the_forward_pass_budget(budget: int) -> None:
    predict = CountingDiscScore()
    res = S.occlusion_map(predict, _phantom(), patch=8, stride=2, max_passes=budget, batch_size=7)
    assert predict.images == res.forward_passes <= budget
    assert res.params["stride"] >= 2
    full = S.occlusion_grid((H, W), patch=8, stride=2, max_passes=10**9)
    if 1 + len(full[2]) * len(full[3]) > budget:
        assert res.params["stride"] > 2  # had to coarsen
    # every pixel stays covered: the map is non-zero wherever the disc pixels were changed
    assert res.map[_disc()].min() > 0.0
    assert math.ceil(res.forward_passes / 7) <= predict.calls <= res.forward_passes


def _small_disc_image(centre: tuple[int, int], radius: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(4)
    x = 0.25 + 0.02 * rng.standard_normal((H, W))
    disc = _disc(centre=centre, radius=radius)
    x[disc] = 0.9
    return x[None].astype(np.float32), disc


def test_refined_occlusion_points_into_a_small_lesion_the_coarse_plateau_misses() -> None:
    """A 5-pixel disc under a 32-pixel patch: the coarse map's strongest plateau is 16 x 16
    pixels and its centre lies off the disc; the finer sweep (16-pixel patches, coarse-scale
    fill) puts the maximum on it, adds nothing outside its window and costs its passes."""
    x, disc = _small_disc_image((21, 21), 2)

    def score(batch: np.ndarray) -> np.ndarray:
        return batch[:, 0][:, disc].mean(axis=1).astype(np.float32)

    coarse = S.occlusion_map(score, x, patch=32, stride=16, max_passes=10_000)
    refined = S.occlusion_map(
        score, x, patch=32, stride=16, max_passes=10_000, refine_patch=16, refine_stride=4
    )
    assert not S.pointing_game(coarse.map, disc)
    assert S.pointing_game(refined.map, disc)
    assert S.energy_in_region(refined.map, disc) > S.energy_in_region(coarse.map, disc)
    starts = S.refine_starts(H, 0, 32, 16, 4)  # the strongest coarse patch starts at (0, 0)
    assert starts == [0, 4, 8, 12, 16, 20, 24]  # clamped at the image edge, deduplicated
    assert refined.forward_passes == coarse.forward_passes + len(starts) ** 2
    assert refined.params["refine_passes"] == len(starts) ** 2
    assert refined.params["refine_window"] == "0,0,40,40"
    np.testing.assert_array_equal(refined.map[40:, :], coarse.map[40:, :])
    np.testing.assert_array_equal(refined.map[:, 40:], coarse.map[:, 40:])


def test_refined_occlusion_is_skipped_when_the_budget_cannot_pay_for_it() -> None:
    x, disc = _small_disc_image((21, 21), 2)

    def score(batch: np.ndarray) -> np.ndarray:
        return batch[:, 0][:, disc].mean(axis=1).astype(np.float32)

    coarse = S.occlusion_map(score, x, patch=32, stride=16, max_passes=10_000)
    short = S.occlusion_map(
        score, x, patch=32, stride=16, max_passes=coarse.forward_passes + 48,
        refine_patch=16, refine_stride=4,
    )  # fmt: skip
    assert short.forward_passes == coarse.forward_passes
    assert short.params["refine_passes"] == 0 and "refine_window" not in short.params
    np.testing.assert_array_equal(short.map, coarse.map)
    with pytest.raises(ValueError, match="refine patch"):
        S.occlusion_map(score, x, patch=32, stride=16, refine_patch=0)


def test_occlusion_rejects_an_impossible_budget() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        S.occlusion_map(CountingDiscScore(), _phantom(), patch=8, stride=4, max_passes=1)


def test_predict_must_return_one_finite_score_per_image() -> None:
    def wrong_count(batch: np.ndarray) -> np.ndarray:
        return np.zeros(batch.shape[0] + 1, np.float32)

    def nan_scores(batch: np.ndarray) -> np.ndarray:
        return np.full(batch.shape[0], np.nan, np.float32)

    with pytest.raises(ValueError, match="scores for a batch"):
        S.occlusion_map(wrong_count, _phantom(), patch=8, stride=8)
    with pytest.raises(ValueError, match="NaN"):
        S.rise_map(nan_scores, _phantom(), n_masks=4)


# ---------------------------------------------------------------------------- RISE
def test_rise_map_peaks_inside_the_disc_and_is_seeded() -> None:
    predict = CountingDiscScore()
    x = _phantom()
    res = S.rise_map(predict, x, n_masks=400, grid=8, p_keep=0.5, seed=7, batch_size=64)
    disc = _disc()
    assert predict.images == res.forward_passes == 400
    assert S.pointing_game(res.map, disc, tolerance_px=RADIUS)
    assert res.map[disc].mean() > 5 * abs(res.map[~disc].mean())
    assert S.energy_in_region(res.map, disc) > 5 * disc.mean()
    again = S.rise_map(CountingDiscScore(), x, n_masks=400, seed=7, batch_size=33)
    np.testing.assert_allclose(again.map, res.map, rtol=1e-5, atol=1e-7)
    other = S.rise_map(CountingDiscScore(), x, n_masks=400, seed=8)
    assert np.abs(other.map - res.map).max() > 1e-4


def test_rise_budget_caps_the_masks() -> None:
    predict = CountingDiscScore()
    res = S.rise_map(predict, _phantom(), n_masks=500, max_passes=120)
    assert predict.images == res.forward_passes == 120
    assert res.params["n_masks"] == 120


def test_rise_of_a_score_that_ignores_the_image_is_zero() -> None:
    def constant(batch: np.ndarray) -> np.ndarray:
        return np.full(batch.shape[0], 3.0, np.float32)

    res = S.rise_map(constant, _phantom(), n_masks=50)
    np.testing.assert_allclose(res.map, 0.0, atol=1e-6)


# ------------------------------------------------------------------- segmentation
def test_region_score_sums_or_averages_target_logits() -> None:
    logits = np.zeros((2, 3, 4, 4), np.float32)
    logits[0, 2] = 1.0
    logits[1, 2, :2, :2] = 4.0
    region = np.zeros((4, 4), bool)
    region[:2, :2] = True
    np.testing.assert_allclose(S.region_score(logits, 2, region), [4.0, 16.0])
    np.testing.assert_allclose(S.region_score(logits, 2, region, reduction="mean"), [1.0, 4.0])
    with pytest.raises(ValueError, match="empty"):
        S.region_score(logits, 2, np.zeros((4, 4), bool))


def test_region_predict_explains_one_structure() -> None:
    """A 'segmenter' whose class-1 logit is the image itself: occluding the region lowers it."""
    disc = _disc()

    def seg_logits(batch: np.ndarray) -> np.ndarray:
        return np.concatenate([-batch, batch], axis=1)

    predict = S.region_predict(seg_logits, label=1, region=disc, reduction="mean")
    res = S.occlusion_map(predict, _phantom(), patch=8, stride=4)
    assert S.pointing_game(res.map, disc)


def test_softmax_entropy_bounds_and_a_known_value() -> None:
    k = 4
    uniform = np.full((k, 3, 3), 1 / k, np.float32)
    np.testing.assert_allclose(S.softmax_entropy(uniform), 1.0, atol=1e-6)
    onehot = np.zeros((k, 3, 3), np.float32)
    onehot[2] = 1.0
    np.testing.assert_allclose(S.softmax_entropy(onehot), 0.0, atol=1e-7)
    two = np.stack([np.full((2, 2), 0.25), np.full((2, 2), 0.75)]).astype(np.float32)
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)) / math.log(2)
    np.testing.assert_allclose(S.softmax_entropy(two), expected, rtol=1e-6)
    # one channel = sigmoid probability of the foreground
    np.testing.assert_allclose(
        S.softmax_entropy(np.full((1, 2, 2), 0.75, np.float32)), expected, rtol=1e-6
    )
    rng = np.random.default_rng(0)
    probs = S.softmax(rng.normal(size=(3, 16, 16)) * 3, axis=0)
    ent = S.softmax_entropy(probs)
    assert ent.dtype == np.float32 and ent.min() >= 0.0 and ent.max() <= 1.0


def test_tta_flip_std_is_zero_for_a_flip_equivariant_model() -> None:
    def pixelwise(batch: np.ndarray) -> np.ndarray:
        p = 1 / (1 + np.exp(-(batch - 0.5) * 8))
        return np.concatenate([1 - p, p], axis=1).astype(np.float32)

    res = S.tta_flip_std(pixelwise, _phantom(), label=1)
    assert res.forward_passes == 4
    np.testing.assert_allclose(res.map, 0.0, atol=1e-7)


def test_tta_flip_std_matches_the_analytic_value_for_a_column_ramp() -> None:
    """p = x + c * column / W: horizontal flips see the ramp reversed, vertical ones do not.

    After flipping back, two outputs hold x + c*j/W and two x + c*(W-1-j)/W, so the
    population std is c * |2j - (W - 1)| / (2W), independent of x and of the row.
    """
    c = 0.4
    rng = np.random.default_rng(2)
    x = (0.5 * rng.random((1, 12, W))).astype(np.float32)  # asymmetric on purpose

    def ramp_model(batch: np.ndarray) -> np.ndarray:
        ramp = c * np.arange(W, dtype=np.float32) / W
        p = batch + ramp
        return np.concatenate([1 - p, p], axis=1)

    res = S.tta_flip_std(ramp_model, x, label=1)
    j = np.arange(W)
    expected = c * np.abs(2 * j - (W - 1)) / (2 * W)
    np.testing.assert_allclose(res.map, np.broadcast_to(expected, (12, W)), atol=1e-6)


def test_tta_series_reuses_the_served_prediction_and_takes_the_largest_class_std() -> None:
    """Three classes; only class 2 depends on the column, so it alone disagrees under flips.

    With ``label=None`` the map is the largest std of any class: class 2's ramp std here,
    while ``label=0`` (constant) gives zero. Passing the identity probabilities saves a pass
    per frame and changes nothing.
    """
    c = 0.3
    rng = np.random.default_rng(3)
    x = (0.2 * rng.random((2, 1, 8, W))).astype(np.float32)
    calls: list[int] = []

    def model(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        ramp = c * np.arange(W, dtype=np.float32) / W
        p2 = 0.1 + 0.0 * batch + ramp
        p0 = np.full_like(p2, 0.2)
        return np.concatenate([p0, 1 - p0 - p2, p2], axis=1).astype(np.float32)

    full = S.tta_flip_std_series(model, x)
    assert calls == [8] and full.shape == (2, 8, W) and full.dtype == np.float32
    j = np.arange(W)
    expected = c * np.abs(2 * j - (W - 1)) / (2 * W)
    np.testing.assert_allclose(full, np.broadcast_to(expected, (2, 8, W)), atol=1e-6)
    reused = S.tta_flip_std_series(model, x, identity_probs=model(x))
    assert calls[-2:] == [2, 6]  # the identity pass was the caller's
    np.testing.assert_allclose(reused, full, atol=1e-7)
    np.testing.assert_allclose(S.tta_flip_std_series(model, x, label=0), 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="F, C, H, W"):
        S.tta_flip_std_series(model, x[0])


# ------------------------------------------------------------------------ storage
def test_encode_decode_round_trip_in_float16() -> None:
    rng = np.random.default_rng(4)
    m = (rng.normal(size=(37, 51)) * 3).astype(np.float32)
    data, enc = S.encode_map(m)
    assert data[:6] == b"\x93NUMPY"
    assert enc.dtype == "float16" and enc.shape == (37, 51)
    assert len(data) < m.nbytes * 0.6
    back = S.decode_map(data)
    assert back.dtype == np.float32 and back.shape == m.shape
    np.testing.assert_allclose(back, m, rtol=2**-11, atol=1e-7)
    assert enc.max_abs_error == pytest.approx(float(np.abs(back - m).max()))
    assert enc.to_json()["shape"] == [37, 51]


def test_encode_falls_back_to_float32_beyond_float16_range() -> None:
    m = np.array([[1e5, -2.0]], np.float32)
    data, enc = S.encode_map(m)
    assert enc.dtype == "float32" and enc.max_abs_error == 0.0
    np.testing.assert_array_equal(S.decode_map(data), m)
    with pytest.raises(ValueError, match="NaN"):
        S.encode_map(np.array([[np.inf]], np.float32))


def test_decode_refuses_what_is_not_a_map() -> None:
    import io

    buf = io.BytesIO()
    np.save(buf, np.zeros((2, 2, 2), np.float32))
    with pytest.raises(ValueError, match="not an encoded map"):
        S.decode_map(buf.getvalue())
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        S.decode_map(buf.getvalue())


# ------------------------------------------------------------------------ metrics
def test_pointing_game_strict_tolerant_and_flat() -> None:
    lesion = _disc()
    m = np.zeros((H, W), np.float32)
    m[CENTRE] = 1.0
    assert S.pointing_game(m, lesion)
    m = np.zeros((H, W), np.float32)
    m[CENTRE[0], CENTRE[1] + RADIUS + 3] = 1.0  # 3 px outside the rim
    assert not S.pointing_game(m, lesion)
    assert not S.pointing_game(m, lesion, tolerance_px=2)
    assert S.pointing_game(m, lesion, tolerance_px=3)
    assert not S.pointing_game(np.zeros((H, W), np.float32), lesion)


def test_pointing_location_breaks_ties_at_the_plateau_centre() -> None:
    m = np.zeros((20, 20), np.float32)
    m[4:9, 10:15] = 2.0  # a 5 x 5 plateau, as occlusion produces
    assert S.pointing_location(m) == (6, 12)


def test_energy_in_region_counts_only_the_positive_part() -> None:
    m = np.zeros((4, 4), np.float32)
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    m[:2, :2] = 1.0  # 4 inside
    m[3, :] = 1.5  # 6 outside
    m[2, :] = -10.0  # negative evidence does not count
    assert S.energy_in_region(m, mask) == pytest.approx(0.4)
    assert S.energy_in_region(-np.abs(m), mask) == 0.0


def test_deletion_insertion_rank_a_faithful_map_above_a_random_one() -> None:
    x = _phantom()
    predict = CountingDiscScore()
    good = S.deletion_insertion_auc(predict, x, _disc().astype(np.float32), steps=16)
    assert good.forward_passes == 34 == predict.images
    rng = np.random.default_rng(5)
    rand = S.deletion_insertion_auc(predict, x, rng.random((H, W)).astype(np.float32), steps=16)
    worst = S.deletion_insertion_auc(predict, x, (~_disc()).astype(np.float32), steps=16)
    assert good.deletion_auc < rand.deletion_auc < worst.deletion_auc
    assert good.insertion_auc > rand.insertion_auc > worst.insertion_auc


def test_deletion_curve_end_points_are_the_image_and_the_baseline() -> None:
    """With steps=1 the curves have two points; the AUC is their mean."""
    x = _phantom()
    base = np.zeros_like(x)
    predict = CountingDiscScore()
    res = S.deletion_insertion_auc(predict, x, np.ones((H, W), np.float32), steps=1, baseline=base)
    full = float(predict(x[None])[0])
    assert res.deletion_auc == pytest.approx(full / 2, rel=1e-6)
    assert res.insertion_auc == pytest.approx(full / 2, rel=1e-6)


def test_spearman_rank_agrees_with_scipy() -> None:
    rng = np.random.default_rng(6)
    a = rng.normal(size=(16, 16))
    b = a + rng.normal(size=(16, 16))
    assert S.spearman_rank(a, b) == pytest.approx(stats.spearmanr(a.ravel(), b.ravel())[0])
    assert S.spearman_rank(a, np.exp(a)) == pytest.approx(1.0)
    assert S.spearman_rank(a, -a) == pytest.approx(-1.0)
    assert math.isnan(S.spearman_rank(a, np.zeros_like(a)))


def test_roc_auc_with_ties() -> None:
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    labels = np.array([False, False, True, True])
    assert S.roc_auc(scores, labels) == pytest.approx(0.75)
    assert S.roc_auc(np.array([1.0, 1.0, 1.0]), np.array([True, False, False])) == 0.5
    assert S.roc_auc(-scores, labels) == pytest.approx(0.25)
    assert math.isnan(S.roc_auc(scores, np.zeros(4, bool)))


def test_entropy_flags_the_pixels_a_segmentation_gets_wrong() -> None:
    """Uncertainty -> error AUC on a synthetic probability map with known errors."""
    rng = np.random.default_rng(8)
    truth = _disc()
    margin = np.where(truth, 1.0, -1.0) * rng.uniform(0.0, 4.0, size=(H, W))
    logits = margin + rng.normal(scale=1.0, size=(H, W))
    p = 1 / (1 + np.exp(-logits))
    errors = (p > 0.5) != truth
    auc = S.roc_auc(S.softmax_entropy(p[None].astype(np.float32)), errors)
    assert errors.any() and auc > 0.8


def test_dog_blob_map_finds_a_bright_blob() -> None:
    yy, xx = np.mgrid[:H, :W]
    img = 0.2 + 0.5 * np.exp(-((yy - 20) ** 2 + (xx - 45) ** 2) / (2 * 3.0**2))
    dog = S.dog_blob_map(img[None].astype(np.float32), sigmas=(2.0, 6.0))
    assert dog.shape == (H, W) and dog.dtype == np.float32
    assert np.unravel_index(np.argmax(dog), dog.shape) == (20, 45)
    flat = S.dog_blob_map(np.full((H, W), 0.3, np.float32))
    np.testing.assert_allclose(flat, 0.0, atol=1e-6)
