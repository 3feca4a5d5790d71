"""Jobs for in-process API tests: create one by a real upload, then move its row by hand."""

from __future__ import annotations

from typing import Any

from app.db.records import JobRecord
from app.db.session import session_scope
from tests.fixtures.dicom_files import bright_disc_series


def new_job(api: Any, seed: int = 0) -> str:
    """Upload a one-slice series through ``api`` (a TestClient); the id of its job."""
    blobs, _ = bright_disc_series(n=1, seed=seed)
    r = api.post("/api/v1/studies", files=[("files", ("a.dcm", blobs[0], "application/dicom"))])
    assert r.status_code == 202, r.text
    return str(r.json()["jobs"][0]["id"])


def update_job(job_id: str, **values: Any) -> None:
    """Set columns of a job row directly (states a worker would otherwise reach)."""
    with session_scope() as session:
        job = session.get(JobRecord, job_id)
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)
