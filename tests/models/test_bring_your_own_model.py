"""Bring your own model: a MONAI network exported by its own code, served by a manifest alone."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from app.registry.manifest import Manifest, OutputRole
from models.training.phantoms import generate_series
from workers.pipeline.preprocess import preprocess_frames

torch = pytest.importorskip("torch")
nets = pytest.importorskip("monai.networks.nets")
pytest.importorskip("onnxscript")


def test_monai_basic_unet_runs_through_the_serving_preprocessing(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = nets.BasicUNet(
        spatial_dims=2, in_channels=1, out_channels=2, features=(8, 8, 16, 32, 64, 8)
    ).eval()
    directory = tmp_path / "monai-basicunet" / "0.1.0"
    directory.mkdir(parents=True)
    onnx_path = directory / "model.onnx"
    program = torch.onnx.export(
        net,
        (torch.zeros(1, 1, 128, 128),),
        dynamo=True,
        opset_version=18,
        input_names=["input"],
        output_names=["seg"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}},
    )
    program.save(str(onnx_path))
    manifest_json = {
        "name": "monai-basicunet",
        "version": "0.1.0",
        "task": "segmentation",
        "description": "MONAI BasicUNet, random weights: proves the manifest contract only.",
        "sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest(),
        "inputs": [{"name": "input", "shape": ["batch", 1, 128, 128]}],
        "outputs": [{"name": "seg", "shape": ["batch", 2, 128, 128], "role": "logits"}],
        "preprocessing": {
            "window": {"center": -600, "width": 1500},
            "size": [128, 128],
            "resample": "area",
            "mean": 0.5,
            "std": 0.25,
            "batch_size": 4,
        },
        "labels": [
            {"value": 0, "name": "background"},
            {"value": 1, "name": "lung", "color": [64, 160, 255]},
        ],
        "saliency": {"methods": ["entropy"], "display_range": [0.0, 0.6931]},
        "default": False,
    }
    (directory / "manifest.json").write_text(json.dumps(manifest_json))
    manifest = Manifest.model_validate_json((directory / "manifest.json").read_text())
    assert hashlib.sha256(onnx_path.read_bytes()).hexdigest() == manifest.sha256

    series = generate_series(8_100_001, n_slices=5)
    x = preprocess_frames(series.hu.astype(np.float32), manifest.preprocessing)
    assert x.shape == (5, 1, 128, 128)
    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    spec = manifest.output(OutputRole.LOGITS)
    assert spec is not None
    outs = []
    for i in range(0, len(x), manifest.preprocessing.batch_size):
        outs.append(sess.run([spec.name], {manifest.inputs[0].name: x[i : i + 4]})[0])
    logits = np.concatenate(outs)
    assert logits.shape == (5, len(manifest.labels), 128, 128)
    with torch.no_grad():
        ref = net(torch.from_numpy(x)).numpy()
    assert np.abs(logits - ref).max() < 1e-4
