"""Post-processing functions, checked against their definitions and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workers.pipeline import postprocess as pp

RNG = np.random.default_rng(20260101)


# --------------------------------------------------------------------------------------
# Softmax and labels
# --------------------------------------------------------------------------------------


def test_softmax_matches_its_definition() -> None:
    logits = RNG.normal(size=(2, 4, 5, 6)).astype(np.float32)
    expected = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    probs = pp.probabilities_from_logits(logits, axis=1)
    assert probs.dtype == np.float32 and probs.shape == logits.shape
    np.testing.assert_allclose(probs, expected, rtol=1e-5, atol=1e-7)


def test_softmax_is_stable_and_shift_invariant() -> None:
    logits = RNG.normal(size=(1, 3, 4, 4)).astype(np.float32)
    big = pp.probabilities_from_logits(logits * 1e4, axis=1)  # exp would overflow naively
    assert np.isfinite(big).all()
    np.testing.assert_allclose(big.sum(axis=1), 1.0, rtol=1e-6)
    # float32 logits near 100 keep ~1e-5 absolute precision
    shifted = pp.probabilities_from_logits(logits + 100.0, axis=1)
    np.testing.assert_allclose(shifted, pp.probabilities_from_logits(logits, axis=1), atol=2e-5)


def test_softmax_on_another_axis() -> None:
    logits = RNG.normal(size=(5, 3)).astype(np.float32)
    probs = pp.probabilities_from_logits(logits, axis=-1)
    np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-6)


def test_averaged_probabilities_maps_each_member_back() -> None:
    """A model that commutes with the transforms gives the same probabilities with TTA as
    without: each member's output is mirrored back; a reversed context needs no mapping."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3, 3, 8, 8)).astype(np.float32)
    calls: list[int] = []

    def pointwise(batch: np.ndarray) -> np.ndarray:  # per pixel, symmetric in the neighbours
        calls.append(len(batch))
        centre, side = batch[:, 1:2], batch[:, 0:1] + batch[:, 2:3]
        return np.concatenate([centre, 2 * side, centre * side], axis=1)

    plain = pp.probabilities_from_logits(pointwise(x))
    assert pp.averaged_probabilities(pointwise, x) == pytest.approx(plain)
    calls.clear()
    both = pp.averaged_probabilities(pointwise, x, pp.TTA_TRANSFORMS)
    assert len(calls) == 4
    np.testing.assert_allclose(both, plain, atol=1e-6)
    calls.clear()
    given = pp.averaged_probabilities(pointwise, x, ["flip_columns"], identity_logits=pointwise(x))
    assert len(calls) == 2  # the identity pass was given, the mirror was run
    np.testing.assert_allclose(given, plain, atol=1e-6)


def test_averaged_probabilities_is_the_mean_over_the_members() -> None:
    ramp = np.arange(6, dtype=np.float32)

    def leftward(batch: np.ndarray) -> np.ndarray:  # prefers class 1 on the right: not mirrored
        return np.concatenate([batch[:, :1] * 0, batch[:, :1] * 0 + ramp], axis=1)

    x = np.zeros((1, 1, 2, 6), np.float32)
    p = pp.averaged_probabilities(leftward, x, ["flip_columns"])
    with pytest.raises(ValueError, match="unknown"):
        pp.averaged_probabilities(leftward, x, ["flip_rows"])
    plain = pp.probabilities_from_logits(leftward(x))
    mirrored = pp.probabilities_from_logits(leftward(x))[..., ::-1]
    np.testing.assert_allclose(p, (plain + mirrored) / 2, atol=1e-6)
    np.testing.assert_allclose(p.sum(axis=1), 1.0, atol=1e-6)


def test_labels_are_the_argmax_as_uint8() -> None:
    probs = pp.probabilities_from_logits(RNG.normal(size=(2, 5, 8, 8)), axis=1)
    labels = pp.labels_from_probabilities(probs, axis=1)
    assert labels.dtype == np.uint8 and labels.shape == (2, 8, 8)
    chosen = np.take_along_axis(probs, labels[:, None].astype(np.intp), axis=1)[:, 0]
    np.testing.assert_array_equal(chosen, probs.max(axis=1))


def test_too_many_classes_for_uint8_are_refused() -> None:
    with pytest.raises(ValueError, match="uint8"):
        pp.labels_from_probabilities(np.zeros((1, 257, 2, 2)), axis=1)


# --------------------------------------------------------------------------------------
# Resizing
# --------------------------------------------------------------------------------------


def test_nearest_upsampling_by_an_integer_factor_replicates_blocks() -> None:
    labels = RNG.integers(0, 4, size=(3, 5), dtype=np.uint8)
    up = pp.resize_label_map(labels, (6, 15))
    assert up.dtype == np.uint8 and up.shape == (6, 15)
    np.testing.assert_array_equal(up, np.kron(labels, np.ones((2, 3), dtype=np.uint8)))


def test_nearest_downsampling_takes_the_centre_pixel() -> None:
    labels = np.arange(16, dtype=np.uint8).reshape(4, 4)
    down = pp.resize_label_map(labels, (2, 2))
    # target centres 0.5 and 1.5 map to source positions 1.0 and 3.0
    np.testing.assert_array_equal(down, labels[[1, 3]][:, [1, 3]])


def test_nearest_resize_creates_no_new_labels_and_keeps_leading_axes() -> None:
    labels = RNG.integers(0, 3, size=(2, 7, 9), dtype=np.uint8)
    out = pp.resize_label_map(labels, (23, 11))
    assert out.shape == (2, 23, 11)
    assert set(np.unique(out)) <= set(np.unique(labels))
    same = pp.resize_label_map(labels, (7, 9))
    np.testing.assert_array_equal(same, labels)
    assert same is not labels


def test_bilinear_is_exact_for_a_linear_ramp_inside_the_image() -> None:
    h, w, big_h, big_w = 8, 10, 32, 40
    rows = np.arange(h, dtype=np.float32)[:, None]
    cols = np.arange(w, dtype=np.float32)[None, :]
    ramp = 3.0 * rows + 2.0 * cols + 1.0
    out = pp.resize_float_map(ramp, (big_h, big_w))
    # centre-aligned source coordinate of each target pixel
    y = (np.arange(big_h) + 0.5) * h / big_h - 0.5
    x = (np.arange(big_w) + 0.5) * w / big_w - 0.5
    expected = 3.0 * y[:, None] + 2.0 * x[None, :] + 1.0
    inside = (y >= 0) & (y <= h - 1)
    inside_x = (x >= 0) & (x <= w - 1)
    np.testing.assert_allclose(out[inside][:, inside_x], expected[inside][:, inside_x], atol=1e-4)


def test_bilinear_keeps_constants_and_the_value_range() -> None:
    constant = np.full((4, 6), 0.25, dtype=np.float32)
    np.testing.assert_allclose(pp.resize_float_map(constant, (13, 7)), 0.25)
    probs = RNG.random((2, 9, 9)).astype(np.float32)
    out = pp.resize_float_map(probs, (31, 17))
    assert out.dtype == np.float32 and out.shape == (2, 31, 17)
    assert out.min() >= probs.min() - 1e-6 and out.max() <= probs.max() + 1e-6


def test_bilinear_round_trip_through_identity_size_is_a_copy() -> None:
    values = RNG.random((5, 5)).astype(np.float32)
    out = pp.resize_float_map(values, (5, 5))
    np.testing.assert_array_equal(out, values)
    assert out is not values


# --------------------------------------------------------------------------------------
# Probabilities for classification
# --------------------------------------------------------------------------------------


def test_sigmoid_matches_its_definition_and_symmetry() -> None:
    x = np.linspace(-20, 20, 81, dtype=np.float32)
    s = pp.sigmoid(x)
    np.testing.assert_allclose(s, 1.0 / (1.0 + np.exp(-x.astype(np.float64))), rtol=1e-6)
    np.testing.assert_allclose(pp.sigmoid(-x), 1.0 - s, atol=1e-7)


def test_sigmoid_extremes_do_not_overflow() -> None:
    with np.errstate(over="raise", invalid="raise"):
        s = pp.sigmoid(np.array([-1e4, 1e4], dtype=np.float32))
    assert s[0] == pytest.approx(0.0, abs=1e-30) and s[1] == pytest.approx(1.0)


def test_temperature_scaling() -> None:
    assert pp.calibrated_probability(0.0, 2.0) == pytest.approx(0.5)
    assert pp.calibrated_probability(2.0, 1.0) == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-6)
    assert pp.calibrated_probability(2.0, 2.0) == pytest.approx(1 / (1 + math.exp(-1.0)), rel=1e-6)
    # a higher temperature moves a probability towards 0.5 from either side
    for logit in (-3.0, 3.0):
        sharp = abs(pp.calibrated_probability(logit, 1.0) - 0.5)
        soft = abs(pp.calibrated_probability(logit, 4.0) - 0.5)
        assert soft < sharp
    with pytest.raises(ValueError):
        pp.calibrated_probability(1.0, 0.0)


def test_series_aggregation() -> None:
    p = np.array([0.1, 0.4, 0.2])
    assert pp.aggregate_series(p, "max") == pytest.approx(0.4)
    assert pp.aggregate_series(list(p), "mean") == pytest.approx(p.mean())
    assert pp.aggregate_series(p, "noisy_or") == pytest.approx(1 - np.prod(1 - p))
    assert pp.aggregate_series([1.0, 0.0], "noisy_or") == pytest.approx(1.0)
    assert pp.aggregate_series([0.0] * 5, "noisy_or") == 0.0
    # noisy-or of many small probabilities stays accurate (log space)
    many = np.full(10_000, 1e-5)
    assert pp.aggregate_series(many, "noisy_or") == pytest.approx(
        -np.expm1(10_000 * np.log1p(-1e-5))
    )
    with pytest.raises(ValueError):
        pp.aggregate_series([], "max")
    with pytest.raises(ValueError):
        pp.aggregate_series([0.5], "median")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Label statistics
# --------------------------------------------------------------------------------------


def test_label_statistics_counts_and_areas() -> None:
    labels = RNG.integers(0, 4, size=(3, 20, 30), dtype=np.uint8)
    labels[labels == 2] = 0  # a label that is absent
    stats = pp.label_statistics(labels, pixel_spacing=(0.5, 0.8))
    assert [s.value for s in stats] == [1, 3]
    for s in stats:
        count = int(np.count_nonzero(labels == s.value))
        assert s.pixel_count == count
        assert s.area_mm2 == pytest.approx(count * 0.5 * 0.8)
    with_background = pp.label_statistics(labels, include_background=True)
    assert with_background[0].value == 0 and with_background[0].area_mm2 is None
    assert sum(s.pixel_count for s in with_background) == labels.size


def test_calibration_bias_shifts_the_logit_after_the_temperature() -> None:
    assert pp.calibrated_probability(2.0, 2.0, bias=-1.0) == pytest.approx(0.5)
    z = np.array([-800.0, -3.0, 0.0, 3.0, 800.0])
    p = pp.calibrated_probabilities(z, 1.5, bias=0.4)
    assert p == pytest.approx(1 / (1 + np.exp(-(z / 1.5 + 0.4))))  # finite at ±800 too
    assert p.dtype == np.float64 and np.all(np.diff(p) >= 0)
