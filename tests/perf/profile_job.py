"""Profile one job's worker stages in-process (no API, no queue, no database commit).

    python tests/perf/profile_job.py [--slices 100] [--models-dir DIR] [--top 25] [--threads N]
                                     [--budget PASSES] [--no-profile] [--json]

Runs the runner's own functions on a demo series — ``decode_series`` → ``analyze_series`` per
model → ``build_records`` — under cProfile, and prints per-stage wall and CPU times (CPU time of
this process, all threads) and the functions with the most cumulative time. It is how the causes
in the benchmark's "where the time goes" table were found. CPU seconds are the robust figure on a
shared machine: wall time stretches with the load, the work a stage does does not.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from app.db.records import InstanceRecord  # noqa: E402
from app.registry.service import latest_versions, load_registry  # noqa: E402
from app.settings import Settings  # noqa: E402
from app.storage import BlobStore  # noqa: E402
from tests.perf.deploy_bench import demo_series  # noqa: E402
from workers import onnx_sessions, runner  # noqa: E402
from workers.analysis import analyze_series  # noqa: E402
from workers.series import decode_series  # noqa: E402


def instance_rows(paths: list[Path], store: BlobStore) -> list[InstanceRecord]:
    """Unsaved instance records whose blobs are in ``store`` (what the runner reads)."""
    import pydicom

    rows = []
    for path in paths:
        data = path.read_bytes()
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        rows.append(
            InstanceRecord(
                sop_instance_uid=str(ds.SOPInstanceUID),
                blob_sha256=store.put(data),
                instance_number=int(ds.InstanceNumber),
                slice_position=float(ds.ImagePositionPatient[2]),
            )
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--models-dir", type=Path, default=REPO / "models")
    p.add_argument(
        "--models", default="", help="comma list of name:version (default: the served releases)"
    )
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--sort", default="cumulative")
    p.add_argument("--no-profile", action="store_true", help="stage times only (no cProfile)")
    p.add_argument("--budget", type=int, default=0, help="saliency passes per model (0: default)")
    p.add_argument("--json", action="store_true", help="print the stage times as one JSON line")
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="build the outputs this many times and report the last (the first pays the "
        "process's one-off imports and caches, as a worker's first job does)",
    )
    args = p.parse_args(argv)
    registry = load_registry(args.models_dir)
    keys = [k for k in args.models.split(",") if k] or sorted(
        m.manifest.key for m in latest_versions(registry).values()
    )
    models = [registry[k] for k in keys]
    folder = demo_series(REPO / "test-artifacts" / "bench" / "data", n_slices=100, seed=7)
    paths = sorted(folder.glob("slice_*.dcm"))[: args.slices]
    with tempfile.TemporaryDirectory(prefix="medcad-profile-") as tmp:
        settings = Settings(data_dir=Path(tmp), models_dir=args.models_dir)
        run = runner.JobRun("profile-job", settings, "profiler")
        rows = instance_rows(paths, run.store)
        stages: dict[str, float] = {}
        cpu: dict[str, float] = {}
        prof = cProfile.Profile()
        if not args.no_profile:
            prof.enable()
        t0, c0 = time.perf_counter(), time.process_time()
        series = decode_series(rows, run.store)
        stages["decode"], cpu["decode"] = time.perf_counter() - t0, time.process_time() - c0
        analyses = []
        for model in models:
            session = onnx_sessions.get_session(model, intra_op_threads=args.threads)
            t0, c0 = time.perf_counter(), time.process_time()
            analysis = analyze_series(
                session.run,
                model.manifest,
                series.frames,
                max_forward_passes=args.budget
                or min(
                    settings.saliency_max_forward_passes, model.manifest.saliency.max_forward_passes
                ),
            )
            name = f"analyse {model.manifest.name}"
            stages[name], cpu[name] = time.perf_counter() - t0, time.process_time() - c0
            stages.update({f"  {k} {model.manifest.name}": v for k, v in analysis.timings.items()})
            analyses.append(analysis)
        for _ in range(max(1, args.repeat)):
            t0, c0 = time.perf_counter(), time.process_time()
            records = runner.build_records(run, series, analyses)
            stages["outputs"], cpu["outputs"] = time.perf_counter() - t0, time.process_time() - c0
        prof.disable()
    if args.json:
        print(json.dumps({"wall": stages, "cpu": cpu, "records": len(records)}))
        return 0
    for name, seconds in stages.items():
        used = f"{cpu[name]:8.3f} s cpu" if name in cpu else ""
        print(f"{name:40s} {seconds:8.3f} s {used}")
    print(f"{len(records)} records, warnings: {run.warnings}")
    if args.no_profile:
        return 0
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats(args.sort).print_stats(args.top)
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
