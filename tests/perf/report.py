"""The printed side of ``make bench``: machine facts and rich tables from bench.json data."""

from __future__ import annotations

import math
import os
import platform
from typing import Any

from rich.console import Console
from rich.table import Table

from tests.perf.peak import cpu_model, simd_summary

TARGETS: list[tuple[str, str, float, str]] = [
    ("pipeline_vs_model_ratio", ">=", 0.9, "end-to-end slices/s vs model-only (worse shape)"),
    (
        "ort_fp32_peak_fraction",
        ">=",
        0.75,
        "ORT fp32 GFLOP/s / FMA-kernel peak, same cores (U-Net)",
    ),
    ("ort_vs_torch_speedup", ">=", 1.5, "PyTorch eager time / ORT fp32 time (U-Net)"),
    ("int8_speedup", ">=", 2.5, "ORT fp32 time / INT8 time (U-Net)"),
    ("int8_mask_dice_vs_fp32", ">=", 0.99, "INT8 vs fp32 mask Dice (worst seg model)"),
    (
        "idle_slice_overhead_ms",
        "<=",
        150.0,
        "idle 1-slice time-to-result − model time (worse shape)",
    ),
    ("ingest_uploads_per_s", ">=", 80.0, "0.5 MB uploads/s, one API process"),
    ("ingest_p99_ms", "<", 300.0, "upload p99 latency"),
    ("two_worker_scaling", ">=", 1.8, "slices/s with 2 worker processes / with 1"),
]


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import numpy
    import onnxruntime

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)),
        "simd": simd_summary(),
        "python": platform.python_version(),
        "os": platform.platform(),
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
    }
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:
        info["torch"] = None
    try:
        mem = next(ln for ln in open("/proc/meminfo") if ln.startswith("MemTotal"))
        info["memory_gib"] = round(int(mem.split()[1]) / 2**20, 1)
    except (OSError, StopIteration):
        pass
    return info


def _f(v: Any, digits: int = 2) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _met(value: Any, op: str, target: float) -> str:
    if value is None:
        return "not measured"
    ok = {">=": value >= target, "<=": value <= target, "<": value < target}[op]
    return "[green]met[/green]" if ok else "[red]NOT met[/red]"


def print_report(out: dict[str, Any], console: Console | None = None) -> None:
    """Print every table of a bench result."""
    c = console or Console(width=160)
    m = out["machine"]
    c.print(
        f"[bold]medcad bench[/bold] {out.get('started')} — {m['cpu']}, {m['cores']} cores, "
        f"SIMD {' '.join(m['simd'])}, onnxruntime {m['onnxruntime']}, torch {m.get('torch')}; "
        f"models: {out.get('models_source')}; load average {_f(out['load_start'][0])} at start, "
        f"{_f(out.get('load_end', [math.nan])[0])} at end"
    )
    peak = out.get("peak") or {}
    if peak:
        c.print(
            f"fp32 peak: FMA kernel {_f(peak.get('fma_gflops_1core'), 1)} GFLOP/s per core, "
            f"{_f(peak.get('fma_gflops_all'), 1)} on all cores; ORT MatMul {_f(peak.get('ort_matmul_gflops'), 1)}; "
            f"numpy matmul {_f(peak.get('numpy_matmul_gflops'), 1)} → peak used {_f(peak.get('peak_gflops'), 1)} "
            f"(1 core {_f(peak.get('peak_gflops_1core'), 1)})"
        )
    _models_table(c, out)
    _e2e_tables(c, out)
    ing = out.get("ingest")
    if ing:
        c.print(
            f"ingest ({ing['tool']}, {ing['connections']} connections, {ing['instance_bytes'] / 1e6:.2f} MB "
            f"instances): {_f(ing['uploads_per_s'], 1)} uploads/s, p50 {_f(ing['p50_ms'], 1)} ms, "
            f"p95 {_f(ing['p95_ms'], 1)} ms, p99 {_f(ing['p99_ms'], 1)} ms, errors {ing['errors']} "
            f"of {ing['requests']} ({_f(100 * ing['error_rate'], 2)} %); API CPU "
            f"{_f(ing.get('api_cpu_ms_per_upload'), 1)} ms per upload"
        )
    t = Table(title="targets (issue 8)")
    for col in ("key", "value", "target", "status", "meaning"):
        t.add_column(col)
    for key, op, target, meaning in TARGETS:
        v = out.get(key)
        t.add_row(key, _f(v, 3), f"{op} {target:g}", _met(v, op, target), meaning)
    c.print(t)


def _models_table(c: Console, out: dict[str, Any]) -> None:
    res = out.get("model_results") or {}
    if not res:
        return
    t = Table(
        title="model-only: onnxruntime vs PyTorch eager, same tensors (median of interleaved rounds)"
    )
    for col in (
        "model",
        "GFLOP/img",
        "batch",
        "variant",
        "ms/batch",
        "ms/img",
        "GFLOP/s",
        "% peak",
        "time vs ORT fp32",
    ):
        t.add_column(col, justify="right" if col not in ("model", "variant") else "left")
    for key, r in res.items():
        for row in r["rows"]:
            t.add_row(
                key,
                _f(r["gflop_per_image"], 3),
                str(row["batch"]),
                row["variant"],
                _f(row["median_ms"], 1),
                _f(row["ms_per_image"], 2),
                _f(row["gflops"], 1),
                _f(100 * row["peak_fraction"], 0) if row.get("peak_fraction") else "—",
                _f(row.get("vs_ort_fp32"), 2),
            )
    c.print(t)
    for key, r in res.items():
        extra = []
        if r.get("parity"):
            extra.append(
                "torch↔ORT max |Δ| " + ", ".join(f"{k} {v:.2e}" for k, v in r["parity"].items())
            )
        if r.get("int8_agreement"):
            extra.append(
                "INT8 vs fp32 " + ", ".join(f"{k} {v:.4f}" for k, v in r["int8_agreement"].items())
            )
        if extra:
            c.print(f"  {key}: " + "; ".join(extra))
    tp = out.get("model_only_multiprocess_images_per_s") or {}
    if tp:
        c.print(
            "  model-only, all cores as 1-thread processes: "
            + ", ".join(f"{k} {v:.1f} img/s" for k, v in tp.items())
        )


def _shapes(e2e: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The deployment shapes the run measured, in report order."""
    return [(shape, e2e[shape]) for shape in ("embedded", "redis_pg") if e2e.get(shape)]


def _after_results(d: dict[str, Any]) -> str:
    """What follows the result rows of a shape's series: its DICOM objects, then success."""
    s = d["series"]
    return (
        f"After the result rows: DICOM objects (SEG, SR, Parametric Maps) "
        f"{_f((s.get('timings') or {}).get('dicom'), 2)} s, the job succeeded "
        f"{_f(s.get('time_to_complete_s'), 2)} s after the upload began."
    )


def _e2e_tables(c: Console, out: dict[str, Any]) -> None:
    e2e = out.get("e2e") or {}
    if not e2e:
        return
    t = Table(
        title=f"end to end: one {e2e.get('embedded', e2e.get('redis_pg', {})).get('series', {}).get('slices', '?')}-slice series, models {e2e.get('models')}"
    )
    for col in (
        "shape",
        "workers × threads",
        "time-to-result s",
        "time-to-complete s",
        "slices/s",
        "model-only s",
        "model-only slices/s",
        "ratio",
        "idle p50 ms",
        "idle p95 ms",
        "idle complete p50 ms",
        "idle model ms",
        "idle overhead p50 ms",
    ):
        t.add_column(col)
    for shape, d in _shapes(e2e):
        s = d["series"]
        t.add_row(
            shape,
            f"{d['worker_processes']} × {d['threads_per_worker']}",
            _f(s["time_to_result_s"], 2),
            _f(s.get("time_to_complete_s"), 2),
            _f(d.get("series_slices_per_s"), 1),
            _f(d.get("series_model_bound_s"), 2),
            _f(d.get("series_model_only_slices_per_s"), 1),
            _f(d.get("pipeline_vs_model_ratio"), 3),
            _f(d["idle_summary"]["p50_ms"], 0),
            _f(d["idle_summary"]["p95_ms"], 0),
            _f(d["idle_summary"].get("complete_p50_ms"), 0),
            _f(d.get("idle_model_ms_p50"), 0),
            _f(d.get("idle_overhead_ms_p50"), 0),
        )
    c.print(t)
    for shape, d in _shapes(e2e):
        if "breakdown" not in d:
            continue
        b = Table(title=f"where the time goes: {shape}, {d['series']['slices']}-slice series")
        for col in ("stage", "seconds", "model-only s", "overhead s", "% of time-to-result"):
            b.add_column(col)
        total = d["series"]["time_to_result_s"]
        for r in d["breakdown"]:
            b.add_row(
                r["stage"],
                _f(r["seconds"], 3),
                _f(r["model_bound"], 3),
                _f(r["overhead"], 3),
                _f(100 * r["seconds"] / total, 1),
            )
        c.print(b)
        c.print(_after_results(d))
    sc = e2e.get("scaling")
    if sc:
        one, two = sc["one_worker"], sc["two_workers"]
        c.print(
            f"scaling ({one['jobs']} jobs × {one['slices'] // max(1, one['jobs'])} slices, Redis + PostgreSQL, 1 thread per worker): "
            f"1 worker {_f(one['slices_per_s'], 2)} slices/s ({_f(one['makespan_s'], 1)} s), "
            f"2 workers {_f(two['slices_per_s'], 2)} slices/s ({_f(two['makespan_s'], 1)} s) → "
            f"{_f(two['slices_per_s'] / one['slices_per_s'], 2)}×; model-only 2-process scaling "
            f"{_f(out.get('model_only_two_process_scaling'), 2)}×; cores busy with 1 worker "
            f"{_f(one.get('cores_busy'), 2)}, with 2 {_f(two.get('cores_busy'), 2)} "
            f"(ceiling on this machine {_f(out.get('two_worker_scaling_cpu_ceiling'), 2)}×)"
        )


def markdown(out: dict[str, Any]) -> str:
    """The README's performance tables from a bench.json."""
    m = out["machine"]
    lines = [
        f"Measured {out.get('started')} on {m['cpu']} ({m['cores']} vCPU, SIMD "
        f"{' '.join(m['simd'])}, {m.get('memory_gib')} GiB), onnxruntime {m['onnxruntime']}, "
        f"torch {m.get('torch')}, Python {m['python']}; load average {_f(out['load_start'][0])} "
        f"at start, {_f(out.get('load_end', [math.nan])[0])} at end (shared machine).",
        "",
        "| model | GFLOP/img | batch | variant | ms/img | GFLOP/s | % of MatMul peak | time / ORT fp32 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, r in (out.get("model_results") or {}).items():
        for row in r["rows"]:
            pf = row.get("peak_fraction")
            lines.append(
                f"| {key} | {_f(r['gflop_per_image'], 2)} | {row['batch']} | {row['variant']} | "
                f"{_f(row['ms_per_image'], 1)} | {_f(row['gflops'], 1)} | "
                f"{_f(100 * pf, 0) if pf else '—'} | {_f(row.get('vs_ort_fp32'), 2)} |"
            )
    peak = out.get("peak") or {}
    lines += [
        "",
        f"fp32 peak: FMA kernel {_f(peak.get('fma_gflops_1core'), 1)} GFLOP/s per core "
        f"({_f(peak.get('fma_gflops_all'), 1)} all cores); onnxruntime 1024³ MatMul in the same "
        f"rounds as each model (the '% of MatMul peak' column); numpy matmul "
        f"{_f(peak.get('numpy_matmul_gflops'), 1)}.",
        "",
        "| shape | workers × threads | series time-to-result s (complete) | slices/s | model-only s | ratio (complete) | idle p50 / p95 ms (complete p50) | idle model ms | idle overhead ms |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    e2e = out.get("e2e") or {}
    for shape, d in _shapes(e2e):
        s = d["series"]
        lines.append(
            f"| {shape} | {d['worker_processes']} × {d['threads_per_worker']} | "
            f"{_f(s['time_to_result_s'], 1)} ({_f(s.get('time_to_complete_s'), 1)}) | "
            f"{_f(d.get('series_slices_per_s'), 2)} | {_f(d.get('series_model_bound_s'), 1)} | "
            f"{_f(d.get('pipeline_vs_model_ratio'), 3)} "
            f"({_f(d.get('pipeline_vs_model_ratio_complete'), 3)}) | "
            f"{_f(d['idle_summary']['p50_ms'], 0)} / {_f(d['idle_summary']['p95_ms'], 0)} "
            f"({_f(d['idle_summary'].get('complete_p50_ms'), 0)}) | "
            f"{_f(d.get('idle_model_ms_p50'), 0)} | {_f(d.get('idle_overhead_ms_p50'), 0)} |"
        )
    for shape, d in _shapes(e2e):
        if "breakdown" not in d:
            continue
        total = d["series"]["time_to_result_s"]
        lines += [
            "",
            f"Where the time goes ({shape}, {d['series']['slices']} slices):",
            "",
            "| stage | s | model-only s | % |",
            "|---|---|---|---|",
        ]
        for r in d["breakdown"]:
            lines.append(
                f"| {r['stage']} | {_f(r['seconds'], 2)} | {_f(r['model_bound'], 2)} | "
                f"{_f(100 * r['seconds'] / total, 1)} |"
            )
        lines += ["", _after_results(d)]
    sc = e2e.get("scaling")
    if sc:
        one, two = sc["one_worker"], sc["two_workers"]
        lines += [
            "",
            f"Scaling ({one['jobs']} series × {one['slices'] // max(1, one['jobs'])} slices, "
            f"1 thread per worker): 1 worker {_f(one['slices_per_s'], 2)} slices/s, 2 workers "
            f"{_f(two['slices_per_s'], 2)} slices/s; model-only with 2 processes "
            f"{_f(out.get('model_only_two_process_scaling'), 2)} × one. CPU of all medcad "
            f"processes per second of the run: {_f(one.get('cores_busy'), 2)} cores with 1 "
            f"worker, {_f(two.get('cores_busy'), 2)} with 2, so 2 workers could at most reach "
            f"{_f(out.get('two_worker_scaling_cpu_ceiling'), 2)} × one on these cores.",
        ]
    ing = out.get("ingest")
    if ing:
        lines += [
            "",
            f"Ingest ({ing['tool']}, {ing['connections']} connections, "
            f"{ing['instance_bytes'] / 1e6:.2f} MB instances, one API process, PostgreSQL + "
            f"Redis): {_f(ing['uploads_per_s'], 1)} uploads/s, p50 {_f(ing['p50_ms'], 0)} ms, "
            f"p95 {_f(ing['p95_ms'], 0)} ms, p99 {_f(ing['p99_ms'], 0)} ms, "
            f"{ing['errors']} errors in {ing['requests']} requests (statuses {ing.get('statuses')}); "
            f"the API process spent {_f(ing.get('api_cpu_ms_per_upload'), 1)} ms of CPU per upload.",
        ]
    lines += ["", "| key | value | target | |", "|---|---|---|---|"]
    for key, op, target, _meaning in TARGETS:
        v = out.get(key)
        status = "not measured" if v is None else _met(v, op, target).split("]")[1].split("[")[0]
        lines.append(f"| `{key}` | {_f(v, 3)} | {op} {target:g} | {status} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import json
    import sys

    print(markdown(json.loads(open(sys.argv[1]).read())))
