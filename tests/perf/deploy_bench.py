"""End to end through real processes: upload → queue → worker → results committed.

Both deployment shapes are started exactly as a user starts them (``medcad serve`` with its
embedded worker on SQLite and the filesystem broker; ``medcad serve --no-worker`` plus
``medcad worker`` processes on PostgreSQL and Redis) by ``tests.helpers.services``.

Time-to-result runs from the start of the upload request (client clock) to the job's
``results_at`` (server clock: the same host), which the worker stamps once the result rows
(masks, findings, saliency maps) are written, in the transaction that commits them and makes
them readable. The job succeeds a little later, once the DICOM objects built from those rows
(SEG, SR, Parametric Maps) are stored too: its ``finished_at`` gives the time-to-complete,
reported beside. The client polls the job every ``POLL_S`` only to learn that it finished:
polling every 20 ms, as this module first did, took CPU from the job it was timing (a
32-slice series on 2 cores, server-side stage times, alternating 20 ms and 1 s polling 4 times
each, medians: inference 7-16 %, the U-Net's occlusion 20 % and the outputs stage 24 % slower
with the fast polling). The server's per-stage timings come back with the job.
"""

from __future__ import annotations

import hashlib
import io
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom

from tests.helpers.services import (
    MedcadProcesses,
    medcad_deployment,
    postgres_database,
    redis_db_url,
)
from tests.perf.timing import percentile, process_tree_cpu_seconds

POLL_S = 0.25


def demo_series(root: Path, *, n_slices: int, seed: int) -> Path:
    """A phantom CT series of ``n_slices`` 512 × 512 slices (written once, then reused)."""
    from models.training.phantoms import write_demo_data

    folder = root / f"demo_{seed}_{n_slices}"
    done = folder / "series_000" / "lesions.json"
    if not done.exists():
        write_demo_data(folder, n=1, seed=seed, n_slices=n_slices)
    return folder / "series_000"


def _uid(tag: str, role: str) -> str:
    digest = int(hashlib.sha256(f"{tag}/{role}".encode()).hexdigest()[:24], 16)
    return f"2.25.{digest}"


def relabelled(paths: list[Path], tag: str) -> list[tuple[str, bytes]]:
    """The files of a series as a new study/series (fresh UIDs derived from ``tag``).

    The service deduplicates by SOP Instance UID, so every measured upload must be new data.
    """
    study, series = _uid(tag, "study"), _uid(tag, "series")
    out = []
    for k, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(tag, f"i{k}")
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((path.name, buf.getvalue()))
    return out


@dataclass
class JobRun:
    """One job as the client saw it."""

    job_id: str
    slices: int
    upload_s: float
    time_to_result_s: float  # upload start → the job's results_at (result rows readable)
    time_to_complete_s: float  # upload start → the job's finished_at (DICOM objects stored too)
    status: str
    timings: dict[str, float]
    passes: dict[str, int] = field(default_factory=dict)  # occlusion passes per model name
    server: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "slices": self.slices,
            "upload_s": self.upload_s,
            "time_to_result_s": self.time_to_result_s,
            "time_to_complete_s": self.time_to_complete_s,
            "status": self.status,
            "timings": self.timings,
            "passes": self.passes,
            "server": self.server,
        }


# Optional cap on perturbation-saliency passes per model and job (``saliency_budget`` upload
# field); None keeps every model's default saliency. Only ``--quick`` sets it.
SALIENCY_BUDGET: int | None = None


def upload(client: httpx.Client, files: list[tuple[str, bytes]], models: str) -> tuple[str, float]:
    """POST one series in one request (one job); returns (job id, upload seconds)."""
    fields = {"models": models}
    if SALIENCY_BUDGET is not None:
        fields["saliency_budget"] = str(SALIENCY_BUDGET)
    t0 = time.perf_counter()
    resp = client.post(
        "/api/v1/studies",
        files=[("files", (name, data, "application/dicom")) for name, data in files],
        data=fields,
    )
    resp.raise_for_status()
    jobs = resp.json()["jobs"]
    if len(jobs) != 1:
        raise RuntimeError(f"expected one job, got {len(jobs)}: {resp.text[:300]}")
    return str(jobs[0]["id"]), time.perf_counter() - t0


def finished_epoch(body: dict[str, Any], key: str = "finished_at") -> float:
    """The job's ``finished_at`` (or another of its timestamps) as POSIX seconds; a job
    without a ``results_at`` (failed) gives its ``finished_at`` for that too."""
    ts = str(body.get(key) or body["finished_at"]).replace("Z", "+00:00")
    return datetime.fromisoformat(ts).timestamp()


def wait_done(
    client: httpx.Client, job_ids: list[str], timeout: float = 1800
) -> dict[str, tuple[float, dict[str, Any]]]:
    """Poll until every job has finished; (its ``finished_at`` as POSIX seconds, body) per job."""
    deadline = time.perf_counter() + timeout
    done: dict[str, tuple[float, dict[str, Any]]] = {}
    while len(done) < len(job_ids):
        if time.perf_counter() > deadline:
            raise TimeoutError(f"jobs not finished after {timeout}s")
        for job_id in job_ids:
            if job_id in done:
                continue
            body = client.get(f"/api/v1/jobs/{job_id}").json()
            if body.get("status") in ("succeeded", "failed"):
                done[job_id] = (finished_epoch(body), body)
        if len(done) < len(job_ids):
            time.sleep(POLL_S)
    return done


def occlusion_passes(client: httpx.Client, job_id: str) -> dict[str, int]:
    """Forward passes the job spent on perturbation saliency, per model name."""
    res = client.get(f"/api/v1/jobs/{job_id}/results").json()
    passes: dict[str, int] = {}
    for item in res.get("saliency", []):
        n = int((item.get("params") or {}).get("passes", 0) or 0)
        passes[item["model"]] = passes.get(item["model"], 0) + n
    return passes


def run_series(client: httpx.Client, files: list[tuple[str, bytes]], models: str) -> JobRun:
    """Upload one series and wait for its result."""
    t0 = time.time()
    job_id, up = upload(client, files, models)
    finished, body = wait_done(client, [job_id])[job_id]
    run = JobRun(
        job_id=job_id,
        slices=len(files),
        upload_s=up,
        time_to_result_s=finished_epoch(body, "results_at") - t0,
        time_to_complete_s=finished - t0,
        status=body["status"],
        timings=dict(body.get("timings") or {}),
        server={
            k: body.get(k)
            for k in ("created_at", "started_at", "results_at", "finished_at", "error")
        },
    )
    if run.status == "succeeded":
        run.passes = occlusion_passes(client, job_id)
    return run


@contextmanager
def deployment(
    shape: str, work: Path, models_dir: Path, *, workers: int, threads: int, redis_db: int = 14
) -> Iterator[MedcadProcesses]:
    """``embedded``: serve + its worker (SQLite, filesystem broker); ``redis-pg``: serve
    --no-worker + ``workers`` worker processes on a fresh PostgreSQL database and Redis."""
    env = {
        "MEDCAD_ORT_INTRA_OP_THREADS": str(threads),
        "MEDCAD_QUEUED_RESEND_AFTER_SECONDS": "900",
        "MEDCAD_SWEEPER_INTERVAL_SECONDS": "5",
        "MEDCAD_LOG_LEVEL": "WARNING",
    }
    tmp = work / f"{shape}-{time.strftime('%H%M%S')}-{time.perf_counter_ns() % 10**6}"
    with ExitStack() as stack:
        if shape == "embedded":
            dep = stack.enter_context(medcad_deployment(tmp, models_dir, embedded=True, **env))
        else:
            db = stack.enter_context(postgres_database())
            env.update(MEDCAD_DATABASE_URL=db, MEDCAD_BROKER_URL=redis_db_url(redis_db))
            dep = stack.enter_context(
                medcad_deployment(tmp, models_dir, embedded=False, workers=workers, **env)
            )
        yield dep


def warm_up(
    dep: MedcadProcesses, paths: list[Path], models: str, n_jobs: int, slices: int = 8
) -> None:
    """Create every worker's sessions with ``slices``-slice jobs (first use builds them; a
    full batch also grows their memory arenas to the size the measured jobs need)."""
    with dep.client() as client:
        ids = [
            upload(
                client, relabelled(paths[:slices], f"warm-{time.perf_counter_ns()}-{i}"), models
            )[0]
            for i in range(n_jobs)
        ]
        wait_done(client, ids, timeout=600)


def idle_latency(
    dep: MedcadProcesses, paths: list[Path], models: str, n: int, tag: str
) -> list[JobRun]:
    """Single-slice series uploaded one at a time on an otherwise idle deployment."""
    runs = []
    with dep.client() as client:
        for i in range(n):
            runs.append(
                run_series(client, relabelled([paths[i % len(paths)]], f"{tag}-{i}"), models)
            )
            time.sleep(0.2)
    return runs


def throughput(
    dep: MedcadProcesses, paths: list[Path], models: str, jobs: int, tag: str
) -> dict[str, Any]:
    """``jobs`` series uploaded back to back; makespan and slices/s until the last result."""
    batches = [relabelled(paths, f"{tag}-{j}") for j in range(jobs)]
    with dep.client() as client:
        cpu0 = _cpu_seconds(dep)
        t0 = time.time()
        ids = [upload(client, files, models)[0] for files in batches]
        done = wait_done(client, ids)
        end = max(t for t, _ in done.values())
        cpu = {k: v - cpu0[k] for k, v in _cpu_seconds(dep).items()}
        passes = [occlusion_passes(client, i) for i in ids]
    slices = sum(len(b) for b in batches)
    return {
        "jobs": jobs,
        "slices": slices,
        "makespan_s": end - t0,
        "slices_per_s": slices / (end - t0),
        # runs until the last poll (up to POLL_S after the last result): an upper bound
        "cpu_s": cpu,
        "cores_busy": sum(cpu.values()) / (end - t0),
        "statuses": sorted({b["status"] for _, b in done.values()}),
        "passes": passes,
        "timings": [b.get("timings") for _, b in done.values()],
    }


def _cpu_seconds(dep: MedcadProcesses) -> dict[str, float]:
    """CPU seconds so far of the API process tree (``serve``; with its embedded worker in the
    embedded shape) and of the worker process trees."""
    api, *workers = dep.procs
    return {
        "api": process_tree_cpu_seconds(api.pid),
        "workers": sum(process_tree_cpu_seconds(w.pid) for w in workers),
    }


def summarize_latency(runs: list[JobRun]) -> dict[str, float]:
    """p50/p95 of time-to-result, and p50 of time-to-complete (ms)."""
    t = [1e3 * r.time_to_result_s for r in runs]
    return {
        "p50_ms": percentile(t, 50),
        "p95_ms": percentile(t, 95),
        "mean_ms": statistics.fmean(t),
        "complete_p50_ms": percentile([1e3 * r.time_to_complete_s for r in runs], 50),
        "n": float(len(t)),
    }


def nodule_free_slices(folder: Path) -> list[int]:
    """Indices of slices whose ground truth has no nodule (label 2)."""
    labels = np.load(folder / "labels.npy")
    return [i for i in range(labels.shape[0]) if not (labels[i] == 2).any()]
