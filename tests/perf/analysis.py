"""From raw measurements to the headline numbers and to where the pipeline loses time.

The model-only bound of a job is the time the shipped sessions need for the forward passes
that job really made: every slice once per model, plus the perturbation-saliency passes the
results report (``params.passes``), each at the per-image time measured for the manifest's
batch size and the deployment's thread count.
"""

from __future__ import annotations

import math
import statistics
from datetime import datetime
from typing import Any

from tests.perf.model_bench import ModelCase


def _key_of(cases: list[ModelCase], name: str) -> str | None:
    return next((c.model.manifest.key for c in cases if c.model.manifest.name == name), None)


def _batch(cases: list[ModelCase], key: str) -> int:
    return next(
        c.model.manifest.preprocessing.batch_size for c in cases if c.model.manifest.key == key
    )


def ms_per_image(
    out: dict[str, Any], cases: list[ModelCase], key: str, variant: str, threads: int
) -> float:
    """Median ms per image of ``variant`` (e.g. ``ort_fp32``) at the manifest batch size."""
    res = out.get("model_results", {}).get(key)
    if not res:
        return math.nan
    return float(res["ms_per_image"].get(f"{variant}_{threads}t@{_batch(cases, key)}", math.nan))


def job_bound_s(
    out: dict[str, Any], cases: list[ModelCase], slices: int, passes: dict[str, int], threads: int
) -> dict[str, float]:
    """Model-only seconds of one job: per model, its slices and its saliency passes."""
    bound: dict[str, float] = {}
    for case in cases:
        key, name = case.model.manifest.key, case.model.manifest.name
        ms = ms_per_image(out, cases, key, "ort_fp32", threads)
        passes_per_slice = case.model.manifest.passes_per_frame  # test-time augmentation
        bound[f"infer:{name}"] = slices * passes_per_slice * ms / 1e3
        bound[f"saliency:{name}"] = passes.get(name, 0) * ms / 1e3
    bound["total"] = sum(bound.values())
    return bound


def _parse(ts: str | None) -> datetime | None:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")) if ts else None


def breakdown(
    run: dict[str, Any],
    out: dict[str, Any],
    cases: list[ModelCase],
    threads: int,
    replay: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """Time-to-result of one job split into stages, each with the model-only part it holds
    (from the job's replay when given, else from the model section's per-image times)."""
    t = run["timings"]
    names = [c.model.manifest.name for c in cases]
    bound = replay or job_bound_s(out, cases, run["slices"], run["passes"], threads)
    created, started = (
        _parse(run["server"].get("created_at")),
        _parse(run["server"].get("started_at")),
    )
    queue = (started - created).total_seconds() if created and started else math.nan
    rows = [
        {"stage": "upload (client → 202)", "seconds": run["upload_s"], "model_bound": 0.0},
        {"stage": "queue wait (created → claimed)", "seconds": queue, "model_bound": 0.0},
        {"stage": "decode", "seconds": t.get("decode", math.nan), "model_bound": 0.0},
    ]
    for n in names:
        rows.append(
            {
                "stage": f"preprocess {n}",
                "seconds": t.get(f"preprocess:{n}", math.nan),
                "model_bound": 0.0,
            }
        )
        rows.append(
            {
                "stage": f"infer {n}",
                "seconds": t.get(f"infer:{n}", math.nan),
                "model_bound": bound[f"infer:{n}"],
            }
        )
        rows.append(
            {
                "stage": f"postprocess+saliency {n} ({run['passes'].get(n, 0)} passes)",
                "seconds": t.get(f"postprocess_saliency:{n}", math.nan),
                "model_bound": bound[f"saliency:{n}"],
            }
        )
    rows.append(
        {
            "stage": "outputs (PNGs, maps, rows; blobs)",
            "seconds": t.get("outputs", math.nan),
            "model_bound": 0.0,
        }
    )
    rows.append(
        {
            "stage": "commit (result rows, one transaction)",
            "seconds": t.get("commit", math.nan),
            "model_bound": 0.0,
        }
    )
    known = sum(r["seconds"] for r in rows if not math.isnan(r["seconds"]))
    rows.append(
        {
            "stage": "other (claim, leases, polling, result read)",
            "seconds": run["time_to_result_s"] - known,
            "model_bound": 0.0,
        }
    )
    for r in rows:
        r["overhead"] = r["seconds"] - r["model_bound"]
    return rows


def _nan_to_none(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def headline(out: dict[str, Any], cases: list[ModelCase], n_cores: int) -> dict[str, Any]:
    """The bench.json keys of issue 8 plus the details they come from."""
    h: dict[str, Any] = {}
    unet = _key_of(cases, "unet") or (cases[0].model.manifest.key if cases else None)
    rows = out.get("model_results", {}).get(unet, {}).get("rows", []) if unet else []
    batch = _batch(cases, unet) if unet else 0

    def row(variant: str, threads: int) -> dict[str, Any]:
        return next(
            (r for r in rows if r["variant"] == f"{variant}_{threads}t" and r["batch"] == batch), {}
        )

    fp32 = row("ort_fp32", n_cores)
    h["reference_model"] = unet
    # against the FMA kernel's peak (the strict reading); against onnxruntime's own 1024³
    # MatMul timed in the same rounds (robust to load) as a second number
    h["ort_fp32_peak_fraction"] = fp32.get("fma_peak_fraction") or fp32.get("peak_fraction")
    h["ort_fp32_matmul_fraction"] = fp32.get("peak_fraction")
    torch_row = row("torch_fp32", n_cores)
    h["ort_vs_torch_speedup"] = torch_row.get("vs_ort_fp32")  # torch time / ORT time
    int8_row = row("ort_int8", n_cores)
    h["int8_speedup"] = 1.0 / int8_row["vs_ort_fp32"] if int8_row.get("vs_ort_fp32") else None
    int8_1t = row("ort_int8", 1)
    h["int8_speedup_1thread"] = 1.0 / int8_1t["vs_ort_fp32"] if int8_1t.get("vs_ort_fp32") else None
    dice = [
        r["int8_agreement"]["mask_dice_mean"]
        for r in out.get("model_results", {}).values()
        if "mask_dice_mean" in r.get("int8_agreement", {})
    ]
    h["int8_mask_dice_vs_fp32"] = min(dice) if dice else None

    e2e = out.get("e2e", {})
    ratios, overheads, complete_ratios, complete_overheads = {}, {}, {}, {}
    for shape, threads in (
        ("embedded", e2e.get("embedded", {}).get("threads_per_worker", n_cores)),
        ("redis_pg", 1),
    ):
        d = e2e.get(shape)
        if not d:
            continue
        s = d["series"]
        rounds = d.get("series_rounds") or []
        replay = rounds[-1]["replay_s"] if rounds else None
        bound = (
            replay["total"]
            if replay
            else job_bound_s(out, cases, s["slices"], s["passes"], threads)["total"]
        )
        d["series_model_bound_s"] = bound
        d["series_model_bound_from_model_section_s"] = job_bound_s(
            out, cases, s["slices"], s["passes"], threads
        )["total"]
        d["series_slices_per_s"] = s["slices"] / s["time_to_result_s"]
        d["series_model_only_slices_per_s"] = s["slices"] / bound if bound else math.nan
        # median over rounds of (model-only replay / time-to-result), each pair measured together
        ratios[shape] = (
            statistics.median(r["ratio"] for r in rounds)
            if rounds
            else bound / s["time_to_result_s"]
        )
        d["pipeline_vs_model_ratio"] = ratios[shape]
        # the same, to the job's success (its DICOM objects stored too)
        d["pipeline_vs_model_ratio_complete"] = (
            statistics.median(r.get("ratio_complete", math.nan) for r in rounds)
            if rounds
            else bound / s.get("time_to_complete_s", math.nan)
        )
        d["breakdown"] = breakdown(s, out, cases, threads, replay)
        # each idle run's model-only time, once: both overheads are measured against it
        model_ms = [
            1e3 * job_bound_s(out, cases, r["slices"], r["passes"], threads)["total"]
            for r in d["idle"]
        ]
        over = [1e3 * r["time_to_result_s"] - m for r, m in zip(d["idle"], model_ms, strict=True)]
        over_complete = [
            1e3 * r.get("time_to_complete_s", math.nan) - m
            for r, m in zip(d["idle"], model_ms, strict=True)
        ]
        d["idle_overhead_ms_p50"] = statistics.median(over) if over else math.nan
        d["idle_overhead_ms_p95"] = (
            sorted(over)[max(0, math.ceil(0.95 * len(over)) - 1)] if over else math.nan
        )
        d["idle_model_ms_p50"] = statistics.median(model_ms) if model_ms else math.nan
        d["idle_complete_overhead_ms_p50"] = (
            statistics.median(over_complete) if over_complete else math.nan
        )
        overheads[shape] = d["idle_overhead_ms_p50"]
        complete_ratios[shape] = d["pipeline_vs_model_ratio_complete"]
        complete_overheads[shape] = d["idle_complete_overhead_ms_p50"]
    # the worse deployment shape is the headline; both are in the table
    h["pipeline_vs_model_ratio"] = min(ratios.values()) if ratios else None
    h["idle_slice_overhead_ms"] = max(overheads.values()) if overheads else None
    # beside the keys, not targets: the same to the job's success (DICOM objects stored too)
    h["pipeline_vs_model_ratio_complete"] = (
        min(complete_ratios.values()) if complete_ratios else None
    )
    h["idle_complete_overhead_ms"] = (
        max(complete_overheads.values()) if complete_overheads else None
    )
    sc = e2e.get("scaling")
    h["two_worker_scaling"] = (
        sc["two_workers"]["slices_per_s"] / sc["one_worker"]["slices_per_s"] if sc else None
    )
    busy = sc["one_worker"].get("cores_busy") if sc else None
    # One worker process already keeps more than one core busy when its output builder
    # overlaps the next model's inference (and the API takes its share): 2 workers can then
    # add at most the cores that were left idle.
    h["one_worker_cores_busy"] = busy
    h["two_worker_scaling_cpu_ceiling"] = n_cores / busy if busy else None
    tp2 = out.get("model_only_multiprocess_images_per_s", {})
    if sc and tp2:
        one_t = {k: ms_per_image(out, cases, k, "ort_fp32", 1) for k in tp2}
        h["model_only_two_process_scaling"] = statistics.fmean(tp2[k] * one_t[k] / 1e3 for k in tp2)
    ing = out.get("ingest")
    h["ingest_uploads_per_s"] = ing["uploads_per_s"] if ing else None
    h["ingest_api_cpu_ms_per_upload"] = ing.get("api_cpu_ms_per_upload") if ing else None
    h["ingest_p99_ms"] = ing["p99_ms"] if ing else None
    h["ingest_error_rate"] = ing["error_rate"] if ing else None
    return {k: _nan_to_none(v) if isinstance(v, float) else v for k, v in h.items()}
