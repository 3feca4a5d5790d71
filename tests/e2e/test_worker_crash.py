"""Killing worker processes mid-job loses nothing: the job is re-run and finishes exactly once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.services import medcad_deployment, postgres_database, redis_db_url, wait_for_jobs
from tests.reliability.harness import children as pool_children

pytestmark = pytest.mark.slow


def _wait_running(client, job_id: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if client.get(f"/api/v1/jobs/{job_id}").json()["status"] == "running":
            return
        time.sleep(0.02)
    raise TimeoutError("job never started")


def _big_job(client) -> str:  # type: ignore[no-untyped-def]
    blobs, _ = bright_disc_series(n=24, size=512, radius=40)
    files = [("files", (f"{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]
    r = client.post("/api/v1/studies", files=files)
    assert r.status_code == 202, r.text
    return str(r.json()["jobs"][0]["id"])


def test_killed_pool_child_and_killed_worker_lose_nothing(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    broker = redis_db_url(12)
    with (
        postgres_database() as db_url,
        medcad_deployment(
            tmp_path,
            tiny_models_dir,
            workers=1,
            embedded=False,
            MEDCAD_DATABASE_URL=db_url,
            MEDCAD_BROKER_URL=broker,
            MEDCAD_JOB_LEASE_SECONDS="6",
        ) as server,
        server.client() as client,
    ):
        first_worker = server.procs[-1]
        # 1. SIGKILL the pool child running the job: Celery re-queues it (reject on worker lost)
        job_a = _big_job(client)
        _wait_running(client, job_a)
        children = pool_children(first_worker.pid)
        assert children, "worker has no pool child"
        for child in children:
            os.kill(child, signal.SIGKILL)
        final = wait_for_jobs(client, [job_a], timeout=180)[job_a]
        assert final["status"] == "succeeded", final
        assert final["attempts"] == 2
        # 2. SIGKILL the whole worker mid-job: the lease expires, the sweeper re-queues, another
        #    worker finishes it.
        job_b = _big_job(client)
        _wait_running(client, job_b)
        os.killpg(first_worker.pid, signal.SIGKILL)
        first_worker.wait()
        server.start_worker()
        final_b = wait_for_jobs(client, [job_b], timeout=240)[job_b]
        assert final_b["status"] == "succeeded", final_b
        assert final_b["attempts"] >= 2
        # exactly one result set each
        for job_id in (job_a, job_b):
            res = client.get(f"/api/v1/jobs/{job_id}/results").json()
            assert len(res["masks"]) == 24
            assert len([f for f in res["findings"] if f["level"] == "series"]) == 1
