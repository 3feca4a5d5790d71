"""The export path: ONNX (onnxruntime) equals PyTorch for all three architectures.

Small-width networks with seeded random weights go through exactly the code that exported the
shipped models (``models.training.export.export_onnx``); the shipped models' own parity on 100
validation slices is recorded in their manifests and checked in ``test_manifests``.
"""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxscript")

from models.training import export as ex  # noqa: E402
from models.training.data import PREPROCESSING  # noqa: E402
from models.training.train import build_model  # noqa: E402


def _with_trained_statistics(net: torch.nn.Module) -> torch.nn.Module:
    """In eval mode, with non-trivial BatchNorm statistics, as after training."""
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


@pytest.mark.parametrize(
    ("name", "evidence_stride", "input_scale"),
    [
        ("unet", 4, 1),
        ("segnet", 4, 1),
        ("classifier", 4, 1),
        ("classifier", 2, 1),
        ("classifier", 4, 2),
    ],
    ids=["unet", "segnet", "classifier", "classifier-stride2", "classifier-512"],
)
def test_onnx_matches_pytorch_on_100_inputs(
    name: str, evidence_stride: int, input_scale: int, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    net = _with_trained_statistics(
        build_model(name, base=4, evidence_stride=evidence_stride, input_scale=input_scale)
    )
    path = tmp_path / "model.onnx"
    ex.export_onnx(net, name, path)
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    if name == "segnet":
        assert ops["MaxUnpool"] == 4 and ops["ScatterND"] == 0
    sess = ex.ort_session(path)
    side = 256 * input_scale
    x = np.random.default_rng(1).random((100, PREPROCESSING.channels, side, side), dtype=np.float32)
    result = ex.parity(net, name, sess, x)
    assert result["inputs"] == 100
    first = ex.output_names(name)[0]
    assert result["max_abs_diff"][first] < ex.PARITY_TOLERANCE
    if name == "classifier":
        # logit == mean(cam at the evidence stride) + bias exactly, inside the exported graph too.
        logit, cam = sess.run(["logit", "cam"], {"image": x[:4]})
        assert logit.shape == (4, 1) and cam.shape == (4, 1, side, side)
        low = net.cam_lowres(torch.from_numpy(x[:4])).detach().numpy()
        assert low.shape[-1] == 256 // evidence_stride  # the evidence stays on the label grid
        assert np.allclose(logit[:, 0], low.mean(axis=(1, 2, 3)) + float(net.bias), atol=1e-4)


def test_platt_fit_recovers_the_temperature_and_bias_that_generated_the_labels() -> None:
    from models.training.export import fit_platt, fit_temperature

    rng = np.random.default_rng(5)
    z = rng.normal(0.0, 6.0, 20_000)
    y = rng.random(z.size) < 1 / (1 + np.exp(-(z / 3.0 - 1.2)))
    temperature, bias = fit_platt(z, y)
    assert temperature == pytest.approx(3.0, rel=0.05) and bias == pytest.approx(-1.2, abs=0.08)
    # temperature alone cannot remove the offset: its fit is a different, worse model
    assert abs(fit_temperature(z, y) - 3.0) > 0.1


@pytest.mark.parametrize(
    ("name", "evidence_stride", "input_scale"),
    [("unet", 4, 1), ("segnet", 4, 1), ("classifier", 2, 1), ("classifier", 4, 2)],
    ids=["unet", "segnet", "classifier-stride2", "classifier-512"],
)
def test_the_pytorch_twin_rebuilt_from_the_onnx_file_computes_the_same(
    name: str, evidence_stride: int, input_scale: int, tmp_path: Path
) -> None:
    """The benchmark's PyTorch baseline needs no checkpoint: weights come from the graph."""
    torch.manual_seed(1)
    net = _with_trained_statistics(
        build_model(name, base=4, evidence_stride=evidence_stride, input_scale=input_scale)
    )
    for m in net.modules():  # and non-trivial affine parameters and conv biases
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
        elif isinstance(m, torch.nn.Conv2d) and m.bias is not None:
            m.bias.data.uniform_(-0.1, 0.1)  # as trained (a zero bias is folded away)
    path = tmp_path / "model.onnx"
    ex.export_onnx(net, name, path)
    twin = ex.module_from_onnx(
        name, path, base=4, evidence_stride=evidence_stride, input_scale=input_scale
    )
    side = 256 * input_scale
    x = np.random.default_rng(2).random((3, PREPROCESSING.channels, side, side), dtype=np.float32)
    with torch.inference_mode():
        want = ex.export_module(net, name)(torch.from_numpy(x))
        got = twin(torch.from_numpy(x))
    want = want if isinstance(want, tuple) else (want,)
    got = got if isinstance(got, tuple) else (got,)
    for w, g in zip(want, got, strict=True):  # the CAM is a sum-scaled map: relative too
        assert torch.allclose(w, g, rtol=1e-5, atol=1e-4)
    sess = ex.ort_session(path)
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: x})
    for o, g in zip(onnx_out, got, strict=True):
        assert np.allclose(o, g.numpy(), rtol=1e-5, atol=1e-4)
