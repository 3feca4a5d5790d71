"""The shipped INT8 builds: opt-in, gated, faithful to their fp32 release on a fresh phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.registry.manifest import Manifest, OutputRole, Task
from models.training.phantoms import generate_series
from tests.models.conftest import load, manifest_paths
from workers.pipeline.postprocess import calibrated_probabilities
from workers.pipeline.preprocess import preprocess_frames

INT8 = [p for p in manifest_paths() if load(p).version.endswith("-int8")]
IDS = [load(p).key for p in INT8]


def test_the_unet_and_classifier_int8_builds_ship() -> None:
    assert {load(p).name for p in INT8} >= {"unet", "classifier"}


def _source(path: Path) -> tuple[Manifest, Path]:
    manifest = load(path)
    folder = path.parents[1] / manifest.version.removesuffix("-int8")
    return load(folder / "manifest.json"), folder


@pytest.mark.parametrize("path", INT8, ids=IDS)
def test_int8_build_is_opt_in_and_passed_its_release_gate(path: Path) -> None:
    manifest = load(path)
    source, _ = _source(path)
    assert manifest.default is False  # served only when named
    assert manifest.preprocessing == source.preprocessing and manifest.labels == source.labels
    assert manifest.classification == source.classification  # same calibration and thresholds
    quantization = manifest.provenance["quantization"]
    assert quantization["gates_passed"] is True
    agreement = quantization["agreement"]
    if manifest.task is Task.SEGMENTATION:
        assert agreement["mask_dice_vs_fp32"] >= 0.99
    else:
        assert agreement["auc_drop"] <= 0.005


def _session(folder: Path, manifest: Manifest) -> ort.InferenceSession:
    return ort.InferenceSession(str(folder / manifest.file), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("path", INT8, ids=IDS)
def test_int8_agrees_with_its_fp32_release_on_a_fresh_phantom(path: Path) -> None:
    manifest = load(path)
    source, source_dir = _source(path)
    # seed outside the training, validation and test ranges: a 6-12 mm nodule on 12 of 16
    # slices, so the classifier sees both low and high probabilities
    phantom = generate_series(7_777_003, n_slices=16, n_nodules=1, size_range_mm=(6.0, 12.0))
    x = preprocess_frames(phantom.hu.astype(np.float32), manifest.preprocessing)
    fp32 = _session(source_dir, source).run(None, {source.inputs[0].name: x})
    int8 = _session(path.parent, manifest).run(None, {manifest.inputs[0].name: x})
    if manifest.task is Task.SEGMENTATION:
        a, b = fp32[0].argmax(1), int8[0].argmax(1)
        for label in (1, 2):
            inter = np.sum((a == label) & (b == label))
            assert 2 * inter / (np.sum(a == label) + np.sum(b == label)) >= 0.95, label
    else:
        spec = manifest.classification
        assert spec is not None
        logit = [o.role for o in manifest.outputs].index(OutputRole.LOGITS)
        p32 = calibrated_probabilities(fp32[logit][:, 0], spec.temperature, spec.bias)
        p8 = calibrated_probabilities(int8[logit][:, 0], spec.temperature, spec.bias)
        assert p32.min() < spec.threshold < p32.max()  # both decisions are exercised
        assert np.max(np.abs(p32 - p8)) < 0.05
        assert np.mean((p32 >= spec.threshold) == (p8 >= spec.threshold)) >= 0.9
