"""Which saliency methods a model gets (pure policy in workers.analysis)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from app.registry.manifest import Manifest, SaliencyMethod
from workers.analysis import analyze_series, effective_methods
from workers.pipeline import saliency
from workers.pipeline.preprocess import preprocess_frames


def _classifier(outputs: list[dict[str, Any]], methods: list[str]) -> Manifest:
    return Manifest.model_validate({
        "name": "byo", "version": "1", "task": "classification", "sha256": "0" * 64,
        "inputs": [{"name": "x", "shape": ["N", 1, 64, 64]}], "outputs": outputs,
        "preprocessing": {"window": {"center": 0, "width": 100}, "size": [64, 64]},
        "labels": [{"value": 0, "name": "no"}, {"value": 1, "name": "yes"}],
        "classification": {"positive_label": "yes"}, "saliency": {"methods": methods},
    })


def _segmenter(methods: list[str], tta: list[str] | None = None, context: int = 0) -> Manifest:
    """A 16 × 16, 3-class segmenter manifest, batches of 2."""
    return Manifest.model_validate({
        "name": "seg", "version": "1", "task": "segmentation", "sha256": "0" * 64,
        "inputs": [{"name": "x", "shape": ["N", 2 * context + 1, 16, 16]}],
        "outputs": [{"name": "y", "shape": ["N", 3, 16, 16], "role": "logits"}],
        "preprocessing": {"window": {"center": 0, "width": 100}, "size": [16, 16],
                          "batch_size": 2, "context_slices": context},
        "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "lung"},
                   {"value": 2, "name": "nodule"}],
        "saliency": {"methods": methods},
        "test_time_augmentation": tta or [],
    })


def _counting_run(
    logits: Callable[[np.ndarray], np.ndarray], batches: list[int]
) -> Callable[[list[str], dict[str, np.ndarray]], list[np.ndarray]]:
    """A session ``run`` computing ``logits``, recording each call's batch size."""

    def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        batches.append(len(feeds["x"]))
        return [logits(feeds["x"])]

    return run


def test_classifier_without_cam_gets_occlusion_automatically() -> None:
    manifest = _classifier([{"name": "y", "shape": ["N", 1], "role": "logits"}], [])
    assert effective_methods(manifest) == (SaliencyMethod.OCCLUSION,)


def test_classifier_occlusion_follows_the_manifest_refinement_within_the_job_budget() -> None:
    """The manifest's second sweep runs for the most probable frame; a frame the budget
    cannot pay a refinement for gets the coarse sweep alone."""
    base = _classifier([{"name": "y", "shape": ["N", 1], "role": "logits"}], ["occlusion"])
    manifest = Manifest.model_validate({
        **base.model_dump(mode="json"),
        "saliency": {"methods": ["occlusion"], "occlusion_patch": 32, "occlusion_stride": 16,
                     "occlusion_refine_patch": 16, "occlusion_refine_stride": 4},
    })
    yy, xx = np.mgrid[:64, :64]
    disc = (yy - 21) ** 2 + (xx - 21) ** 2 <= 4

    def run(names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [feeds["x"][:, 0][:, disc].mean(axis=1, keepdims=True) * 10.0]

    frames = np.full((2, 64, 64), -40.0, np.float32)
    frames[0][disc] = 45.0  # the brighter frame: the higher "probability", explained first
    frames[1][disc] = 20.0
    result = analyze_series(run, manifest, frames, max_forward_passes=10 + 49 + 10 + 10)
    cls = result.classification
    assert cls is not None
    maps = {m.index: m for m in cls.saliency if m.method is SaliencyMethod.OCCLUSION}
    assert maps[0].params["refine_passes"] == 49 and maps[0].params["passes"] == 10 + 49
    assert maps[1].params["refine_passes"] == 0 and maps[1].params["passes"] == 10
    assert saliency.pointing_game(maps[0].values, disc)


def test_cam_classifier_keeps_cam_and_adds_requested_perturbation_once() -> None:
    manifest = _classifier(
        [{"name": "y", "shape": ["N", 1], "role": "logits"},
         {"name": "c", "shape": ["N", 1, 64, 64], "role": "cam"}], ["cam"])
    assert effective_methods(manifest) == (SaliencyMethod.CAM,)
    requested = [SaliencyMethod.RISE, SaliencyMethod.RISE, SaliencyMethod.ENTROPY]
    assert effective_methods(manifest, requested) == (SaliencyMethod.CAM, SaliencyMethod.RISE)


def test_flip_tta_may_be_requested_but_entropy_and_cam_follow_the_manifest() -> None:
    manifest = _classifier(
        [{"name": "y", "shape": ["N", 1], "role": "logits"},
         {"name": "c", "shape": ["N", 1, 64, 64], "role": "cam"}], ["cam"])
    requested = [SaliencyMethod.TTA_STD, SaliencyMethod.CAM, SaliencyMethod.OCCLUSION]
    assert effective_methods(manifest, requested) == (
        SaliencyMethod.CAM, SaliencyMethod.TTA_STD, SaliencyMethod.OCCLUSION,
    )


def test_served_flip_tta_runs_a_batch_of_frames_at_a_time_and_equals_the_whole_series() -> None:
    """Five frames in batches of two: 3 passes per frame, maps as if computed in one go."""
    manifest = _segmenter(["tta_std"])
    ramp = np.linspace(-2.0, 2.0, 16, dtype=np.float32)  # not flip-symmetric: flips disagree
    batches: list[int] = []

    def logits(x: np.ndarray) -> np.ndarray:
        base = x[:, :1] * 4.0
        return np.concatenate([-base, base + ramp, base - ramp[::-1, None]], axis=1)

    run = _counting_run(logits, batches)
    frames = np.random.default_rng(0).normal(0, 30, (5, 16, 16)).astype(np.float32)
    result = analyze_series(run, manifest, frames, max_forward_passes=0)
    seg = result.segmentation
    assert seg is not None
    maps = [m for m in seg.saliency if m.method is SaliencyMethod.TTA_STD]
    assert [m.index for m in maps] == [0, 1, 2, 3, 4]
    assert max(batches) == 2 and sum(batches) == 5 + 3 * 5  # served pass + 3 flips per frame
    x = preprocess_frames(frames, manifest.preprocessing)
    whole = saliency.tta_flip_std_series(lambda b: saliency.softmax(logits(b), axis=1), x)
    assert float(whole.max()) > 0.05
    np.testing.assert_allclose(np.stack([m.values for m in maps]), whole, atol=1e-5)


def test_served_test_time_augmentation_is_the_mean_of_the_mapped_back_members() -> None:
    """Mirror × reversed context: 4 passes per frame; labels and entropy from their mean."""
    manifest = _segmenter(["entropy"], ["flip_columns", "reverse_context"], context=1)
    ramp = np.linspace(-3.0, 3.0, 16, dtype=np.float32)  # neither mirror- nor order-symmetric
    passes: list[int] = []

    def logits(x: np.ndarray) -> np.ndarray:
        a = x[:, :1] * 3.0 + ramp
        b = x[:, 1:2] - x[:, 2:3] * 2.0
        return np.concatenate([-a, b, a - b], axis=1)

    run = _counting_run(logits, passes)
    frames = np.random.default_rng(1).normal(0, 40, (5, 16, 16)).astype(np.float32)
    result = analyze_series(run, manifest, frames, max_forward_passes=0)
    seg = result.segmentation
    assert seg is not None
    assert sum(passes) == 4 * 5 and max(passes) == 2
    x = preprocess_frames(frames, manifest.preprocessing)
    members = [
        saliency.softmax(logits(x), axis=1),
        saliency.softmax(logits(x[..., ::-1])[..., ::-1], axis=1),
        saliency.softmax(logits(x[:, ::-1]), axis=1),
        saliency.softmax(logits(x[:, ::-1, :, ::-1])[..., ::-1], axis=1),
    ]
    mean = np.mean(members, axis=0)
    plain = members[0].argmax(axis=1)
    assert (mean.argmax(axis=1) != plain).any()  # the members disagree: the test can fail
    top2 = np.sort(mean, axis=1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 1e-4  # float32 sums in another order may break a tie
    assert clear.mean() > 0.99, clear.mean()
    assert (seg.labels == mean.argmax(axis=1)).mean() > 0.999
    np.testing.assert_array_equal(seg.labels[clear], mean.argmax(axis=1)[clear])
    entropy = np.stack([m.values for m in seg.saliency if m.method is SaliencyMethod.ENTROPY])
    np.testing.assert_allclose(
        entropy, np.stack([saliency.softmax_entropy(p) for p in mean]), atol=1e-5
    )


def test_test_time_augmentation_is_checked_against_the_task_and_the_input() -> None:
    import pytest
    from pydantic import ValidationError

    from app.registry.manifest import TestTimeAugmentation
    from workers.pipeline.postprocess import TTA_TRANSFORMS

    assert {t.value for t in TestTimeAugmentation} == set(TTA_TRANSFORMS)
    with pytest.raises(ValidationError, match="reverse_context"):
        _segmenter(["entropy"], ["reverse_context"])
    with pytest.raises(ValidationError, match="twice"):
        _segmenter(["entropy"], ["flip_columns", "flip_columns"], context=1)
    with pytest.raises(ValidationError, match="segmentation models only"):
        Manifest.model_validate(
            _classifier([{"name": "l", "shape": ["N", 1], "role": "logits"}], ["occlusion"])
            .model_dump(mode="json")
            | {"test_time_augmentation": ["flip_columns"]}
        )
