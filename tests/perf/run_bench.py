"""``make bench``: medcad's performance against the hardware, measured side by side in one run.

    python tests/perf/run_bench.py [--quick] [--out bench.json] [--sections ...]

Sections (all by default): ``peak`` (fp32 FMA peak), ``models`` (model-only onnxruntime fp32 /
INT8 and PyTorch eager on the same preprocessed tensors), ``e2e`` (a demo CT series through
upload → queue → every model + default saliency → results, in the embedded shape and in the
Redis + PostgreSQL shape, idle single-slice latency, 1 vs 2 worker processes) and ``ingest``
(uploads/s of 0.5 MB instances with wrk). Writes ``bench.json`` (the numbers) and prints a table.

The machine may be shared: the load average is recorded before and after every section, and
every comparison is a ratio of interleaved measurements (see ``tests/perf/timing.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script by `make bench`
    sys.path.insert(0, str(REPO))

from tests.perf import analysis, report  # noqa: E402
from tests.perf.model_bench import (  # noqa: E402
    JobReplay,
    ModelCase,
    ModelResult,
    bench_model,
    cores,
    model_input,
    multiprocess_throughput,
)
from tests.perf.timing import loadavg, process_tree_cpu_seconds  # noqa: E402
from tests.reliability.harness import children, wait_until  # noqa: E402


@dataclass(frozen=True)
class Config:
    """How much to measure (``--quick`` trades precision for a run under 5 minutes)."""

    quick: bool
    rounds: int
    block_s: float
    batch_one: bool  # also time batch 1 (latency) besides the manifest batch size
    model_slices: int  # slices of the demo series fed to the model-only benchmark
    tp_seconds: float  # multi-process model-only throughput window
    e2e_slices: int
    idle_n: int
    scaling_jobs: int  # series per scaling round: several per worker, or start-up and tail dominate
    scaling_slices: int
    ingest_seconds: int
    ingest_connections: int
    saliency_budget: int | None  # None: every model's default saliency (the real workload)
    series_rounds: int  # e2e series runs per shape, each followed by its model-only replay

    @classmethod
    def make(cls, quick: bool) -> Config:
        if quick:
            return cls(True, 3, 0.15, False, 16, 3.0, 32, 5, 6, 8, 8, 8, 32, 1)
        return cls(False, 5, 0.3, True, 32, 6.0, 100, 10, 8, 25, 30, 8, None, 1)


def _section(name: str, log: list[dict[str, Any]]) -> float:
    print(f"== {name} (load {loadavg():.2f})", flush=True)
    log.append({"section": name, "start": time.strftime("%H:%M:%S"), "load_before": loadavg()})
    return time.perf_counter()


def _end(t0: float, log: list[dict[str, Any]]) -> None:
    log[-1].update(seconds=round(time.perf_counter() - t0, 1), load_after=loadavg())
    print(f"   done in {log[-1]['seconds']} s (load {loadavg():.2f})", flush=True)


def resolve_models(models_dir: Path | None, work: Path) -> tuple[Path, list[ModelCase], str]:
    """The shipped models if present, else the tiny fixtures (built under ``work``)."""
    from tests.perf.shipped import fixture_cases, shipped_cases

    shipped_dir = models_dir or REPO / "models"
    cases = shipped_cases(shipped_dir)
    if cases:
        return shipped_dir, cases, "shipped"
    from tests.fixtures.tiny_models import build_models_dir

    fixtures = build_models_dir(work / "fixture-models")
    return fixtures, fixture_cases(fixtures), "fixtures (shipped models not found)"


def run(args: argparse.Namespace) -> dict[str, Any]:
    cfg = Config.make(args.quick)
    work = REPO / "test-artifacts" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    sections = set(args.sections)
    log: list[dict[str, Any]] = []
    n_cores = cores()
    threads = sorted({1, n_cores})
    models_dir, cases, model_source = resolve_models(args.models_dir, work)
    out: dict[str, Any] = {
        "machine": report.machine_info(),
        "config": cfg.__dict__,
        "models_source": model_source,
        "models": [c.model.manifest.key for c in cases],
        "int8_models": [c.int8.manifest.key for c in cases if c.int8],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_start": os.getloadavg(),
    }
    from tests.perf import deploy_bench
    from tests.perf.deploy_bench import demo_series

    deploy_bench.SALIENCY_BUDGET = cfg.saliency_budget
    t0 = _section("demo data", log)
    series_dir = demo_series(work / "data", n_slices=100, seed=args.seed)
    paths = sorted(series_dir.glob("slice_*.dcm"))[: cfg.e2e_slices]
    _end(t0, log)

    peak: dict[str, float] = {}
    if "peak" in sections or "models" in sections:
        from tests.perf.peak import measure_peak

        t0 = _section("peak", log)
        peak = measure_peak(n_cores, quick=cfg.quick)
        _end(t0, log)
    out["peak"] = peak
    peak_by_threads = {n_cores: peak.get("peak_gflops", 0.0), 1: peak.get("peak_gflops_1core", 0.0)}

    results: dict[str, ModelResult] = {}
    tp2: dict[str, float] = {}
    inputs: dict[str, Any] = {}
    if "models" in sections:
        import numpy as np

        t0 = _section("models", log)
        frames = _read_frames(paths[: cfg.model_slices])
        for case in cases:
            x = model_input(case.model, frames)
            inputs[case.model.manifest.key] = x
            batches = sorted(
                {case.model.manifest.preprocessing.batch_size} | ({1} if cfg.batch_one else set())
            )
            print(f"   {case.model.manifest.key}: batches {batches}, threads {threads}", flush=True)
            results[case.model.manifest.key] = bench_model(
                case,
                x,
                threads=threads,
                batches=batches,
                rounds=cfg.rounds,
                block_s=cfg.block_s,
                peak_gflops=peak_by_threads,
            )
            if n_cores > 1:
                b = case.model.manifest.preprocessing.batch_size
                xb = np.ascontiguousarray(x[:b])
                tp2[case.model.manifest.key] = multiprocess_throughput(
                    case.model, xb, processes=n_cores, threads=1, seconds=cfg.tp_seconds
                )
        _end(t0, log)
    out["model_results"] = {k: v.to_json() for k, v in results.items()}
    out["model_only_multiprocess_images_per_s"] = tp2

    models_arg = ",".join(c.model.manifest.key for c in cases)
    if "e2e" in sections:
        if not inputs:  # the replay needs network inputs even without the models section
            frames = _read_frames(paths[:8])
            inputs = {c.model.manifest.key: model_input(c.model, frames) for c in cases}
        replay = JobReplay(cases, inputs)
        out["e2e"] = run_e2e(
            cfg, work, models_dir, models_arg, paths, series_dir, n_cores, log, replay
        )
    if "ingest" in sections:
        out["ingest"] = run_ingest_section(cfg, work, models_dir, paths, log)
    out["sections"] = log
    out["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    out["load_end"] = os.getloadavg()
    out.update(analysis.headline(out, cases, n_cores))
    return out


def _read_frames(paths: list[Path]) -> Any:
    """(F, 512, 512) float32 HU frames of demo slices, decoded by the worker's decoder."""
    import numpy as np
    import pydicom

    from workers.pipeline.decode import decode_frames

    return np.concatenate([decode_frames(pydicom.dcmread(p)).frames for p in paths])


def run_e2e(
    cfg: Config,
    work: Path,
    models_dir: Path,
    models_arg: str,
    paths: list[Path],
    series_dir: Path,
    n_cores: int,
    log: list[dict[str, Any]],
    replay: JobReplay,
) -> dict[str, Any]:
    """Both deployment shapes, idle latency, and 1 vs 2 worker processes.

    Each series run is followed by a replay of its forward passes in this process at the
    worker's thread count (``JobReplay``): the per-round ratio replay / time-to-result is the
    pipeline's efficiency, with both measured under the same load.
    """

    def series_rounds(dep: Any, tag: str, threads: int) -> list[dict[str, Any]]:
        rounds = []
        with dep.client() as client:
            for r in range(cfg.series_rounds):
                run_ = run_series(
                    client, relabelled(paths, f"{tag}-{r}-{time.time_ns()}"), models_arg
                )
                rep = replay.seconds(threads, run_.slices, run_.passes)
                rounds.append(
                    {
                        "run": run_.to_json(),
                        "replay_s": rep,
                        "ratio": rep["total"] / run_.time_to_result_s,
                        "ratio_complete": rep["total"] / run_.time_to_complete_s,
                    }
                )
                print(
                    f"   series round {r}: results {run_.time_to_result_s:.1f} s, complete "
                    f"{run_.time_to_complete_s:.1f} s, replay {rep['total']:.1f} s",
                    flush=True,
                )
        return rounds

    from tests.perf.deploy_bench import (
        deployment,
        idle_latency,
        nodule_free_slices,
        relabelled,
        run_series,
        summarize_latency,
        throughput,
        warm_up,
    )

    free = [paths[i] for i in nodule_free_slices(series_dir) if i < len(paths)] or paths
    out: dict[str, Any] = {"models": models_arg}
    t0 = _section("e2e embedded (serve + embedded worker, SQLite, filesystem broker)", log)
    with deployment("embedded", work, models_dir, workers=0, threads=n_cores) as dep:
        warm_up(dep, paths, models_arg, 1)
        rounds = series_rounds(dep, "e2e-emb", n_cores)
        idle = idle_latency(dep, free, models_arg, cfg.idle_n, f"idle-emb-{time.time_ns()}")
    out["embedded"] = {
        "worker_processes": 1,
        "threads_per_worker": n_cores,
        "series": rounds[-1]["run"],
        "series_rounds": rounds,
        "idle": [r.to_json() for r in idle],
        "idle_summary": summarize_latency(idle),
    }
    _end(t0, log)

    t0 = _section("e2e redis-pg, 1 worker process (scaling baseline)", log)
    scale_paths = paths[: cfg.scaling_slices]
    with deployment("redis-pg", work, models_dir, workers=1, threads=1) as dep:
        warm_up(dep, paths, models_arg, 1)
        one = throughput(dep, scale_paths, models_arg, cfg.scaling_jobs, f"scale1-{time.time_ns()}")
        _end(t0, log)
        t0 = _section("e2e redis-pg, 2 worker processes", log)
        second = dep.start_worker()
        # A worker that is still starting when the warm-up jobs arrive leaves them to the first
        # one and then builds its sessions inside the measurement (seen on a slower host: the
        # two workers spent 26 % more CPU on the same slices than one). Wait for its pool, then
        # give each worker more than one warm-up job to take.
        wait_until(lambda: children(second.pid), 120, 0.2, "second worker's pool started")
        time.sleep(2.0)
        warm_up(dep, paths, models_arg, 4)
        two = throughput(dep, scale_paths, models_arg, cfg.scaling_jobs, f"scale2-{time.time_ns()}")
        rounds_pg = series_rounds(dep, "e2e-pg", 1)
        idle_pg = idle_latency(dep, free, models_arg, cfg.idle_n, f"idle-pg-{time.time_ns()}")
    out["redis_pg"] = {
        "worker_processes": 2,
        "threads_per_worker": 1,
        "series": rounds_pg[-1]["run"],
        "series_rounds": rounds_pg,
        "idle": [r.to_json() for r in idle_pg],
        "idle_summary": summarize_latency(idle_pg),
    }
    out["scaling"] = {"one_worker": one, "two_workers": two}
    _end(t0, log)
    return out


def run_ingest_section(
    cfg: Config, work: Path, models_dir: Path, paths: list[Path], log: list[dict[str, Any]]
) -> dict[str, Any]:
    """One API process (no worker: jobs only queue) on PostgreSQL + Redis, loaded by wrk."""
    from tests.perf.deploy_bench import deployment
    from tests.perf.ingest_bench import run_ingest

    t0 = _section("ingest (serve --no-worker, PostgreSQL + Redis, wrk on loopback)", log)
    with deployment("redis-pg", work, models_dir, workers=0, threads=1, redis_db=15) as dep:
        api = dep.procs[0].pid
        cpu0 = process_tree_cpu_seconds(api)
        result = run_ingest(
            f"{dep.url}/api/v1/studies",
            dep.api_key,
            paths[0],
            work / "ingest",
            seconds=cfg.ingest_seconds,
            connections=cfg.ingest_connections,
        )
        # what one upload costs the API process on this CPU (its Python part runs under one
        # GIL; system calls and hashing may overlap it on another core)
        result["api_cpu_ms_per_upload"] = (
            1e3 * (process_tree_cpu_seconds(api) - cpu0) / max(1, result["requests"])
        )
    _end(t0, log)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="fewer rounds and smaller runs (< 5 min)")
    p.add_argument("--out", type=Path, default=REPO / "bench.json")
    p.add_argument("--models-dir", type=Path, default=None)
    p.add_argument("--seed", type=int, default=7, help="demo-data seed of the benchmark series")
    p.add_argument(
        "--sections",
        nargs="+",
        default=["peak", "models", "e2e", "ingest"],
        choices=["peak", "models", "e2e", "ingest"],
    )
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    out = run(args)
    out["total_seconds"] = round(time.perf_counter() - t0, 1)
    args.out.write_text(json.dumps(out, indent=1, default=float) + "\n")
    report.print_report(out)
    print(f"wrote {args.out} in {out['total_seconds']} s on {platform.node() or 'this host'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
