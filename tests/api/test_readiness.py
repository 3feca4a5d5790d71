"""/readyz turns red when jobs wait and no worker consumes them (the celery#8030 pattern)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from app.db.records import JobRecord, JobStatus, utcnow
from app.db.session import session_scope
from tests.helpers.jobs import new_job, update_job

pytestmark = pytest.mark.usefixtures("medcad_env")


def test_waiting_jobs_with_no_consumer_make_readyz_red(api: Any) -> None:
    job_id = new_job(api)
    assert api.get("/readyz").json()["checks"]["workers"] == "ok"  # fresh: not yet overdue

    hour_ago = utcnow() - timedelta(hours=1)
    update_job(job_id, created_at=hour_ago)
    r = api.get("/readyz")
    assert r.status_code == 503
    body = r.json()
    assert body["status"] == "unavailable"
    assert body["checks"]["workers"].startswith("error: 1 job(s) queued for up to 36")
    assert body["checks"]["database"] == body["checks"]["broker"] == "ok"

    # a worker holding a live lease on another job is busy, not stalled
    other = new_job(api)
    update_job(
        other,
        status=JobStatus.RUNNING,
        started_at=hour_ago,
        lease_expires_at=utcnow() + timedelta(minutes=5),
    )
    assert api.get("/readyz").status_code == 200
    # its lease expired (the worker died): stalled again
    update_job(other, lease_expires_at=utcnow() - timedelta(seconds=1))
    assert api.get("/readyz").status_code == 503
    # a job finished a moment ago: the workers are consuming, just behind
    update_job(other, status=JobStatus.SUCCEEDED, finished_at=utcnow())
    assert api.get("/readyz").status_code == 200
    with session_scope() as session:
        assert session.scalars(select(JobRecord.status)).all().count(JobStatus.QUEUED) == 1
