"""The saliency evaluation command, run on tiny ONNX models built here with ``onnx.helper``.

The graphs are real (onnxruntime runs them, the ``onnx`` package randomises their weights);
they are hand-weighted rather than trained, so the test checks what the evaluation measures
and records, not that these toy models meet the targets.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from app.registry.manifest import (
    Classification,
    Label,
    Manifest,
    OutputRole,
    Preprocessing,
    SaliencyMethod,
    SaliencySpec,
    Task,
    TensorSpec,
    Window,
)
from models.training import evaluate_saliency as E
from workers.pipeline import saliency as S

REPO = Path(__file__).resolve().parents[2]
SIZE = 64


def _init(name: str, array: np.ndarray) -> TensorProto:
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32), name)


def tiny_classifier() -> onnx.ModelProto:
    """Bright-tissue detector with an exact CAM: logit = mean(cam) + bias.

    conv 3x3 (2 ch, centre tap, bias -0.5) -> relu -> conv 3x3 (2 ch) -> relu
    -> conv 1x1 projection (no bias) -> * positions = cam; ReduceMean + bias = logit.
    """
    rng = np.random.default_rng(0)
    w1 = np.zeros((2, 1, 3, 3))
    w1[:, 0, 1, 1] = 1.0
    w2 = rng.normal(0.3, 0.1, size=(2, 2, 3, 3))
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "wp"], ["proj"], name="project"),
        helper.make_node("Mul", ["proj", "scale"], ["cam"]),
        helper.make_node("ReduceMean", ["cam"], ["pooled"], axes=[2, 3], keepdims=0),
        helper.make_node("Add", ["pooled", "bias"], ["logit"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [
            helper.make_tensor_value_info("logit", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("cam", TensorProto.FLOAT, ["N", 1, SIZE, SIZE]),
        ],
        [
            _init("w1", w1),
            _init("b1", [-0.5, -0.45]),
            _init("w2", w2),
            _init("b2", [0.0, 0.0]),
            _init("wp", np.full((1, 2, 1, 1), 1.0)),
            _init("scale", 4.0),
            _init("bias", [-0.2]),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def tiny_segmenter() -> onnx.ModelProto:
    """Three-class intensity segmenter: air < 0.15 < lung < 0.5 < 'nodule' (window units)."""
    w1 = np.zeros((2, 1, 3, 3))
    w1[:, 0, 1, 1] = 1.0
    w2 = np.zeros((3, 2, 1, 1))
    w2[0, :, 0, 0] = -20.0  # background: 6 - 40 x
    w2[2, :, 0, 0] = 20.0  # nodule: 40 x - 20
    nodes = [
        helper.make_node("Conv", ["image", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="enc"),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["logits"], name="head"),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_segmenter",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, SIZE, SIZE])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [_init("w1", w1), _init("b1", [0.0, 0.0]), _init("w2", w2), _init("b2", [6.0, 0.0, -20.0])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _preprocessing() -> Preprocessing:
    return Preprocessing(
        window=Window(center=-400.0, width=1600.0),
        size=(SIZE, SIZE),
        resample="area",
        batch_size=16,
    )


def _write(models_dir: Path, name: str, model: onnx.ModelProto, **fields: object) -> None:
    folder = models_dir / name / "0.0.1"
    folder.mkdir(parents=True)
    data = model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    manifest = Manifest(
        name=name,
        version="0.0.1",
        sha256=hashlib.sha256(data).hexdigest(),
        inputs=[TensorSpec(name="image", shape=["N", 1, SIZE, SIZE])],
        preprocessing=_preprocessing(),
        **fields,  # type: ignore[arg-type]
    )
    (folder / "manifest.json").write_text(manifest.model_dump_json(indent=1))


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    d = tmp_path / "models"
    spec = dict(occlusion_patch=16, occlusion_stride=8, rise_masks=24, max_forward_passes=40)
    _write(
        d,
        "tinycls",
        tiny_classifier(),
        task=Task.CLASSIFICATION,
        outputs=[
            TensorSpec(name="logit", shape=["N", 1], role=OutputRole.LOGITS),
            TensorSpec(name="cam", shape=["N", 1, SIZE, SIZE], role=OutputRole.CAM),
        ],
        labels=[Label(value=0, name="background"), Label(value=1, name="nodule")],
        classification=Classification(positive_label="nodule"),
        # CAM-only, as the exported classifier: occlusion/RISE use the evaluation's budget
        saliency=SaliencySpec(
            methods=[SaliencyMethod.CAM],
            display_range=(0.0, 2.0),
            occlusion_patch=16,
            occlusion_stride=8,
            rise_masks=24,
            max_forward_passes=1,
        ),
    )
    _write(
        d,
        "tinyseg",
        tiny_segmenter(),
        task=Task.SEGMENTATION,
        outputs=[TensorSpec(name="logits", shape=["N", 3, SIZE, SIZE], role=OutputRole.LOGITS)],
        labels=[
            Label(value=0, name="background"),
            Label(value=1, name="lung"),
            Label(value=2, name="nodule"),
        ],
        saliency=SaliencySpec(
            methods=[SaliencyMethod.ENTROPY, SaliencyMethod.TTA_STD, SaliencyMethod.OCCLUSION],
            target_label="nodule",
            **spec,
        ),
    )
    return d


# ------------------------------------------------------------------ pure helpers
def test_cascade_walks_from_the_head_and_randomises_cumulatively() -> None:
    model = tiny_classifier()
    layers = E.cascade_layers(model)
    assert [name for name, _ in layers] == ["project", "conv2", "conv1"]
    assert layers[1][1] == ["w2", "b2"]
    assert E.cascade_stages(3) == [1, 2, 3]
    assert E.cascade_stages(10) == [1, 2, 3, 5, 10]

    def weights(data: bytes) -> dict[str, np.ndarray]:
        proto = onnx.load_from_string(data)
        return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}

    original = weights(model.SerializeToString())
    stage1 = weights(E.randomised_model(model, layers, 1, seed=3))
    stage2 = weights(E.randomised_model(model, layers, 2, seed=3))
    assert not np.array_equal(stage1["wp"], original["wp"])
    for name in ("w1", "b1", "w2", "b2", "scale", "bias"):
        np.testing.assert_array_equal(stage1[name], original[name])
    np.testing.assert_array_equal(stage2["wp"], stage1["wp"])  # cascading: re-used
    assert not np.array_equal(stage2["w2"], original["w2"])
    np.testing.assert_array_equal(stage2["w1"], original["w1"])
    assert stage2["w2"].std() == pytest.approx(original["w2"].std(), rel=0.5)


def test_logit_only_subgraph_drops_the_cam() -> None:
    sub = onnx.load_from_string(E.logit_only_model(tiny_classifier(), "image", "logit"))
    assert [o.name for o in sub.graph.output] == ["logit"]


def test_histogram_auc_matches_the_exact_auc() -> None:
    rng = np.random.default_rng(1)
    scores = np.round(rng.random(5000), 3)  # ties on purpose
    labels = rng.random(5000) < scores * 0.6
    bins = np.minimum(np.rint(scores * 1000).astype(int), 1000)  # one bin per distinct score
    pos = np.bincount(bins[labels], minlength=1001).astype(float)
    neg = np.bincount(bins[~labels], minlength=1001).astype(float)
    assert E.hist_auc(pos, neg) == pytest.approx(S.roc_auc(scores, labels), abs=1e-9)


def test_bootstrap_ci_brackets_the_mean_and_narrows_with_n() -> None:
    rng = np.random.default_rng(2)
    small = rng.random(20) < 0.7
    large = rng.random(2000) < 0.7
    s_small = E.summarise(small, n_boot=500)
    s_large = E.summarise(large, n_boot=500)
    for s in (s_small, s_large):
        assert s["ci95"][0] <= s["mean"] <= s["ci95"][1]
    width = lambda s: s["ci95"][1] - s["ci95"][0]  # noqa: E731
    assert width(s_large) < width(s_small) / 4


def test_hit_within_radius_uses_each_lesions_own_radius() -> None:
    lesion = np.zeros((40, 40), bool)
    yy, xx = np.mgrid[:40, :40]
    lesion |= (yy - 10) ** 2 + (xx - 10) ** 2 <= 2**2  # radius ~2 (13 px)
    lesion |= (yy - 28) ** 2 + (xx - 28) ** 2 <= 6**2  # radius ~6
    near_small, near_large = np.zeros((40, 40)), np.zeros((40, 40))
    near_small[10, 16] = 1.0  # 4 px outside the rim of the small lesion
    near_large[28, 38] = 1.0  # 4 px outside the rim of the large lesion
    assert not E.hit_within_radius(near_small, lesion)
    assert E.hit_within_radius(near_large, lesion)
    assert not S.pointing_game(near_large, lesion)


# ------------------------------------------------------------------ the command
def test_evaluate_saliency_command_end_to_end(models_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "saliency_metrics.json"
    cmd = [
        sys.executable,
        "-m",
        "models.training.evaluate_saliency",
        "--models-dir",
        str(models_dir),
        "--out",
        str(out),
        "--series",
        "2",
        "--slices",
        "12",
        "--image-size",
        "128",
        "--max-negatives",
        "6",
        "--max-perturbation-slices",
        "3",
        "--max-delins-slices",
        "2",
        "--max-tta-slices",
        "8",
        "--max-sanity-slices",
        "4",
        "--max-sanity-perturbation-slices",
        "1",
        "--bootstrap",
        "200",
        "--timing-reps",
        "10",
        "--perturbation-passes",
        "40",
        "--budget-seconds",
        "120",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["data"]["series_seeds"] == [900_000, 900_001]  # the held-out test split
    assert set(report["models"]) == {"tinycls:0.0.1", "tinyseg:0.0.1"}

    cls = report["models"]["tinycls:0.0.1"]
    seg = report["models"]["tinyseg:0.0.1"]
    manifest = json.loads((models_dir / "tinycls" / "0.0.1" / "manifest.json").read_text())
    assert cls["sha256"] == manifest["sha256"]  # numbers tied to the exact weights
    assert cls["quality"]["true_positive_slices"] > 0
    assert {"cam", "occlusion", "rise", "dog"} <= set(cls["methods"])
    cam = cls["methods"]["cam"]
    assert cam["n"] == cls["quality"]["true_positive_slices"]
    for key in ("pointing_game", "pointing_game_lesion_radius", "energy_in_lesion"):
        s = cam[key]
        assert 0.0 <= s["ci95"][0] <= s["mean"] <= s["ci95"][1] <= 1.0
    # a hit counted strictly is also a hit within one radius
    assert cam["pointing_game_lesion_radius"]["mean"] >= cam["pointing_game"]["mean"]
    assert "margin_over_dog" in cam and "margin_over_dog" not in cls["methods"]["dog"]
    occ = cls["methods"]["occlusion"]
    assert occ["cost"]["forward_passes"] <= 40  # --perturbation-passes, manifest allows 1
    assert cls["plan"]["max_forward_passes_source"].startswith("evaluation default")
    assert seg["plan"]["max_forward_passes_source"] == "manifest"
    assert cls["perturbation_params"]["occlusion"]["stride"] > 8  # had to coarsen to fit
    # the workers' fill unless --fill says otherwise
    assert cls["perturbation_params"]["occlusion"]["fill"] == "median"
    assert cls["perturbation_params"]["rise"]["baseline"] == "median"
    di = cam["deletion_insertion"]
    assert di["n"] >= 1 and di["forward_passes_per_curve_pair"] == 2 * (16 + 1)
    assert 0.0 <= di["deletion_auc"]["mean"] <= 1.0
    stages = cls["randomisation"]["stages"]
    assert [s["layers_randomised"] for s in stages] == [1, 2, 3]
    assert stages[0]["down_to"] == "project" and stages[-1]["down_to"] == "conv1"
    # Re-drawing the projection of a two-channel model changes the CAM's ranks
    assert all(-1.0 <= s["cam"]["spearman_signed"]["mean"] <= 1.0 for s in stages)
    # costly maps are re-run where the target is judged (head + 1 layer) and fully random
    assert {"occlusion", "rise"} <= set(stages[1]) and {"occlusion", "rise"} <= set(stages[-1])
    assert "occlusion" not in stages[0]
    # a randomised map that became constant has no ranks: counted (as rho = 0), not dropped
    last_occ = stages[-1]["occlusion"]["spearman_signed"]
    assert last_occ["n"] >= 1 and last_occ["mean"] is not None
    assert "randomised_2_layers_|spearman|<=0.3" in cls["targets"]["cam"]
    assert "head_only_|map|_spearman<=0.5" in cls["targets"]["cam"]
    assert cls["cost"]["forward_seconds_per_image_with_cam"] > 0
    assert set(cls["targets"]["cam"]) >= {"pointing_game_tp>=0.90", "cost<=5%_of_inference"}

    unc = seg["uncertainty"]
    for name in ("entropy", "tta_std"):
        auc = unc[name]["error_auc"]
        assert auc["n_slices"] > 0 and 0.0 <= auc["auc"] <= 1.0
        assert auc["ci95"][0] <= auc["auc"] <= auc["ci95"][1]
    # A flip-equivariant per-pixel model has no TTA spread, except at the 3x3 conv's edges.
    assert seg["quality"]["true_positive_slices"] > 0
    assert seg["methods"]["occlusion_region"]["n"] > 0
    assert seg["methods"]["occlusion_region"]["deletion_insertion"]["n"] >= 1
    assert "entropy" in seg["randomisation"]["stages"][0]
    assert (
        unc["entropy"]["boundary_baseline_error_auc"]["n_slices"]
        == unc["entropy"]["error_auc"]["n_slices"]
    )
    assert unc["tta_std"]["image_edge_baseline_error_auc"]["n_slices"] > 0
    assert "beats_boundary_and_edge_baselines(ci_low>best)" in seg["targets"]["entropy"]
    assert cls["plan"]["occlusion"] >= 1 and cls["plan"]["budget_seconds"] > 0
    assert math.isfinite(report["seconds_total"]) and report["seconds_total"] < 300

    text = proc.stdout
    assert "| tinycls:0.0.1 | cam |" in text and "| tinyseg:0.0.1 | occlusion_region |" in text
    assert "Error-pixel AUC" in text


def test_heldout_splits_only() -> None:
    """Settings are chosen on the validation split, figures reported on the test split;
    the training split is never an evaluation set."""
    val = E.load_heldout(1, 4, 128, 1, "val")
    assert val.seeds == [200_000] and val.hu[0].shape == (4, 128, 128)
    assert E.load_heldout(1, 4, 128, 1).seeds == [900_000]
    with pytest.raises(ValueError, match="held-out"):
        E.load_heldout(1, 2, 64, 1, "train")


def test_randomised_maps_that_became_constant_count_as_uncorrelated() -> None:
    s = E._summarise_spearman([0.9, float("nan")], n_boot=100)
    assert s["mean"] == pytest.approx(0.45) and s["n_constant_maps"] == 1 and s["n"] == 2
    res = {"randomisation": {"stages": [{"layers_randomised": n} for n in (1, 2, 5)]}}
    assert E.target_stage(res)["layers_randomised"] == 2
    assert E.perturbation_stages([1, 2, 5]) == {2, 5}
    assert E.perturbation_stages([1]) == {1}


def test_boundary_proximity_is_highest_on_predicted_edges() -> None:
    pred = np.zeros((20, 20), np.uint8)
    pred[:, 10:] = 1
    b = E.boundary_proximity(pred)
    assert b[5, 9] == b[5, 10] == pytest.approx(1.0)
    assert b[5, 9] > b[5, 7] > b[5, 3] > 0.0
    assert not E.boundary_proximity(np.zeros((5, 5), np.uint8)).any()


def test_plan_respects_cap_budget_and_floor() -> None:
    # 100 s at 0.1 s/pass, 226 passes per slice: 4 slices fit
    assert E.affordable(100.0, 226, 0.1, cap=12) == 4
    assert E.affordable(1000.0, 226, 0.1, cap=12) == 12
    assert E.affordable(10.0, 226, 0.1, cap=12) == 0
    assert E.affordable(10.0, 226, 0.1, cap=12, floor=2) == 2
    assert E.affordable(10.0, 226, 0.1, cap=1, floor=2) == 1


def test_run_capped_stops_on_time_but_runs_the_minimum() -> None:
    import time as _time

    def slow(i: int) -> int:
        _time.sleep(0.05)
        return i

    done, cut = E.run_capped(list(range(10)), slow, seconds=0.12)
    assert cut and 1 <= len(done) <= 3 and done == list(range(len(done)))
    done, cut = E.run_capped(list(range(10)), slow, seconds=0.0, min_items=4)
    assert cut and done == [0, 1, 2, 3]
    done, cut = E.run_capped([1, 2], slow, seconds=10.0)
    assert not cut and done == [1, 2]
