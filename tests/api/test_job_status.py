"""What a job says about itself: queue position and ETA while queued, stage and time left while
running, the reason when failed — the same in ``GET /api/v1/jobs/{id}`` and in the list, on
SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from app.db.records import JobStatus, utcnow
from tests.helpers.jobs import new_job, update_job

pytestmark = pytest.mark.usefixtures("medcad_env")


def _views(api: Any, job_id: str) -> dict[str, Any]:
    """The job as ``GET /jobs/{id}`` shows it, checked equal to its entry in the list."""
    one = api.get(f"/api/v1/jobs/{job_id}").json()
    listed = api.get("/api/v1/jobs", params={"limit": 500}).json()["items"]
    entry = next(item for item in listed if item["id"] == job_id)
    keys = ("status", "stage", "queue_position", "error")
    assert {k: entry[k] for k in keys} == {k: one[k] for k in keys}
    # A running job's time left shrinks between the two requests.
    assert (entry["eta_seconds"] is None) == (one["eta_seconds"] is None)
    assert one["eta_seconds"] is None or abs(entry["eta_seconds"] - one["eta_seconds"]) < 1
    return one  # type: ignore[no-any-return]


def test_queued_jobs_show_position_and_eta_from_recent_durations(api: Any) -> None:
    first, second, third = (new_job(api, seed) for seed in (1, 2, 3))
    # No job has finished yet: positions, but no basis for an ETA.
    assert [_views(api, j)["queue_position"] for j in (first, second, third)] == [1, 2, 3]
    assert _views(api, third)["eta_seconds"] is None

    # One job took 8 s: each job ahead (and this one) is expected to take as long.
    now = utcnow()
    update_job(
        first,
        status=JobStatus.SUCCEEDED,
        started_at=now - timedelta(seconds=8),
        finished_at=now,
    )
    done = _views(api, first)
    assert done["status"] == "succeeded" and done["queue_position"] is None
    assert done["eta_seconds"] is None
    assert (_views(api, second)["queue_position"], _views(api, second)["eta_seconds"]) == (1, 8.0)
    assert (_views(api, third)["queue_position"], _views(api, third)["eta_seconds"]) == (2, 16.0)

    # Running for 3 s: its stage, and about 5 s left; the job behind it moves up.
    update_job(
        second,
        status=JobStatus.RUNNING,
        stage="infer:tinyseg",
        started_at=utcnow() - timedelta(seconds=3),
    )
    running = _views(api, second)
    assert running["status"] == "running" and running["stage"] == "infer:tinyseg"
    assert running["queue_position"] is None
    assert 4.0 <= running["eta_seconds"] <= 5.0
    assert (_views(api, third)["queue_position"], _views(api, third)["eta_seconds"]) == (1, 8.0)


def test_failed_job_shows_its_reason(api: Any) -> None:
    job_id = new_job(api, 7)
    update_job(
        job_id,
        status=JobStatus.FAILED,
        error_code="decode_failed",
        error_detail="frame 1: pixel data shorter than Rows × Columns",
        finished_at=utcnow(),
    )
    job = _views(api, job_id)
    assert job["status"] == "failed"
    assert job["error"] == {
        "code": "decode_failed",
        "detail": "frame 1: pixel data shorter than Rows × Columns",
    }
    assert job["queue_position"] is None and job["eta_seconds"] is None
    failed = api.get("/api/v1/jobs", params={"status": "failed"}).json()
    assert [item["id"] for item in failed["items"]] == [job_id] and failed["total"] == 1
