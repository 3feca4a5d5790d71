"""Crash points, restarts and races on the production-shaped deployment of ``queue_scenarios``.

Catalogue ids (reliability note §1.4 and §2.3): Q2 Celery's default ``reject_on_worker_lost``
under pool-child kills, S1 the API crashes at each step of ingest, S5 a
worker crashes while writing a result set, S6 concurrent uploads into one study, Q10 the broker
restarted twice in a row, Q11 the worker stopped with SIGTERM mid-task.

Crashes are injected by the test-only hook in ``poison_hook/sitecustomize.py``: a crash point is
armed by writing its name into the crash file of the API or of the worker, and the first process
that reaches that point (a state, never a moment) ends with ``os._exit(137)``. Every scenario is
judged from the database, the blob store and the HTTP answers, never from logs.
"""

from __future__ import annotations

import hashlib
import io
import os
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom

from tests.fixtures.dicom_files import bright_disc_series
from tests.reliability.harness import JobRow, percentile, pid_alive, wait_terminal, wait_until
from tests.reliability.outcome import Outcome, timed
from tests.reliability.queue_scenarios import (
    TERMINAL,
    ProdStack,
    _files,
    _owner_pid,
    duplicate_result_rows,
    incomplete_result_sets,
)
from tests.reliability.storage_scenarios import run_scrub

Files = list[tuple[str, tuple[str, bytes, str]]]


def _blob_dir(ps: ProdStack) -> Path:
    return (ps.stack.data_dir / "blobs").resolve()


def _temp_files(ps: ProdStack) -> set[str]:
    folder = _blob_dir(ps) / "tmp"
    return {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()


def _stored_keys(files: Files) -> list[str]:
    """The blob keys the server gives these files (the sha256 of the bytes it stores)."""
    from app.studies.validation import IngestLimits, inspect_instance

    return [
        hashlib.sha256(
            inspect_instance(part[1][1], limits=IngestLimits()).normalized_bytes
        ).hexdigest()
        for part in files
    ]


def _uids(files: Files) -> tuple[str, list[str]]:
    """Series Instance UID and SOP Instance UIDs of a multipart ``files`` list."""
    headers = [pydicom.dcmread(io.BytesIO(p[1][1]), stop_before_pixels=True) for p in files]
    return str(headers[0].SeriesInstanceUID), [str(h.SOPInstanceUID) for h in headers]


def _series_jobs(ps: ProdStack, series_uid: str) -> list[str]:
    return [
        r[0]
        for r in ps.db.rows(
            "SELECT j.id FROM jobs j JOIN series s ON s.id = j.series_id "
            "WHERE s.series_instance_uid = :u",
            u=series_uid,
        )
    ]


def _instance_rows(ps: ProdStack, sops: list[str]) -> int:
    return sum(
        int(ps.db.scalar("SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=sop))
        for sop in sops
    )


def _wait_idle(ps: ProdStack, timeout: float = 120) -> None:
    """Wait until no job is queued or running."""
    wait_until(
        lambda: not any(r.status in ("queued", "running") for r in ps.db.jobs().values()),
        timeout,
        0.1,
        "no job queued or running",
    )


def _wait_exit(proc: Any, timeout: float = 60) -> int | None:
    try:
        return int(proc.wait(timeout))
    except Exception:
        return None


# ---------------------------------------------------------------------------------------------
# S1: the API crashes at each step of ingest


@dataclass(frozen=True)
class IngestPoint:
    point: str
    title: str
    committed: bool  # the rows are committed when the process dies
    client_retries: bool  # the client sends the upload again after the crash


INGEST_POINTS = (
    IngestPoint("blob-temp-open", "mid blob write (temporary file just created)", False, True),
    IngestPoint("blob-rename", "blob written and fsynced, before its rename", False, True),
    # this client gives up: the durable blob it leaves is an orphan for the scrubber
    IngestPoint("before-commit:InstanceRecord", "blob durable, before the commit", False, False),
    IngestPoint("after-commit:InstanceRecord", "committed, before the job id is sent", True, True),
    IngestPoint("after-publish:InstanceRecord", "job id sent, before the answer", True, True),
)


def run_ingest_crash_points(ps: ProdStack, *, rounds: int = 1, timeout: float = 300) -> Outcome:
    """S1: for each ingest step, arm a crash there, upload a 2-file series and watch the API
    die; check what it left, restart it, let the client retry, and finally run the scrubber."""
    out = Outcome("S1", "API crash (os._exit 137) at each ingest step")
    per_point: list[dict[str, Any]] = []
    series_uids: list[str] = []
    gave_up_keys: list[str] = []
    acked: set[str] = set()
    with timed(out):
        for _ in range(rounds):
            for p in INGEST_POINTS:
                record = _crash_one_upload(ps, p, series_uids, gave_up_keys)
                per_point.append(record)
                if record["retry"] == 202 or p.committed:
                    acked.add(series_uids[-1])
        # every acknowledged or committed upload ends in exactly one succeeded job
        job_ids = [j for uid in series_uids for j in _series_jobs(ps, uid)]
        rows = wait_terminal(ps.db, job_ids, timeout)
        # (the series of the upload whose client gave up before its commit has no job: no row)
        jobs_per_series = [len(_series_jobs(ps, uid)) for uid in series_uids if uid in acked]
        series_without_job = int(
            ps.db.scalar(
                "SELECT count(*) FROM series s WHERE NOT EXISTS "
                "(SELECT 1 FROM jobs j WHERE j.series_id = s.id)"
            )
        )
        url = ps.stack.database_url
        young = run_scrub(url, _blob_dir(ps), grace_seconds=3600)
        cleaned = run_scrub(url, _blob_dir(ps), grace_seconds=0, delete_orphans=True)
        after = run_scrub(url, _blob_dir(ps), grace_seconds=0)
        crashed = [r for r in per_point if r["crashed"]]
        out.figures.update(
            points=[p.point for p in INGEST_POINTS],
            crashes=len(crashed),
            answered_before_crash=sum(1 for r in per_point if r["answer"] is not None),
            rows_left_by_precommit_crashes=sum(r["rows"] for r in per_point if not r["committed"]),
            jobs_left_by_precommit_crashes=sum(r["jobs"] for r in per_point if not r["committed"]),
            committed_without_job=sum(1 for r in per_point if r["committed"] and r["jobs"] != 1),
            retries=_histogram_str([r["retry"] for r in per_point if r["retry"] is not None]),
            jobs=len(rows),
            jobs_succeeded=sum(1 for r in rows.values() if r.status == "succeeded"),
            jobs_per_series=jobs_per_series,
            series_without_job=series_without_job,
            rows_missing_blob=len(young.missing) + len(young.corrupt),
            young_orphans_kept=young.young_unreferenced,
            orphan_blobs_removed=len(cleaned.orphans),
            temp_files_removed=len(cleaned.stale_temp_files),
            left_after_scrub=len(after.orphans) + len(after.stale_temp_files),
            per_point=per_point,
        )
        out.check("the process died at every point", len(crashed) == len(per_point))
        out.check("no answer from a crashed request", out.figures["answered_before_crash"] == 0)
        out.check(
            "crash before commit: no row, no job",
            out.figures["rows_left_by_precommit_crashes"] == 0
            and out.figures["jobs_left_by_precommit_crashes"] == 0,
        )
        out.check(
            "crash after commit: rows and their job", not out.figures["committed_without_job"]
        )
        out.check(
            "every retry accepted (stored or already stored)",
            all(r["retry"] == 202 for r in per_point if r["retry"] is not None),
        )
        out.check(
            "a retry after a committed crash creates no second job",
            all(r["retry_jobs"] == 0 for r in per_point if r["committed"] and r["client_retries"]),
        )
        out.check("every job succeeded", out.figures["jobs_succeeded"] == len(job_ids))
        out.check(
            "one job per committed series",
            set(jobs_per_series) == {1} and len(jobs_per_series) == 4 * rounds,
        )
        out.check("0 committed series without a job", series_without_job == 0)
        out.check("0 rows pointing at a missing blob", out.figures["rows_missing_blob"] == 0)
        out.check(
            "the gave-up upload's blobs: kept while young, removed after the grace",
            set(gave_up_keys) <= set(cleaned.orphans) and young.young_unreferenced >= 1,
        )
        out.check(
            "half-written temp files left by the crashes, then removed",
            all(r["new_temp_files"] == 1 for r in per_point if r["point"].startswith("blob-"))
            and len(cleaned.stale_temp_files) >= 2 * rounds,
        )
        out.check("nothing left after the scrub", out.figures["left_after_scrub"] == 0)
    f = out.figures
    out.summary = (
        f"{f['crashes']} crashes at {len(INGEST_POINTS)} ingest steps: 0 answers, "
        f"{f['rows_left_by_precommit_crashes']} rows before commit, "
        f"{f['committed_without_job']} committed without job; {f['jobs_succeeded']}/{f['jobs']} "
        f"jobs succeeded (1 per series); scrubber: {f['rows_missing_blob']} rows without blob, "
        f"{f['orphan_blobs_removed']} orphan blobs + {f['temp_files_removed']} temp files "
        f"removed after the grace, {f['left_after_scrub']} left"
    )
    return out


def _histogram_str(values: list[int]) -> dict[str, int]:
    hist: dict[str, int] = {}
    for v in values:
        hist[str(v)] = hist.get(str(v), 0) + 1
    return hist


def _crash_one_upload(
    ps: ProdStack, p: IngestPoint, series_uids: list[str], gave_up_keys: list[str]
) -> dict[str, Any]:
    files = _files(ps.next_seed())
    series_uid, sops = _uids(files)
    keys = _stored_keys(files)
    series_uids.append(series_uid)
    _wait_idle(ps)  # result writes of earlier jobs use the same temp folder
    temps_before = _temp_files(ps)
    assert ps.stack.api is not None
    api = ps.stack.api
    ps.api_crash.write_text(p.point)
    answer: int | None = None
    try:
        with ps.stack.client(timeout=60) as client:
            answer = client.post("/api/v1/studies", files=files).status_code
    except httpx.HTTPError:
        pass
    code = _wait_exit(api, 60)
    _wait_idle(ps)
    armed_left = ps.api_crash.exists()
    ps.api_crash.unlink(missing_ok=True)
    store = _blob_dir(ps)
    blobs = sum(1 for k in keys if (store / k[:2] / k[2:4] / k).is_file())
    record: dict[str, Any] = {
        "point": p.point,
        "crashed": code == 137 and not armed_left,
        "exit_code": code,
        "answer": answer,
        "committed": p.committed,
        "client_retries": p.client_retries,
        "rows": _instance_rows(ps, sops),
        "jobs": len(_series_jobs(ps, series_uid)),
        "blobs": blobs,
        "new_temp_files": len(_temp_files(ps) - temps_before),
        "retry": None,
        "retry_jobs": None,
    }
    if code is None:  # never reached the point: stop the process the test started
        ps.stack.kill_api()
    ps.stack.start_api()
    if p.client_retries:
        with ps.stack.client(timeout=60) as client:
            r = client.post("/api/v1/studies", files=files)
        record["retry"] = r.status_code
        record["retry_jobs"] = len(r.json().get("jobs", [])) if r.status_code == 202 else None
    else:
        gave_up_keys.extend(keys)
    return record


# ---------------------------------------------------------------------------------------------
# S5: a worker crashes while writing a result set


RESULT_POINTS = (
    ("blob-rename", "a result blob written, before its rename"),
    ("before-commit:MaskRecord", "every result blob durable, before the result rows commit"),
    ("after-commit:MaskRecord", "the result rows committed, before the DICOM objects"),
    ("before-commit:ArtifactRecord", "the DICOM objects durable, before their rows commit"),
)


def run_result_write_crashes(ps: ProdStack, *, rounds: int = 1, timeout: float = 180) -> Outcome:
    """S5: the pool child running a job dies mid result write (four points: in the result rows'
    write, and between them and the DICOM objects); meanwhile the API is asked for the results
    over and over. It must never serve results before their rows committed, a partial result
    set (rows without masks, DICOM objects without ``complete``) or a partial file; the job is
    re-run to completion; the scrubber clears what the crash left."""
    out = Outcome("S5", "worker crash while writing results")
    per_job: list[dict[str, Any]] = []
    with timed(out), ps.stack.client(timeout=30) as client:
        for _ in range(rounds):
            for point, _title in RESULT_POINTS:
                ps.worker_crash.write_text(point)
                job_id = ps.upload(client, 1)[0]
                polls = _poll_results_until_done(ps, client, job_id, timeout)
                armed_left = ps.worker_crash.exists()
                ps.worker_crash.unlink(missing_ok=True)
                row = ps.db.jobs([job_id])[job_id]
                served = (
                    _check_served_files(ps, client, job_id) if row.status == "succeeded" else {}
                )
                per_job.append(
                    {
                        "point": point,
                        "crashed": not armed_left,
                        "status": row.status,
                        "attempts": row.attempts,
                        **polls,
                        **served,
                    }
                )
        url = ps.stack.database_url
        cleaned = run_scrub(url, _blob_dir(ps), grace_seconds=0, delete_orphans=True)
        after = run_scrub(url, _blob_dir(ps), grace_seconds=0)
        duplicates = duplicate_result_rows(ps.db)
        succeeded = [r for r in per_job if r["status"] == "succeeded"]
        out.figures.update(
            crashes=sum(1 for r in per_job if r["crashed"]),
            jobs=len(per_job),
            attempts=[r["attempts"] for r in per_job],
            result_polls=sum(r["polls"] for r in per_job),
            served_before_done=sum(r["served_before_done"] for r in per_job),
            served_without_dicom=sum(r["served_without_dicom"] for r in per_job),
            partial_sets_served=sum(r["partial_sets"] for r in per_job),
            files_served=sum(r.get("files", 0) for r in succeeded),
            bad_files_served=sum(r.get("bad_files", 0) for r in succeeded),
            duplicates=duplicates,
            incomplete=len(incomplete_result_sets(ps.db, [r["job_id"] for r in succeeded])),
            rows_missing_blob=len(cleaned.missing) + len(cleaned.corrupt),
            orphan_blobs_removed=len(cleaned.orphans),
            temp_files_removed=len(cleaned.stale_temp_files),
            left_after_scrub=len(after.orphans) + len(after.stale_temp_files),
        )
        out.check("the child died at every point", out.figures["crashes"] == len(per_job))
        out.check("every job re-run to success", len(succeeded) == len(per_job))
        out.check("exactly one re-run each", set(out.figures["attempts"]) == {2})
        out.check(
            "no result served before its rows committed", not out.figures["served_before_done"]
        )
        out.check(
            "every served set whole (masks and maps; DICOM objects only when complete)",
            not out.figures["partial_sets_served"],
        )
        out.check(
            "every served file whole (its sha256 is its key)", not out.figures["bad_files_served"]
        )
        out.check(
            "one complete result set per job", not duplicates and not out.figures["incomplete"]
        )
        out.check("0 rows pointing at a missing blob", out.figures["rows_missing_blob"] == 0)
        out.check("the half-written temp file removed", len(cleaned.stale_temp_files) >= rounds)
        out.check("nothing left after the scrub", out.figures["left_after_scrub"] == 0)
    f = out.figures
    out.summary = (
        f"{f['crashes']} child crashes mid result write: {f['jobs']} jobs re-run once each "
        f"and succeeded; {f['result_polls']} result reads meanwhile, {f['served_before_done']} "
        f"served early, {f['served_without_dicom']} served before the DICOM objects (as designed), "
        f"{f['partial_sets_served']} partial sets, {f['bad_files_served']}/{f['files_served']} "
        f"served files partial; "
        f"scrubber removed {f['orphan_blobs_removed']} orphan blobs + {f['temp_files_removed']} "
        f"temp files, {f['left_after_scrub']} left"
    )
    return out


def _poll_results_until_done(
    ps: ProdStack, client: httpx.Client, job_id: str, timeout: float
) -> dict[str, Any]:
    """Ask for the results until the job is terminal; count answers that came too early (before
    the job's result rows committed), those served while its DICOM objects were being built,
    and any that was not a whole set."""
    polls = early = without_dicom = partial = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = ps.db.jobs([job_id])[job_id]
        r = client.get(f"/api/v1/jobs/{job_id}/results")
        polls += 1
        if r.status_code == 200:
            # the job row was read first: a 200 now is only right if the rows committed since
            if row.results_at is None and row.status != "succeeded":
                again = ps.db.jobs([job_id])[job_id]
                if again.results_at is None and again.status != "succeeded":
                    early += 1
            body = r.json()
            dicom = [a for kind in body["dicom"].values() for a in kind]
            if not body["complete"]:
                without_dicom += 1
            if not body["masks"] or not body["saliency"] or bool(dicom) != body["complete"]:
                partial += 1
        if row.status in TERMINAL:
            break
        time.sleep(0.05)
    return {
        "job_id": job_id,
        "polls": polls,
        "served_before_done": early,
        "served_without_dicom": without_dicom,
        "partial_sets": partial,
    }


def _check_served_files(ps: ProdStack, client: httpx.Client, job_id: str) -> dict[str, int]:
    """Download every file the results name; each must hash to a blob key of this job's rows."""
    keys = set()
    for table, columns in (
        ("masks", ("blob_sha256", "overlay_sha256")),
        ("saliency_maps", ("blob_sha256", "overlay_sha256")),
        ("artifacts", ("blob_sha256",)),
    ):
        for row in ps.db.rows(
            f"SELECT {', '.join(columns)} FROM {table} WHERE job_id = :j", j=job_id
        ):
            keys.update(row)
    body = client.get(f"/api/v1/jobs/{job_id}/results").json()
    urls = [m["url"] for m in body.get("masks", [])] + [m["overlay_url"] for m in body["masks"]]
    urls += [s["url"] for s in body.get("saliency", [])]
    files = bad = 0
    for url in urls:
        r = client.get(url)
        files += 1
        if (
            r.status_code != 200
            or not r.content
            or hashlib.sha256(r.content).hexdigest() not in keys
        ):
            bad += 1
    return {"files": files, "bad_files": bad}


# ---------------------------------------------------------------------------------------------
# S6: concurrent uploads into one study


def run_concurrent_study_uploads(
    ps: ProdStack, *, threads: int = 5, rounds: int = 10, per_thread: int = 2, timeout: float = 400
) -> Outcome:
    """S6 (Orthanc's concurrency test without its delete half: medcad has no delete): each round
    ``threads`` clients upload, at the same moment, their part of one new study (one series of
    ``threads × per_thread`` slices), each part overlapping its neighbour's by one slice. After
    every round the counts are exact; at the end every job is terminal and the store is clean."""
    out = Outcome("S6", "concurrent uploads into one study")
    statuses: list[int] = []
    round_errors: list[str] = []
    series_uids: list[str] = []
    with timed(out):
        for r in range(rounds):
            n = threads * per_thread
            blobs, _ = bright_disc_series(n=n, size=64, seed=ps.next_seed() * 1000 + r)
            first = pydicom.dcmread(io.BytesIO(blobs[0]), stop_before_pixels=True)
            study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
            series_uids.append(series)
            parts = [
                [*range(k * per_thread, (k + 1) * per_thread), ((k + 1) * per_thread) % n]
                for k in range(threads)
            ]
            barrier = threading.Barrier(threads)
            answers: list[tuple[int, int, int]] = []
            lock = threading.Lock()

            def upload(
                indices: list[int],
                blobs: list[bytes] = blobs,
                barrier: threading.Barrier = barrier,
                answers: list[tuple[int, int, int]] = answers,
                lock: threading.Lock = lock,
            ) -> None:
                files = [("files", (f"{i}.dcm", blobs[i], "application/dicom")) for i in indices]
                with ps.stack.client(timeout=60) as client:
                    barrier.wait()
                    resp = client.post("/api/v1/studies", files=files)
                body = resp.json() if resp.status_code == 202 else {}
                with lock:
                    answers.append(
                        (resp.status_code, body.get("stored", 0), body.get("duplicates", 0))
                    )

            pool = [threading.Thread(target=upload, args=(p,)) for p in parts]
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            statuses += [a[0] for a in answers]
            counts = {
                "instances": int(
                    ps.db.scalar(
                        "SELECT count(*) FROM instances i JOIN series s ON s.id = i.series_id "
                        "WHERE s.series_instance_uid = :u",
                        u=series,
                    )
                ),
                "series": int(
                    ps.db.scalar(
                        "SELECT count(*) FROM series WHERE series_instance_uid = :u", u=series
                    )
                ),
                "studies": int(
                    ps.db.scalar(
                        "SELECT count(*) FROM studies WHERE study_instance_uid = :u", u=study
                    )
                ),
                "stored": sum(a[1] for a in answers),
                "duplicates": sum(a[2] for a in answers),
            }
            keys = _stored_keys([("files", ("x", b, "application/dicom")) for b in blobs])
            store = _blob_dir(ps)
            missing_blobs = sum(1 for k in keys if not (store / k[:2] / k[2:4] / k).is_file())
            expected = {"instances": n, "series": 1, "studies": 1, "stored": n,
                        "duplicates": threads}  # fmt: skip
            if counts != expected or missing_blobs:
                round_errors.append(f"round {r}: {counts}, {missing_blobs} blobs missing")
        job_ids = [j for uid in series_uids for j in _series_jobs(ps, uid)]
        rows = wait_terminal(ps.db, job_ids, timeout)
        url = ps.stack.database_url
        scrub = run_scrub(url, _blob_dir(ps), grace_seconds=0, delete_orphans=True)
        jobs_per_series = [len(_series_jobs(ps, uid)) for uid in series_uids]
        out.figures.update(
            threads=threads,
            rounds=rounds,
            uploads=len(statuses),
            status_codes=_histogram_str(statuses),
            rounds_with_wrong_counts=len(round_errors),
            errors=round_errors[:5],
            jobs=len(job_ids),
            jobs_per_series_max=max(jobs_per_series, default=0),
            jobs_not_terminal=sum(1 for r in rows.values() if r.status not in TERMINAL),
            jobs_failed=sum(1 for r in rows.values() if r.status == "failed"),
            duplicates=duplicate_result_rows(ps.db),
            rows_missing_blob=len(scrub.missing) + len(scrub.corrupt),
            orphan_blobs=len(scrub.orphans),
        )
        out.check("every upload 202", set(statuses) == {202})
        out.check("counts exact after every round", not round_errors)
        out.check("0 jobs left non-terminal", len(rows) == len(job_ids) and not
                  out.figures["jobs_not_terminal"])  # fmt: skip
        out.check("0 jobs failed", out.figures["jobs_failed"] == 0)
        out.check("0 duplicated result rows", out.figures["duplicates"] == 0)
        out.check("0 rows without blob, 0 orphan blobs", not out.figures["rows_missing_blob"]
                  and not scrub.orphans)  # fmt: skip
    f = out.figures
    out.summary = (
        f"{f['threads']} clients × {f['rounds']} rounds into one study each: {f['status_codes']}, "
        f"{f['rounds_with_wrong_counts']} rounds with wrong counts; {f['jobs']} jobs, "
        f"{f['jobs_not_terminal']} non-terminal, {f['jobs_failed']} failed; "
        f"{f['orphan_blobs']} orphan blobs"
    )
    return out


# ---------------------------------------------------------------------------------------------
# Q10: the broker restarted twice in a row, then work arrives


def run_broker_double_restart(
    ps: ProdStack, *, n_jobs: int = 10, deadline_s: float = 60, timeout: float = 180
) -> Outcome:
    """Q10 (the pattern of celery/celery#8030): SIGKILL and restart redis-server twice within
    3 s while the worker idles, then upload ``n_jobs``: the same worker process must consume
    them all within ``deadline_s``."""
    out = Outcome("Q10", "worker consumes after two quick broker restarts")
    assert ps.worker is not None
    worker_pid = ps.worker.pid
    with timed(out), ps.stack.client() as client:
        wait_until(
            lambda: (
                ps.redis.queue_length() == 0
                and not any(r.status in ("queued", "running") for r in ps.db.jobs().values())
            ),
            120,
            0.2,
            "worker idle",
        )
        t0 = time.monotonic()
        reconnects = []
        for i in range(2):
            ps.redis.kill()
            ps.redis.start()
            if i == 0:
                # the second restart hits the worker once it polls the new server again (the
                # moment celery/celery#8030 describes), not at some fixed delay
                reconnects.append(wait_until(lambda: _consumer_polling(ps), 30, 0.02, "BRPOP"))
        restarts_span = time.monotonic() - t0
        ids = ps.upload(client, n_jobs)
        uploaded = time.monotonic()
        rows = wait_terminal(ps.db, ids, timeout)
        done_s = time.monotonic() - uploaded
        succeeded = sum(1 for r in rows.values() if r.status == "succeeded")
        out.figures.update(
            restarts=2,
            restarts_span_s=round(restarts_span, 2),
            first_reconnect_s=round(reconnects[0], 2),
            jobs=n_jobs,
            succeeded=succeeded,
            all_done_after_upload_s=round(done_s, 1),
            attempts=_histogram_str([r.attempts for r in rows.values()]),
            same_worker_process=ps.worker.pid == worker_pid and pid_alive(worker_pid),
            readyz_workers=client.get("/readyz").json()["checks"].get("workers"),
        )
        out.check("two restarts within 3 s", restarts_span <= 3)
        # the stall check (red when jobs wait with no worker consuming) is tested to turn red
        # in tests/api/test_readiness.py; here it must be green after the restarts
        out.check("/readyz: workers consuming", out.figures["readyz_workers"] == "ok")
        out.check(f"{n_jobs}/{n_jobs} done", succeeded == n_jobs)
        out.check(f"done within {deadline_s:.0f} s", done_s <= deadline_s)
        out.check("by the same worker process (no restart needed)",
                  out.figures["same_worker_process"])  # fmt: skip
    f = out.figures
    out.summary = (
        f"Redis SIGKILLed and restarted twice in {f['restarts_span_s']} s (the second once the "
        f"worker polled again, {f['first_reconnect_s']} s after the first), then {f['jobs']} "
        f"jobs: {f['succeeded']}/{f['jobs']} done {f['all_done_after_upload_s']} s after "
        "upload by the same worker process"
    )
    return out


# ---------------------------------------------------------------------------------------------
# Q11: SIGTERM mid-task


def _consumer_polling(ps: ProdStack) -> bool:
    """True when a client of our redis-server waits in BRPOP (a worker consuming)."""
    import redis as redis_client

    try:
        clients = redis_client.Redis.from_url(ps.redis.url, socket_timeout=1).client_list()
    except redis_client.RedisError:
        return False
    return any(c.get("cmd") in ("brpop", "blpop") for c in clients)


def run_sigterm_mid_task(ps: ProdStack, *, queued_behind: int = 2, timeout: float = 180) -> Outcome:
    """Q11: SIGTERM the worker while a job runs (its pool child frozen, so the signal lands
    mid-task by construction) and while more jobs arrive: the running job finishes, the
    stopping worker takes no new job, exits cleanly and leaves no unacknowledged message; the
    jobs queued behind it are done by the next worker; nothing is lost or run twice."""
    import redis as redis_client

    out = Outcome("Q11", "SIGTERM mid-task (warm shutdown)")
    # The job is frozen for a moment: a lease longer than that, as in production (900 s), so
    # the sweeper does not reclaim it meanwhile.
    lease = ps.worker_env.get("MEDCAD_JOB_LEASE_SECONDS")
    ps.restart_worker(MEDCAD_JOB_LEASE_SECONDS="60")
    assert ps.worker is not None
    with timed(out), ps.stack.client() as client:
        job_id, child = _freeze_running_job(ps, client)
        worker = ps.worker
        log_mark = _warm_shutdowns(ps)
        try:
            worker.send_signal(signal.SIGTERM)
            wait_until(lambda: _warm_shutdowns(ps) > log_mark, 60, 0.05, "warm shutdown begun")
            behind = ps.upload(client, queued_behind)
            # the stopping worker must not take them: they stay queued while its job is frozen
            frozen_rows = ps.db.jobs([job_id, *behind])
        finally:
            os.kill(child, signal.SIGCONT)
        resumed = time.monotonic()
        code = _wait_exit(worker, 120)
        exit_s = time.monotonic() - resumed
        at_exit = ps.db.jobs([job_id, *behind])
        unacked = int(redis_client.Redis.from_url(ps.redis.url).hlen("unacked"))
        if lease is None:
            ps.worker_env.pop("MEDCAD_JOB_LEASE_SECONDS", None)
        else:
            ps.worker_env["MEDCAD_JOB_LEASE_SECONDS"] = lease
        ps.start_worker()
        rows = wait_terminal(ps.db, [job_id, *behind], timeout)
        out.figures.update(
            running_job_at_sigterm=frozen_rows[job_id].status,
            jobs_behind=queued_behind,
            taken_by_stopping_worker=sum(1 for j in behind if at_exit[j].attempts),
            exit_code=code,
            exit_after_resume_s=round(exit_s, 2),
            running_job_at_exit=at_exit[job_id].status,
            running_job_attempts=rows[job_id].attempts,
            unacked_after_exit=unacked,
            behind_queued_at_exit=sum(1 for j in behind if at_exit[j].status == "queued"),
            succeeded=sum(1 for r in rows.values() if r.status == "succeeded"),
            attempts=_histogram_str([r.attempts for r in rows.values()]),
            duplicates=duplicate_result_rows(ps.db),
        )
        out.check("the signal landed mid-task", frozen_rows[job_id].status == "running")
        out.check("the running job finished before the worker exited",
                  at_exit[job_id].status == "succeeded")  # fmt: skip
        out.check("the stopping worker took no new job",
                  out.figures["taken_by_stopping_worker"] == 0)  # fmt: skip
        out.check("clean exit (code 0)", code == 0)
        out.check("no unacknowledged message left", unacked == 0)
        out.check("0 lost: every job succeeded", out.figures["succeeded"] == 1 + queued_behind)
        out.check("nothing run twice", set(out.figures["attempts"]) == {"1"})
        out.check("0 duplicated result rows", out.figures["duplicates"] == 0)
    f = out.figures
    out.summary = (
        f"SIGTERM with a job mid-task and {f['jobs_behind']} arriving: the job finished "
        f"(attempt {f['running_job_attempts']}), exit code {f['exit_code']} "
        f"{f['exit_after_resume_s']} s after it resumed, {f['unacked_after_exit']} unacked "
        f"left, {f['taken_by_stopping_worker']} new jobs taken; {f['succeeded']}/"
        f"{1 + f['jobs_behind']} done by the next worker, 0 lost, nothing run twice"
    )
    return out


def _warm_shutdowns(ps: ProdStack) -> int:
    return ps.stack.logs().count("Warm shutdown")


def _freeze_running_job(ps: ProdStack, client: httpx.Client, tries: int = 5) -> tuple[str, int]:
    """Upload a job and SIGSTOP the pool child that runs it, while it runs."""
    for _ in range(tries):
        job_id = ps.upload(client, 1)[0]
        holder: dict[str, JobRow] = {}

        def running(job_id: str = job_id, holder: dict[str, JobRow] = holder) -> bool:
            row = ps.db.jobs([job_id])[job_id]
            holder["row"] = row
            return row.status in TERMINAL or (
                row.status == "running" and _owner_pid(row) in ps.pool()
            )

        wait_until(running, 120, 0.01, "job running")
        pid = _owner_pid(holder["row"])
        if holder["row"].status in TERMINAL or pid is None:
            continue
        os.kill(pid, signal.SIGSTOP)
        if ps.db.jobs([job_id])[job_id].status == "running":
            return job_id, pid
        os.kill(pid, signal.SIGCONT)  # it finished just before the freeze: try again
    raise AssertionError("could not catch a job mid-task")


# ---------------------------------------------------------------------------------------------
# Q2: what Celery's default would do


def run_default_reject_flag(ps: ProdStack, *, kills: int = 2, timeout: float = 180) -> Outcome:
    """Q2: medcad's settings turn ``task_reject_on_worker_lost`` on; here a worker runs with
    Celery's default (off) and the pool child running a job is SIGKILLed ``kills`` times. Celery
    then acknowledges the message as failed: the broker forgets the job (the loss of §0.1 E2).
    The job row still says ``running`` under a dead owner, so the sweeper re-sends it once its
    lease expires: nothing is lost, but recovery waits for the lease instead of being
    immediate. Proven from the database: every re-claim comes after the dead attempt's lease
    expiry."""
    from app.queue import make_celery
    from app.settings import Settings

    out = Outcome("Q2", "Celery's default reject_on_worker_lost (off) under child SIGKILL")
    ours = make_celery(Settings(broker_url="redis://127.0.0.1:1/0")).conf
    lease_s = int(ps.worker_env.get("MEDCAD_JOB_LEASE_SECONDS", ps.stack.env.get(
        "MEDCAD_JOB_LEASE_SECONDS", "6")))  # fmt: skip
    ps.restart_worker(MEDCAD_TEST_CELERY_DEFAULT_REJECT="1")
    hits: list[dict[str, Any]] = []
    try:
        with timed(out), ps.stack.client() as client:
            for _ in range(kills):
                job_id, child = _freeze_running_job(ps, client)
                os.kill(child, signal.SIGKILL)  # (a stopped process dies at once too)
                killed = time.monotonic()
                wait_until(lambda child=child: not pid_alive(child), 30, 0.02, "child gone")
                expiry = ps.db.scalar("SELECT lease_expires_at FROM jobs WHERE id = :j", j=job_id)
                wait_until(
                    lambda job_id=job_id: ps.db.jobs([job_id])[job_id].attempts >= 2,
                    timeout,
                    0.05,
                    "job re-claimed",
                )
                reclaim_s = time.monotonic() - killed
                rows = wait_terminal(ps.db, [job_id], timeout)
                started = ps.db.scalar("SELECT started_at FROM jobs WHERE id = :j", j=job_id)
                hits.append(
                    {
                        "job": job_id,
                        "status": rows[job_id].status,
                        "attempts": rows[job_id].attempts,
                        "reclaim_s": round(reclaim_s, 2),
                        "after_lease_expiry": started is not None
                        and expiry is not None
                        and _naive(started) >= _naive(expiry),
                    }
                )
    finally:
        ps.worker_env.pop("MEDCAD_TEST_CELERY_DEFAULT_REJECT", None)
        ps.restart_worker()
    reclaims = [h["reclaim_s"] for h in hits]
    out.figures.update(
        medcad_sets_reject_on_worker_lost=ours.task_reject_on_worker_lost,
        kills=len(hits),
        succeeded=sum(1 for h in hits if h["status"] == "succeeded"),
        lost=sum(1 for h in hits if h["status"] != "succeeded"),
        reclaimed_only_after_lease_expiry=sum(1 for h in hits if h["after_lease_expiry"]),
        lease_seconds=lease_s,
        reclaim_p50_s=round(percentile(reclaims, 50), 2),
        reclaim_max_s=round(max(reclaims, default=float("nan")), 2),
        duplicates=duplicate_result_rows(ps.db),
    )
    out.check("medcad's settings turn reject_on_worker_lost on", ours.task_reject_on_worker_lost)
    out.check("with Celery's default the broker dropped every killed job (re-claimed only by "
              "the sweeper after the lease)", out.figures["reclaimed_only_after_lease_expiry"]
              == kills)  # fmt: skip
    out.check("0 lost all the same: every job succeeded", out.figures["succeeded"] == kills)
    out.check("each re-run once", all(h["attempts"] == 2 for h in hits))
    out.check("0 duplicated result rows", out.figures["duplicates"] == 0)
    f = out.figures
    out.summary = (
        f"Celery default (off), {f['kills']} child SIGKILLs: the broker dropped {f['kills']}/"
        f"{f['kills']} messages; the sweeper re-sent them after the {f['lease_seconds']} s "
        f"lease (re-claim p50 {f['reclaim_p50_s']} s, max {f['reclaim_max_s']} s): "
        f"{f['lost']} lost. medcad sets it on: re-delivery is immediate (Q1)"
    )
    return out


def _naive(value: Any) -> Any:
    """A timestamp comparable across SQLite/PostgreSQL drivers (UTC, no tzinfo)."""
    return value.replace(tzinfo=None) if getattr(value, "tzinfo", None) else value
