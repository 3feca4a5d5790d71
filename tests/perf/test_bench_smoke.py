"""The benchmark harness on tiny inputs, so ``make bench`` keeps working.

Nothing here asserts a timing: the machine running the tests may be busy. What is checked is
that every part of the harness runs on real parts (onnxruntime, PyTorch, the INT8 quantiser,
live medcad processes, the load generator) and produces the numbers bench.json needs.
"""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from app.registry.manifest import Manifest
from app.registry.service import load_registry
from tests.fixtures.tiny_models import SIZE, build_models_dir
from tests.perf import analysis, report
from tests.perf.flops import graph_flops
from tests.perf.ingest_bench import (
    SERIES_PLACEHOLDER,
    SOP_PLACEHOLDER,
    multipart_body,
    template_instance,
)
from tests.perf.model_bench import JobReplay, ModelCase, bench_model, model_input
from tests.perf.peak import fma_peak, ort_matmul_gflops
from tests.perf.shipped import fixture_cases
from tests.perf.timing import interleaved, percentile, process_tree_cpu_seconds


def test_interleaved_timing_reports_every_variant_and_ratio() -> None:
    calls = {"a": 0, "b": 0}

    def a() -> None:
        calls["a"] += 1

    def b() -> None:
        calls["b"] += 1
        sum(range(2000))

    stats = interleaved({"a": a, "b": b}, rounds=3, block_s=0.001, refs=["a"])
    assert set(stats) == {"a", "b"}
    assert stats["a"].ratios["a"] == 1.0  # a round's median against itself
    assert all(s.n >= 3 and len(s.rounds_ms) == 3 for s in stats.values())
    assert calls["a"] >= stats["a"].n and calls["b"] >= stats["b"].n
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_process_tree_cpu_counts_live_descendants() -> None:
    """A child burning CPU shows up in its parent's tree while it runs."""
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    child = subprocess.Popen(
        [sys.executable, "-c", spin + "print('spun', flush=True)\ntime.sleep(30)"],
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"spun"
        assert process_tree_cpu_seconds(child.pid) >= 0.25  # clock ticks of 10 ms
        assert process_tree_cpu_seconds(os.getpid()) >= process_tree_cpu_seconds(child.pid)
    finally:
        child.kill()
        child.wait()
    assert process_tree_cpu_seconds(child.pid) == 0.0  # reaped: gone from /proc


def test_flops_are_counted_from_the_graph(tmp_path: Path) -> None:
    build_models_dir(tmp_path)
    seg = graph_flops(tmp_path / "tinyseg" / "1.0.0" / "model.onnx", (2, 1, SIZE, SIZE))
    # one 1×1 Conv, 1 → 3 channels: 2 FLOP × 3 outputs per pixel × 2 images
    assert seg["total"] == 2 * 3 * SIZE * SIZE * 2


def test_peak_calibrations_run() -> None:
    assert ort_matmul_gflops(1, n=128, reps=1) > 0
    peak = fma_peak(1, iterations=100_000, reps=1)
    if peak:  # no C compiler: the other calibrations stand in
        assert peak["fma_gflops_1core"] > 0 and peak["fma_lanes"] in (8.0, 16.0)


@pytest.fixture(scope="module")
def tiny_unet(tmp_path_factory: pytest.TempPathFactory) -> ModelCase:
    """A real (small) U-Net from models/training, exported to ONNX with a manifest, plus its
    INT8 version from models/training/quantize.py and the PyTorch module as its twin."""
    import torch

    from models.training.quantize import quantize
    from models.training.unet import UNet

    root = tmp_path_factory.mktemp("tiny-unet")
    folder = root / "tinyunet" / "1.0.0"
    folder.mkdir(parents=True)
    torch.manual_seed(0)
    net = UNet(base=4).eval()
    torch.onnx.export(
        net,
        (torch.zeros(2, 1, 32, 32),),
        str(folder / "model.onnx"),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "N"}, "logits": {0: "N"}},
        dynamo=False,
    )
    manifest = {
        "name": "tinyunet",
        "version": "1.0.0",
        "task": "segmentation",
        "sha256": "0" * 64,
        "inputs": [{"name": "image", "shape": ["N", 1, 32, 32]}],
        "outputs": [{"name": "logits", "shape": ["N", 3, 32, 32], "role": "logits"}],
        "preprocessing": {
            "window": {"center": -400, "width": 1600},
            "size": [32, 32],
            "batch_size": 4,
        },
        "labels": [
            {"value": 0, "name": "background"},
            {"value": 1, "name": "lung"},
            {"value": 2, "name": "nodule"},
        ],
        "saliency": {"methods": ["entropy"]},
    }
    import hashlib

    manifest["sha256"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(manifest))
    fp32 = load_registry(root)["tinyunet:1.0.0"]
    calib = np.random.default_rng(1).random((8, 1, 32, 32), dtype=np.float32)
    q_dir = root / "tinyunet" / "1.0.0-int8"
    q_dir.mkdir()
    info = quantize(fp32.onnx_path, fp32.manifest, q_dir / "model.onnx", calib)
    assert info["kept_fp32"], "the full-resolution convolutions and the head stay fp32"
    data = fp32.manifest.model_dump(mode="json") | {"version": "1.0.0-int8", "default": False}
    data["sha256"] = hashlib.sha256((q_dir / "model.onnx").read_bytes()).hexdigest()
    (q_dir / "manifest.json").write_text(
        json.dumps(Manifest.model_validate(data).model_dump(mode="json"))
    )
    int8 = load_registry(root)["tinyunet:1.0.0-int8"]
    return ModelCase(model=fp32, int8=int8, torch_loader=lambda _m: net)


def test_model_bench_compares_ort_int8_and_torch_on_the_same_tensors(tiny_unet: ModelCase) -> None:
    frames = np.random.default_rng(2).normal(-500, 300, (4, 64, 64)).astype(np.float32)
    x = model_input(tiny_unet.model, frames)
    assert x.shape == (4, 1, 32, 32)
    res = bench_model(
        tiny_unet, x, threads=[1], batches=[1, 4], rounds=2, block_s=0.005, peak_gflops={1: 100.0}
    )
    variants = {(r["variant"], r["batch"]) for r in res.rows}
    assert variants == {
        (v, b) for v in ("ort_fp32_1t", "ort_int8_1t", "torch_fp32_1t") for b in (1, 4)
    }
    assert res.gflop_per_image > 0
    assert res.parity["logits"] < 1e-3  # the twin really has the same weights
    agree = res.int8_agreement
    assert 0.0 <= agree["mask_dice_mean"] <= 1.0 and agree["max_abs_logit_diff"] >= 0.0
    torch_row = next(r for r in res.rows if r["variant"] == "torch_fp32_1t")
    assert torch_row["vs_ort_fp32"] > 0 and torch_row["peak_fraction"] > 0
    replay = JobReplay([tiny_unet], {tiny_unet.model.manifest.key: x}).seconds(
        1, 5, {"tinyunet": 3}
    )
    assert set(replay) == {"infer:tinyunet", "saliency:tinyunet", "total"}
    assert replay["total"] == replay["infer:tinyunet"] + replay["saliency:tinyunet"] > 0


def test_end_to_end_and_ingest_on_a_live_deployment(tmp_path: Path) -> None:
    """Both deployment helpers, the job breakdown and the ingest load generator."""
    from models.training.phantoms import generate_series, write_dicom_series
    from tests.perf.deploy_bench import (
        deployment,
        idle_latency,
        relabelled,
        run_series,
        summarize_latency,
        throughput,
    )
    from tests.perf.ingest_bench import run_ingest

    models_dir = build_models_dir(tmp_path / "models")
    paths = write_dicom_series(generate_series(3, n_slices=4), tmp_path / "series", seed=3)[:2]
    keys = "tinycls:1.0.0,tinyseg:1.0.0"
    with deployment("embedded", tmp_path / "work", models_dir, workers=0, threads=1) as dep:
        with dep.client() as client:
            series = run_series(client, relabelled(paths, "smoke-series"), keys)
        idle = idle_latency(dep, paths[:1], keys, 1, "smoke-idle")
        busy = throughput(dep, paths, keys, 2, "smoke-throughput")
        ingest = run_ingest(
            f"{dep.url}/api/v1/studies",
            dep.api_key,
            paths[0],
            tmp_path / "ingest",
            seconds=2,
            connections=2,
        )
    assert series.status == "succeeded" and series.slices == 2
    assert {"decode", "outputs"} <= set(series.timings)
    assert idle[0].status == "succeeded" and summarize_latency(idle)["n"] == 1
    # embedded: the jobs ran in the serve process tree, so its CPU grew and no worker's did
    assert busy["statuses"] == ["succeeded"] and busy["slices"] == 4
    assert busy["cpu_s"]["api"] > 0 and busy["cpu_s"]["workers"] == 0
    assert 0 < busy["cores_busy"] <= len(os.sched_getaffinity(0)) + 0.1
    # every answer is counted (errors included: the error rate is a result, not a precondition)
    assert ingest["requests"] > 0 and ingest["statuses"].get("202", 0) > 0
    assert sum(ingest["statuses"].values()) + ingest["socket_errors"]["read"] >= ingest["requests"]

    cases = fixture_cases(models_dir)
    fake_ms = {
        k: {"ms_per_image": {"ort_fp32_1t@16": 1.0}, "rows": [], "int8_agreement": {}}
        for k in (c.model.manifest.key for c in cases)
    }
    out = {
        "machine": report.machine_info(),
        "started": "now",
        "load_start": [0.0],
        "model_results": fake_ms,
        "e2e": {
            "models": keys,
            "embedded": {
                "worker_processes": 1,
                "threads_per_worker": 1,
                "series": series.to_json(),
                "idle": [r.to_json() for r in idle],
                "idle_summary": summarize_latency(idle),
            },
            "scaling": {"one_worker": busy, "two_workers": busy},
        },
        "ingest": ingest,
    }
    out.update(analysis.headline(out, cases, 1))
    rows = out["e2e"]["embedded"]["breakdown"]
    assert math.isclose(
        sum(r["seconds"] for r in rows if not math.isnan(r["seconds"])),
        series.time_to_result_s,
        rel_tol=1e-6,
    )
    assert out["ingest_uploads_per_s"] > 0 and out["pipeline_vs_model_ratio"] > 0
    assert out["two_worker_scaling"] == 1.0
    assert out["two_worker_scaling_cpu_ceiling"] == pytest.approx(1 / busy["cores_busy"])
    buf = io.StringIO()
    report.print_report(out, Console(file=buf, width=200))
    assert "targets (issue 8)" in buf.getvalue()


def test_ingest_template_has_fixed_width_placeholders(tmp_path: Path) -> None:
    from models.training.phantoms import generate_series, write_dicom_series

    path = write_dicom_series(generate_series(5, n_slices=4), tmp_path, seed=5)[0]
    instance = template_instance(path)
    assert instance.count(SOP_PLACEHOLDER.encode()) == 2  # file meta + data set
    assert instance.count(SERIES_PLACEHOLDER.encode()) == 1
    assert len(instance) > 500_000  # a 512 × 512 16-bit CT slice
    body = multipart_body(instance)
    assert body.endswith(b"--\r\n") and instance in body


def test_fixture_cases_cover_every_fixture(tmp_path: Path) -> None:
    build_models_dir(tmp_path)
    assert [c.model.manifest.key for c in fixture_cases(tmp_path)] == [
        "tinycls:1.0.0",
        "tinyseg:1.0.0",
    ]
