"""Which saliency methods a model gets (pure policy in workers.analysis)."""

from __future__ import annotations

from typing import Any

from app.registry.manifest import Manifest, SaliencyMethod
from workers.analysis import effective_methods


def _classifier(outputs: list[dict[str, Any]], methods: list[str]) -> Manifest:
    return Manifest.model_validate({
        "name": "byo", "version": "1", "task": "classification", "sha256": "0" * 64,
        "inputs": [{"name": "x", "shape": ["N", 1, 64, 64]}], "outputs": outputs,
        "preprocessing": {"window": {"center": 0, "width": 100}, "size": [64, 64]},
        "labels": [{"value": 0, "name": "no"}, {"value": 1, "name": "yes"}],
        "classification": {"positive_label": "yes"}, "saliency": {"methods": methods},
    })


def test_classifier_without_cam_gets_occlusion_automatically() -> None:
    manifest = _classifier([{"name": "y", "shape": ["N", 1], "role": "logits"}], [])
    assert effective_methods(manifest) == (SaliencyMethod.OCCLUSION,)


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
