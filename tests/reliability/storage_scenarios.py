"""Storage fault scenarios: "a 2xx means durable", dedup under concurrency, a full disk, the
scrubber, SQLite with concurrent writers, and sustained ingest load.

Catalogue ids (reliability note §2.3 and §5.4): S2 API SIGKILLed during uploads, S3 the same file
uploaded concurrently, S7 disk full, S8 scrubber finds a flipped byte, S9 SQLite writers under
load, L ingest load on loopback. The same functions run bounded in ``make test`` and full-size in
``make proof``.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from app.jobs.scrubber import ScrubReport, scrub
from app.storage import BlobStore
from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.services import unavailable
from tests.perf.ingest_bench import BOUNDARY, multipart_body
from tests.reliability.harness import Database, Stack, percentile, stack, wait_terminal
from tests.reliability.outcome import Outcome, timed


@dataclass(frozen=True)
class Instance:
    """One single-slice series to upload, with the identity the server should keep."""

    data: bytes
    sha256: str
    study: str
    series: str
    sop: str


def make_instances(n: int, size: int, seed: int = 0) -> list[Instance]:
    """``n`` single-slice series (new UIDs each)."""
    out = []
    for i in range(n):
        (data,), _ = bright_disc_series(n=1, size=size, seed=seed + i, radius=size / 8)
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        out.append(
            Instance(
                data,
                hashlib.sha256(data).hexdigest(),
                str(ds.StudyInstanceUID),
                str(ds.SeriesInstanceUID),
                str(ds.SOPInstanceUID),
            )
        )
    return out


def _post(client: httpx.Client, inst: Instance) -> httpx.Response:
    return client.post(
        "/api/v1/studies", files=[("files", ("x.dcm", inst.data, "application/dicom"))]
    )


def retrieve(client: httpx.Client, inst: Instance) -> bytes | None:
    """The instance as stored, through WADO-RS (``transfer-syntax=*``); None if not found."""
    from tests.dicomweb.support import multipart_parts

    r = client.get(
        f"/dicomweb/studies/{inst.study}/series/{inst.series}/instances/{inst.sop}",
        headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
    )
    if r.status_code != 200:
        return None
    parts = multipart_parts(r.headers["content-type"], r.content)
    return parts[0][1] if len(parts) == 1 else None


def run_scrub(database_url: str, blob_dir: Path, **kwargs: Any) -> ScrubReport:
    """The scrubber, in this process, against a deployment's database and blob store."""
    engine = create_engine(database_url)
    try:
        with Session(engine) as session:
            return scrub(session=session, store=BlobStore(blob_dir), **kwargs)
    finally:
        engine.dispose()


def _blob_dir(s: Stack) -> Path:
    return (s.data_dir / "blobs").resolve()


# ---------------------------------------------------------------------------------------------
# S2: API SIGKILLed at random during uploads


def run_api_kills(
    root: Path,
    models_dir: Path,
    *,
    n_uploads: int,
    kill_every: tuple[float, float] = (1.0, 2.5),
    threads: int = 3,
    size: int = 256,
    max_kills: int | None = None,
    kill_at: tuple[float, ...] | None = None,
    timeout: float = 600,
    seed: int = 11,
) -> Outcome:
    """S2: ``n_uploads`` single-file uploads by ``threads`` clients while the API process group is
    SIGKILLed every ``kill_every`` seconds, or when each share in ``kill_at`` of the uploads has
    been acknowledged (and restarted); every upload that got a 2xx must be retrievable byte for
    byte, and the scrubber must find no row without its blob."""
    out = Outcome("S2", "API SIGKILLed at random during uploads")
    rng = random.Random(seed)
    instances = make_instances(n_uploads, size, seed=1000)
    with timed(out), stack(root, models_dir) as s:
        s.start_api()
        acked: dict[int, int] = {}  # index -> status of the 2xx
        failures = {"connection": 0, "5xx": 0, "other": 0}
        lock = threading.Lock()
        next_index = iter(range(n_uploads))
        up = threading.Event()
        up.set()
        done = threading.Event()
        deadline = time.monotonic() + timeout

        def client_loop() -> None:
            with s.client(timeout=30) as client:
                while time.monotonic() < deadline:
                    with lock:
                        i = next(next_index, None)
                    if i is None:
                        return
                    while time.monotonic() < deadline:  # a client retries until it gets an answer
                        up.wait(30)
                        try:
                            r = _post(client, instances[i])
                        except httpx.HTTPError:
                            with lock:
                                failures["connection"] += 1
                            time.sleep(0.2)
                            continue
                        if r.status_code // 100 == 2:
                            with lock:
                                acked[i] = r.status_code
                            break
                        with lock:
                            failures["5xx" if r.status_code >= 500 else "other"] += 1
                        time.sleep(0.2)

        kills = 0

        def due() -> bool:
            """Wait for the next kill: a random interval, or (``kill_at``) the next share of
            acknowledged uploads, so a fast machine cannot finish the batch between two kills."""
            if kill_at is None:
                return not done.wait(rng.uniform(*kill_every))
            if kills >= len(kill_at):
                return False
            while not done.wait(0.02):
                with lock:
                    if len(acked) >= kill_at[kills] * n_uploads:
                        return True
            return False

        def killer() -> None:
            nonlocal kills
            while due():
                if max_kills is not None and kills >= max_kills:
                    return
                up.clear()
                s.kill_api()
                kills += 1
                s.start_api(wait=False)
                with suppress(Exception):
                    s.wait_api(120)
                up.set()

        killer_thread = threading.Thread(target=killer)
        workers = [threading.Thread(target=client_loop) for _ in range(threads)]
        started = time.monotonic()
        for t in workers:
            t.start()
        killer_thread.start()
        for t in workers:
            t.join()
        upload_seconds = time.monotonic() - started
        done.set()
        killer_thread.join()
        if s.api is None or s.api.poll() is not None:
            s.start_api(wait=False)
        s.wait_api(120)
        # every 2xx must be retrievable with the same bytes
        mismatched, missing = [], []
        with s.client() as client:
            for i in acked:
                got = retrieve(client, instances[i])
                if got is None:
                    missing.append(i)
                elif hashlib.sha256(got).hexdigest() != instances[i].sha256:
                    mismatched.append(i)
        db = Database(s.database_url)
        rows = int(db.scalar("SELECT count(*) FROM instances"))
        series_without_job = int(
            db.scalar(
                "SELECT count(*) FROM series s WHERE NOT EXISTS "
                "(SELECT 1 FROM jobs j WHERE j.series_id = s.id)"
            )
        )
        db.dispose()
        report = run_scrub(s.database_url, _blob_dir(s), grace_seconds=0, delete_orphans=True)
        after = run_scrub(s.database_url, _blob_dir(s), grace_seconds=0)
        out.figures.update(
            uploads=n_uploads,
            acknowledged_2xx=len(acked),
            api_kills=kills,
            connection_failures=failures["connection"],
            answers_5xx=failures["5xx"],
            other_non_2xx=failures["other"],
            retrievable_same_sha256=len(acked) - len(missing) - len(mismatched),
            missing=len(missing),
            sha256_mismatch=len(mismatched),
            instance_rows=rows,
            series_without_job=series_without_job,
            scrub_rows_missing_blob=len(report.missing),
            scrub_corrupt=len(report.corrupt),
            orphan_blobs_removed=len(report.orphans),
            stale_temp_files_removed=len(report.stale_temp_files),
            orphans_after_scrub=len(after.orphans) + len(after.stale_temp_files),
            upload_seconds=round(upload_seconds, 1),
        )
        out.check("every upload acknowledged in the end", len(acked) == n_uploads)
        out.check("the API was killed", kills >= 2)
        if kill_at is not None:
            out.check(f"{len(kill_at)} planned kills done", kills == len(kill_at))
        out.check("100 % of 2xx retrievable with the same sha256", not missing and not mismatched)
        out.check("no instance stored twice", rows == n_uploads)
        out.check("every stored series has its job", series_without_job == 0)
        out.check("scrubber: no row without its blob", report.healthy)
        out.check("scrubber: no orphan left", after.healthy and not after.orphans)
    f = out.figures
    out.summary = (
        f"{f['uploads']} uploads, {f['api_kills']} API SIGKILLs: {f['acknowledged_2xx']} 2xx, "
        f"{f['retrievable_same_sha256']}/{f['acknowledged_2xx']} retrievable with the same "
        f"sha256; scrubber: {f['scrub_rows_missing_blob']} rows without blob, "
        f"{f['orphan_blobs_removed']} orphan blobs and {f['stale_temp_files_removed']} "
        "half-written temp files removed"
    )
    return out


# ---------------------------------------------------------------------------------------------
# S3: the same file uploaded concurrently


def run_concurrent_same_file(s: Stack, *, copies: int = 20, size: int = 64) -> Outcome:
    """S3: one file POSTed ``copies`` times at once: every answer 2xx, one row, one blob."""
    out = Outcome("S3", "same file uploaded concurrently")
    (inst,) = make_instances(1, size, seed=random.randrange(10**6))
    barrier = threading.Barrier(copies)

    def one(_: int) -> tuple[int, dict[str, Any]]:
        with s.client() as client:
            barrier.wait()
            r = _post(client, inst)
            return r.status_code, r.json()

    with timed(out), ThreadPoolExecutor(copies) as pool:
        answers = list(pool.map(one, range(copies)))
        db = Database(s.database_url)
        rows = int(
            db.scalar("SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=inst.sop)
        )
        jobs = int(
            db.scalar(
                "SELECT count(*) FROM jobs j JOIN series s ON s.id = j.series_id "
                "WHERE s.series_instance_uid = :u",
                u=inst.series,
            )
        )
        db.dispose()
        blob = BlobStore(_blob_dir(s)).path_for(inst.sha256)
        codes = [a[0] for a in answers]
        stored = sum(a[1].get("stored", 0) for a in answers if a[0] // 100 == 2)
        duplicates = sum(a[1].get("duplicates", 0) for a in answers if a[0] // 100 == 2)
        out.figures.update(
            copies=copies,
            status_codes={str(c): codes.count(c) for c in sorted(set(codes))},
            stored=stored,
            already_stored=duplicates,
            rows=rows,
            blobs=int(blob.is_file()),
            jobs=jobs,
        )
        out.check("every answer 2xx", all(c // 100 == 2 for c in codes))
        out.check("one stored, the others already stored", stored == 1 and duplicates == copies - 1)
        out.check("one row", rows == 1)
        out.check(
            "one blob with the right bytes", blob.is_file() and blob.read_bytes() == inst.data
        )
        out.check("one job", jobs == 1)
    f = out.figures
    out.summary = (
        f"{copies} concurrent uploads of one file: {f['status_codes']}, {f['stored']} stored + "
        f"{f['already_stored']} already stored → {f['rows']} row, {f['blobs']} blob, "
        f"{f['jobs']} job"
    )
    return out


# ---------------------------------------------------------------------------------------------
# S7: disk full


@contextmanager
def small_filesystem(path: Path, size_mib: int) -> Iterator[None]:
    """A tmpfs of ``size_mib`` MiB mounted on ``path`` (needs root and CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        unavailable("S7 needs root to mount a small tmpfs as the blob store")
    result = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size_mib}m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        unavailable(f"cannot mount a tmpfs for S7: {result.stderr.strip()[:200]}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _resize(path: Path, size_mib: int) -> None:
    subprocess.run(
        ["mount", "-o", f"remount,size={size_mib}m", str(path)], check=True, capture_output=True
    )


def run_disk_full(
    root: Path, models_dir: Path, *, size_mib: int = 4, image_size: int = 256, limit: int = 400
) -> Outcome:
    """S7: the blob store on a ``size_mib`` MiB tmpfs; upload until it is full. The failing
    upload gets 507 with nothing stored (no row, no partial or temporary file); after more
    space the same upload succeeds."""
    out = Outcome("S7", "disk full")
    data_dir = root / "data"
    blob_dir = data_dir / "blobs"
    with timed(out), small_filesystem(blob_dir, size_mib), stack(root, models_dir) as s:
        s.start_api()
        accepted: list[Instance] = []
        full: httpx.Response | None = None
        full_inst: Instance | None = None
        with s.client() as client:
            for i in range(limit):
                (inst,) = make_instances(1, image_size, seed=5000 + i)
                r = _post(client, inst)
                if r.status_code == 202:
                    accepted.append(inst)
                    continue
                full, full_inst = r, inst
                break
            assert full is not None and full_inst is not None, "the store never filled up"
            db = Database(s.database_url)
            row_for_failed = int(
                db.scalar(
                    "SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=full_inst.sop
                )
            )
            rows = int(db.scalar("SELECT count(*) FROM instances"))
            store = BlobStore(blob_dir)
            bad_blobs = [k for k in store.keys() if hashlib.sha256(store.get(k)).hexdigest() != k]
            temp_left = list((blob_dir / "tmp").glob("*")) if (blob_dir / "tmp").is_dir() else []
            failed_blob = store.path_for(full_inst.sha256).exists()
            _resize(blob_dir, size_mib * 4)
            again = _post(client, full_inst)
            db.dispose()
        out.figures.update(
            store_mib=size_mib,
            uploads_before_full=len(accepted),
            full_status=full.status_code,
            full_error=full.json().get("error") if full.content else None,
            row_for_failed_upload=row_for_failed,
            rows=rows,
            partial_or_corrupt_blobs=len(bad_blobs),
            temp_files_left=len(temp_left),
            blob_of_failed_upload=failed_blob,
            after_more_space=again.status_code,
        )
        out.check("507 when full", full.status_code == 507)
        out.check("no row for the failed upload", row_for_failed == 0)
        out.check("one row per accepted upload", rows == len(accepted))
        out.check("no partial blob", not bad_blobs and not failed_blob)
        out.check("no temporary file left", not temp_left)
        out.check("upload succeeds after freeing space", again.status_code == 202)
    f = out.figures
    out.summary = (
        f"{f['store_mib']} MiB tmpfs store: full after {f['uploads_before_full']} uploads → "
        f"{f['full_status']} {f['full_error']}, {f['row_for_failed_upload']} rows / "
        f"{f['partial_or_corrupt_blobs']} partial blobs / {f['temp_files_left']} temp files "
        f"stored; {f['after_more_space']} after more space"
    )
    return out


# ---------------------------------------------------------------------------------------------
# S8: the scrubber finds a flipped byte (and a missing blob, and orphans)


def run_scrubber_detection(
    database_url: str, blob_dir: Path, *, n_blobs: int, size: int = 64, seed: int = 3
) -> Outcome:
    """S8: ingest ``n_blobs`` instances, flip one byte of one blob, delete another, add an old
    and a young orphan: the scrubber names exactly those, and removes only the old orphan."""
    from app.registry.service import RegisteredModel  # noqa: F401  (ingest signature)
    from app.studies.service import UploadedFile, ingest_files
    from app.studies.validation import IngestLimits

    out = Outcome("S8", "scrubber detects a flipped byte")
    rng = random.Random(seed)
    instances = make_instances(n_blobs, size, seed=9000)
    store = BlobStore(blob_dir)
    engine = create_engine(database_url)
    with timed(out):
        with Session(engine) as session:
            ingest_files(
                session=session,
                store=store,
                files=[UploadedFile(f"{i}.dcm", x.data) for i, x in enumerate(instances)],
                models=[],
                principal=None,
                limits=IngestLimits(),
            )
            session.commit()
        engine.dispose()
        flipped, gone = rng.sample(instances, 2)
        path = store.path_for(flipped.sha256)
        data = bytearray(path.read_bytes())
        offset = rng.randrange(len(data))
        data[offset] ^= 0x01
        path.write_bytes(bytes(data))
        store.path_for(gone.sha256).unlink()
        old_orphan = store.put(b"orphan left by a crash between blob write and commit")
        old_time = time.time() - 7200
        os.utime(store.path_for(old_orphan), (old_time, old_time))
        young_orphan = store.put(b"an upload between its blob write and its commit")
        report = run_scrub(database_url, blob_dir, grace_seconds=3600, delete_orphans=True)
        corrupt = [p.key for p in report.corrupt]
        missing = [p.key for p in report.missing]
        out.figures.update(
            blobs=n_blobs,
            bytes_verified=report.bytes_verified,
            scrub_seconds=report.seconds,
            corrupt_found=len(corrupt),
            missing_found=len(missing),
            orphans_removed=report.deleted,
            young_orphans_kept=report.young_unreferenced,
        )
        out.check("exactly the flipped blob is corrupt", corrupt == [flipped.sha256])
        out.check(
            "the corrupt blob names its instance row",
            bool(report.corrupt) and report.corrupt[0].refs[0].table == "instances",
        )
        out.check("exactly the deleted blob is missing", missing == [gone.sha256])
        out.check("the old orphan removed", not store.exists(old_orphan) and report.deleted == 1)
        out.check("the young orphan kept", store.exists(young_orphan))
    f = out.figures
    out.summary = (
        f"{f['blobs']} blobs ({f['bytes_verified'] / 1e6:.1f} MB) re-hashed in "
        f"{f['scrub_seconds']} s: {f['corrupt_found']} corrupt (the flipped byte), "
        f"{f['missing_found']} missing, {f['orphans_removed']} old orphan removed, "
        f"{f['young_orphans_kept']} young kept"
    )
    return out


# ---------------------------------------------------------------------------------------------
# S9: SQLite with the API and two worker processes writing at once


@contextmanager
def embedded_stack(root: Path, models_dir: Path, *, extra_workers: int = 1) -> Iterator[Stack]:
    """The embedded shape on SQLite: ``medcad serve`` (API + its worker) and ``extra_workers``
    more ``medcad worker`` processes on the same database and filesystem broker."""
    with stack(root, models_dir, MEDCAD_WORKER_CONCURRENCY="1") as s:
        s.start_api(embedded_worker=True)
        for _ in range(extra_workers):
            s.start_worker(1)
        yield s


def run_sqlite_writers(
    s: Stack, *, n_uploads: int, threads: int = 4, timeout: float = 400
) -> Outcome:
    """S9: on ``embedded_stack``, uploads from ``threads`` clients while the workers write job
    results: no "database is locked" reaches a client, every job completes."""
    out = Outcome("S9", "SQLite under concurrent writers (API + workers)")
    with timed(out):
        statuses: list[int] = []
        latencies: list[float] = []
        ids: list[str] = []
        lock = threading.Lock()
        counter = iter(range(n_uploads))

        def client_loop() -> None:
            with s.client(timeout=60) as client:
                while True:
                    with lock:
                        i = next(counter, None)
                    if i is None:
                        return
                    blobs, _ = bright_disc_series(n=2, size=64, seed=20000 + i)
                    files = [
                        ("files", (f"{k}.dcm", b, "application/dicom")) for k, b in enumerate(blobs)
                    ]
                    t = time.monotonic()
                    r = client.post("/api/v1/studies", files=files)
                    # a read of another route at the same time (the API reads while workers write)
                    client.get("/api/v1/jobs", params={"limit": 5})
                    with lock:
                        statuses.append(r.status_code)
                        latencies.append(time.monotonic() - t)
                        if r.status_code == 202:
                            ids.append(r.json()["jobs"][0]["id"])

        pool = [threading.Thread(target=client_loop) for _ in range(threads)]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        db = Database(s.database_url)
        rows = wait_terminal(db, ids, timeout)
        db.dispose()
        wal = s.data_dir / "medcad.sqlite3-wal"
        wal_mib = wal.stat().st_size / 2**20 if wal.exists() else 0.0
        locked_in_logs = s.logs().count("database is locked")
        succeeded = sum(1 for r in rows.values() if r.status == "succeeded")
        out.figures.update(
            uploads=n_uploads,
            client_threads=threads,
            worker_processes=1 + len(s.workers),
            status_codes={str(c): statuses.count(c) for c in sorted(set(statuses))},
            upload_p50_ms=round(percentile(latencies, 50) * 1000),
            upload_p99_ms=round(percentile(latencies, 99) * 1000),
            jobs_succeeded=succeeded,
            jobs_failed=sum(1 for r in rows.values() if r.status == "failed"),
            wal_mib=round(wal_mib, 2),
            locked_messages_in_logs=locked_in_logs,
        )
        out.check("every upload 202", statuses.count(202) == n_uploads)
        out.check("no 5xx", not any(c >= 500 for c in statuses))
        out.check("every job succeeded", succeeded == len(ids) == n_uploads)
        out.check("WAL bounded (< 64 MiB)", wal_mib < 64)
    f = out.figures
    out.summary = (
        f"{f['uploads']} uploads from {f['client_threads']} clients with "
        f"{f['worker_processes']} worker processes writing: {f['status_codes']}, "
        f"{f['jobs_succeeded']} jobs done, {f['jobs_failed']} failed, WAL {f['wal_mib']} MiB, "
        f"{f['locked_messages_in_logs']} 'database is locked' in logs"
    )
    return out


# ---------------------------------------------------------------------------------------------
# L: sustained ingest load on loopback


def run_ingest_load(
    root: Path,
    models_dir: Path,
    *,
    seconds: float = 30,
    concurrency: int = 8,
    image_size: int = 512,
    database_url: str | None = None,
) -> Outcome:
    """L: ``concurrency`` closed-loop clients upload unique single-file series for ``seconds``
    to ``medcad serve --no-worker`` (workers stopped, as in L1); latency percentiles and rate."""
    out = Outcome("L", "sustained ingest on loopback")
    env = {"MEDCAD_DATABASE_URL": database_url} if database_url else {}
    pool_size = concurrency * 4
    bodies = make_instances(pool_size, image_size, seed=30000)
    with timed(out), stack(root, models_dir, **env) as s:
        s.start_api()
        latencies: list[float] = []
        statuses: list[int] = []
        sent_bytes = 0
        lock = threading.Lock()
        stop_at = time.monotonic() + seconds

        def client_loop(k: int) -> None:
            nonlocal sent_bytes
            n = 0
            with s.client(timeout=60) as client:
                while time.monotonic() < stop_at:
                    # a fresh SOP Instance UID per request, so dedup never short-circuits
                    base = bodies[(k + n * concurrency) % pool_size]
                    data = _with_new_uids(base.data, k, n)
                    n += 1
                    t = time.monotonic()
                    try:
                        r = client.post(
                            "/api/v1/studies",
                            files=[("files", ("x.dcm", data, "application/dicom"))],
                        )
                        code = r.status_code
                    except httpx.HTTPError:
                        code = 0
                    with lock:
                        latencies.append(time.monotonic() - t)
                        statuses.append(code)
                        sent_bytes += len(data)

        started = time.monotonic()
        threads = [threading.Thread(target=client_loop, args=(k,)) for k in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - started
        ok = statuses.count(202)
        out.figures.update(
            shape="serve --no-worker, " + ("PostgreSQL" if database_url else "SQLite"),
            concurrency=concurrency,
            seconds=round(elapsed, 1),
            body_kib=round(len(bodies[0].data) / 1024),
            requests=len(statuses),
            accepted=ok,
            non_2xx=len(statuses) - ok,
            uploads_per_s=round(ok / elapsed, 1),
            mb_per_s=round(sent_bytes / elapsed / 1e6, 1),
            p50_ms=round(percentile(latencies, 50) * 1000),
            p95_ms=round(percentile(latencies, 95) * 1000),
            p99_ms=round(percentile(latencies, 99) * 1000),
            max_ms=round(max(latencies) * 1000),
            generator="Python httpx threads on the same 2 cores",
        )
        out.check("0 errors", ok == len(statuses) and ok > 0)
        out.check("p99 < 2 s", percentile(latencies, 99) < 2.0)
    f = out.figures
    out.summary = (
        f"{f['concurrency']} clients × {f['seconds']} s, {f['body_kib']} KiB bodies: "
        f"{f['uploads_per_s']} uploads/s ({f['mb_per_s']} MB/s), p50 {f['p50_ms']} ms, p95 "
        f"{f['p95_ms']} ms, p99 {f['p99_ms']} ms, {f['non_2xx']} non-2xx"
    )
    return out


def _with_new_uids(data: bytes, k: int, n: int) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    uid = pydicom.uid.generate_uid()
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# S4: the same SOP Instance UID with other content


def _variant(data: bytes, *, pixel_seed: int | None = None, new_series: bool = False) -> bytes:
    """The same instance (same SOP Instance UID) with other pixel bytes or in another series."""
    ds = pydicom.dcmread(io.BytesIO(data))
    if pixel_seed is not None:
        pixels = bytearray(ds.PixelData)
        rng = random.Random(pixel_seed)
        for _ in range(16):
            pixels[rng.randrange(len(pixels))] ^= 0x5A
        ds.PixelData = bytes(pixels)
    if new_series:
        ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _rejected_upload_audits(db: Database) -> int:
    return int(
        db.scalar(
            "SELECT count(*) FROM audit_events WHERE action = 'upload' AND outcome = 'rejected'"
        )
    )


def run_conflicting_sop_uid(s: Stack, *, concurrent: int = 5, size: int = 64) -> Outcome:
    """S4: an instance stored, then the same SOP Instance UID with other pixel bytes, then in
    another series: 409 each, the stored bytes untouched, an audit event each. Then
    ``concurrent`` different files with one new SOP Instance UID at once: one stored, the
    others 409, and the stored bytes are the winner's."""
    out = Outcome("S4", "same SOP Instance UID, other content")
    (inst,) = make_instances(1, size, seed=random.randrange(10**6))
    db = Database(s.database_url)
    with timed(out), s.client() as client:
        first = _post(client, inst)
        audits_before = _rejected_upload_audits(db)
        answers = {}
        for name, data in (
            ("other pixels", _variant(inst.data, pixel_seed=1)),
            ("other series", _variant(inst.data, new_series=True)),
        ):
            r = client.post(
                "/api/v1/studies", files=[("files", ("x.dcm", data, "application/dicom"))]
            )
            rejected = r.json().get("rejected", [{}]) if r.content else [{}]
            answers[name] = (r.status_code, rejected[0].get("error"))
        audits = _rejected_upload_audits(db) - audits_before
        stored_sha = db.scalar(
            "SELECT blob_sha256 FROM instances WHERE sop_instance_uid = :u", u=inst.sop
        )
        rows = int(
            db.scalar("SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=inst.sop)
        )
        got = retrieve(client, inst)
        series_rows = int(
            db.scalar(
                "SELECT count(*) FROM series s JOIN instances i ON i.series_id = s.id "
                "WHERE i.sop_instance_uid = :u",
                u=inst.sop,
            )
        )
        jobs = int(
            db.scalar(
                "SELECT count(*) FROM jobs j JOIN series s ON s.id = j.series_id "
                "WHERE s.series_instance_uid = :u",
                u=inst.series,
            )
        )
        # the race: several different files claim one new SOP Instance UID at the same moment
        (base,) = make_instances(1, size, seed=random.randrange(10**6))
        variants = [_variant(base.data, pixel_seed=100 + k) for k in range(concurrent)]
        barrier = threading.Barrier(concurrent)

        def one(k: int) -> int:
            with s.client() as c:
                barrier.wait()
                return _post(c, Instance(variants[k], "", "", "", "")).status_code

        with ThreadPoolExecutor(concurrent) as pool:
            codes = list(pool.map(one, range(concurrent)))
        winner = [variants[k] for k, c in enumerate(codes) if c == 202]
        race_sha = db.scalar(
            "SELECT blob_sha256 FROM instances WHERE sop_instance_uid = :u", u=base.sop
        )
        race_rows = int(
            db.scalar("SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=base.sop)
        )
        db.dispose()
        out.figures.update(
            first=first.status_code,
            other_pixels=answers["other pixels"],
            other_series=answers["other series"],
            audit_events=audits,
            rows=rows,
            stored_sha256_unchanged=stored_sha == inst.sha256,
            retrieved_unchanged=got is not None and hashlib.sha256(got).hexdigest() == inst.sha256,
            series_rows=series_rows,
            jobs=jobs,
            race_status_codes={str(c): codes.count(c) for c in sorted(set(codes))},
            race_rows=race_rows,
            race_stored_is_winner=bool(winner)
            and race_sha == hashlib.sha256(winner[0]).hexdigest(),
        )
        out.check("first upload 202", first.status_code == 202)
        out.check(
            "409 conflict for other pixels and for another series",
            answers["other pixels"] == (409, "conflict")
            and answers["other series"] == (409, "conflict"),
        )
        out.check("an audit event for each refusal", audits == 2)
        out.check("one row, in its first series, one job", (rows, series_rows, jobs) == (1, 1, 1))
        out.check("stored bytes unchanged (sha256)", out.figures["stored_sha256_unchanged"])
        out.check("retrieved bytes unchanged", out.figures["retrieved_unchanged"])
        out.check(
            f"race: 1 × 202, {concurrent - 1} × 409",
            codes.count(202) == 1 and codes.count(409) == concurrent - 1,
        )
        out.check(
            "race: one row holding the winner's bytes",
            race_rows == 1 and out.figures["race_stored_is_winner"],
        )
    f = out.figures
    out.summary = (
        f"other pixels → {f['other_pixels'][0]}, other series → {f['other_series'][0]}, "
        f"{f['audit_events']} audit events, stored bytes unchanged; {concurrent} different "
        f"files with one new UID at once → {f['race_status_codes']}, the winner's bytes stored"
    )
    return out


# ---------------------------------------------------------------------------------------------
# S10: STOW-RS with a malformed part


_REFERENCED, _FAILED, _REASON, _SOP = "00081199", "00081198", "00081197", "00081155"


def _stow(client: httpx.Client, blobs: list[bytes], path: str = "/dicomweb/studies") -> Any:
    from tests.dicomweb.support import stow_body, stow_content_type

    boundary = "medcad-proof-5e1d"
    return client.post(
        path,
        content=stow_body(blobs, boundary),
        headers={"Content-Type": stow_content_type(boundary), "Accept": "application/dicom+json"},
    )


def _items(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    return list(body.get(tag, {}).get("Value", []))


def _first(item: dict[str, Any], tag: str) -> Any:
    values = item.get(tag, {}).get("Value")
    return values[0] if values else None


def run_stow_partial(s: Stack, *, n: int = 10, size: int = 64, seed: int = 4242) -> Outcome:
    """S10: a STOW-RS request of ``n`` instances of which one is malformed (truncated inside
    its header) → 202 with ``n-1`` referenced and 1 failed with reason 0xC000, exactly the good
    ones stored byte for byte; only bad parts → 400; the wrong study in the URL → 409, nothing
    stored."""
    out = Outcome("S10", "STOW-RS partial success")
    blobs, _ = bright_disc_series(n=n, size=size, seed=seed)
    bad_index = n // 2
    bad = blobs[bad_index][:200]  # preamble, magic and a few header elements only
    body_blobs = [*blobs[:bad_index], bad, *blobs[bad_index + 1 :]]
    good = [b for i, b in enumerate(blobs) if i != bad_index]
    headers = [pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True) for b in blobs]
    study, series = str(headers[0].StudyInstanceUID), str(headers[0].SeriesInstanceUID)
    good_sops = [str(h.SOPInstanceUID) for i, h in enumerate(headers) if i != bad_index]
    db = Database(s.database_url)
    with timed(out), s.client() as client:
        partial = _stow(client, body_blobs)
        body = partial.json() if partial.content else {}
        referenced = [_first(i, _SOP) for i in _items(body, _REFERENCED)]
        reasons = [_first(i, _REASON) for i in _items(body, _FAILED)]
        same_bytes = 0
        for sop, data in zip(good_sops, good, strict=True):
            got = retrieve(client, Instance(data, "", study, series, sop))
            same_bytes += got is not None and got == data
        rows = int(
            db.scalar(
                "SELECT count(*) FROM instances i JOIN series s ON s.id = i.series_id "
                "WHERE s.series_instance_uid = :u",
                u=series,
            )
        )
        all_bad = _stow(client, [bad, b"not DICOM at all", b"\x00" * 300])
        other, _ = bright_disc_series(n=2, size=size, seed=seed + 1)
        wrong_study = _stow(client, other, path="/dicomweb/studies/1.2.826.0.1.3680043.1.1")
        other_sops = [
            str(pydicom.dcmread(io.BytesIO(b), stop_before_pixels=True).SOPInstanceUID)
            for b in other
        ]
        other_rows = sum(
            int(db.scalar("SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=u))
            for u in other_sops
        )
        db.dispose()
        out.figures.update(
            parts=n,
            status=partial.status_code,
            referenced=len(referenced),
            failed=len(reasons),
            failure_reasons=[f"0x{r:04X}" for r in reasons if isinstance(r, int)],
            stored_rows=rows,
            retrieved_same_bytes=same_bytes,
            all_bad_status=all_bad.status_code,
            wrong_study_status=wrong_study.status_code,
            wrong_study_rows=other_rows,
        )
        out.check("202 for a partial success", partial.status_code == 202)
        out.check(f"{n - 1} referenced: the good ones", sorted(referenced) == sorted(good_sops))
        out.check("1 failed with 0xC000", reasons == [0xC000])
        out.check(f"{n - 1} rows, retrievable byte for byte", rows == same_bytes == n - 1)
        out.check("only bad parts → 400", all_bad.status_code == 400)
        out.check("wrong study in the URL → 409, nothing stored", (wrong_study.status_code,
                  other_rows) == (409, 0))  # fmt: skip
    f = out.figures
    out.summary = (
        f"{n} parts, 1 truncated → {f['status']}: {f['referenced']} referenced, {f['failed']} "
        f"failed ({', '.join(f['failure_reasons'])}), {f['retrieved_same_bytes']} retrievable "
        f"byte for byte; only bad parts → {f['all_bad_status']}; wrong study → "
        f"{f['wrong_study_status']}, {f['wrong_study_rows']} stored"
    )
    return out


# ---------------------------------------------------------------------------------------------
# L1: ingest at stepped offered rates (open loop), workers stopped


def _uid_like(template: str, k: int) -> str:
    """A UID of exactly ``len(template)`` characters, unique per ``k`` (2.25 form)."""
    digits = len(template) - len("2.25.")
    return f"2.25.{10 ** (digits - 1) + k}"


class _Renamer:
    """Fresh Study/Series/SOP Instance UIDs in a template's bytes, without re-encoding.

    The new UIDs have the template's lengths, so every length field stays valid; a byte
    replacement costs far less than a pydicom round trip, which keeps the load generator's
    own CPU off the measurement.
    """

    def __init__(self, inst: Instance) -> None:
        self.data = inst.data
        self.uids = [inst.study, inst.series, inst.sop]

    def body(self, k: int) -> bytes:
        data = self.data
        for j, uid in enumerate(self.uids):
            data = data.replace(uid.encode(), _uid_like(uid, 3 * k + j).encode())
        return data


_MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def _offer_step(
    s: Stack,
    template: _Renamer,
    counter: Iterator[int],
    rate: float,
    seconds: float,
    senders: int,
) -> dict[str, Any]:
    """One L1 step: ``rate`` × ``seconds`` uploads on a fixed schedule from ``senders`` threads."""
    answers: list[tuple[int, float]] = []
    lock = threading.Lock()
    started = time.monotonic() + 0.2
    total = int(rate * seconds)
    slots = iter(range(total))

    def sender() -> None:
        with s.client(timeout=60) as client:
            while True:
                with lock:
                    k = next(slots, None)
                    n = next(counter)
                if k is None:
                    return
                time.sleep(max(0.0, started + k / rate - time.monotonic()))
                # the multipart body is joined from bytes, not encoded by httpx per request: the
                # generator shares the API's two cores, so its own CPU must stay small
                body = multipart_body(template.body(n))
                t = time.monotonic()
                try:
                    r = client.post("/api/v1/studies", content=body, headers=_MULTIPART)
                    code = r.status_code
                except httpx.HTTPError:
                    code = 0
                with lock:
                    answers.append((code, time.monotonic() - t))

    threads = [threading.Thread(target=sender) for _ in range(senders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # the schedule spans ``seconds``; answers arriving later stretch the step
    elapsed = max(seconds, time.monotonic() - started)
    codes = [a[0] for a in answers]
    latencies = [a[1] for a in answers]
    ok = sum(1 for c in codes if 200 <= c < 300)
    p99 = percentile(latencies, 99) * 1000
    return {
        "offered_per_s": rate,
        "offered": total,
        "acknowledged": ok,
        "achieved_per_s": round(ok / elapsed, 1),
        "acknowledged_fraction": round(ok / total, 4),
        "p50_ms": round(percentile(latencies, 50) * 1000),
        "p95_ms": round(percentile(latencies, 95) * 1000),
        "p99_ms": round(p99),
        "answers_5xx": sum(1 for c in codes if c >= 500),
        "connection_errors": codes.count(0),
        # served: (nearly) every upload acknowledged, at (nearly) the offered rate, p99 < 300 ms
        "served": ok >= 0.99 * total and ok / elapsed >= 0.99 * rate and p99 < 300,
    }


def run_ingest_steps(
    root: Path,
    models_dir: Path,
    *,
    rates: tuple[float, ...] = (10.0, 25.0, 50.0, 75.0),
    seconds: float = 60.0,
    senders: int = 24,
    image_size: int = 512,
    target_rate: float = 50.0,
    database_url: str | None = None,
    api_processes: int = 1,
) -> Outcome:
    """L1: uploads offered at each of ``rates`` per second for ``seconds`` (a fixed schedule:
    slow answers do not slow the offered rate) to ``medcad serve --no-worker`` with
    ``api_processes`` API processes; per step the
    achieved rate, latency percentiles and 5xx; the knee is the highest step still served
    (≥ 99 % of the offered uploads acknowledged with p99 < 300 ms)."""
    out = Outcome("L1", "ingest at stepped offered rates")
    env = {"MEDCAD_DATABASE_URL": database_url} if database_url else {}
    env["MEDCAD_API_PROCESSES"] = str(api_processes)
    template = _Renamer(make_instances(1, image_size, seed=31000)[0])
    steps: list[dict[str, Any]] = []
    counter = iter(range(10**9))
    with timed(out), stack(root, models_dir, **env) as s:
        s.start_api()
        with s.client(timeout=60) as warm:  # first request pays imports and pool set-up
            assert (
                warm.post(
                    "/api/v1/studies",
                    files=[("files", ("w.dcm", template.body(next(counter)), "application/dicom"))],
                ).status_code
                == 202
            )
        for rate in rates:
            steps.append(_offer_step(s, template, counter, rate, seconds, senders))
    served = [st["offered_per_s"] for st in steps if st["served"]]
    at_target = next((st for st in steps if st["offered_per_s"] == target_rate), None)
    out.figures.update(
        shape=f"serve --no-worker --api-processes {api_processes}, "
        + ("PostgreSQL" if database_url else "SQLite"),
        body_kib=round(len(template.data) / 1024),
        seconds_per_step=seconds,
        senders=senders,
        steps=steps,
        knee_per_s=max(served) if served else 0.0,
        generator="Python httpx threads (multipart bodies joined from bytes) on the API's 2 cores",
    )
    if at_target is not None:
        goal = f"at {target_rate:g}/s: p99 < 300 ms, 0 5xx, ≥ 99 % achieved"
        met = out.target(goal, at_target["served"] and at_target["answers_5xx"] == 0)
        out.figures["target"] = f"{goal}: " + ("met" if met else "not met")
    out.check("no 5xx at any step", all(st["answers_5xx"] == 0 for st in steps))
    out.check("no connection errors", all(st["connection_errors"] == 0 for st in steps))
    f = out.figures
    out.summary = (
        f"{f['body_kib']} KiB uploads, {seconds:g} s per step: "
        + "; ".join(
            f"{st['offered_per_s']:g}/s → {st['achieved_per_s']}/s p99 {st['p99_ms']} ms"
            for st in steps
        )
        + f"; knee {f['knee_per_s']:g}/s"
        + (f" ({f['target']})" if "target" in f else "")
    )
    return out
