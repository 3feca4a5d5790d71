"""One unit of work per request: committed before a 2xx, rolled back on an error, and its
connection back in the pool either way — on SQLite and PostgreSQL."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import func, select

from app.db.records import AuditEventRecord
from app.db.session import get_engine, session_scope
from tests.helpers.jobs import new_job

pytestmark = pytest.mark.usefixtures("medcad_env")


def _audit_events(resource: str) -> int:
    with session_scope() as session:
        query = select(func.count()).where(AuditEventRecord.resource == resource)
        return int(session.scalar(query) or 0)


def test_every_request_returns_its_connection(api: Any) -> None:
    job = new_job(api, 1)
    answers = []
    for _ in range(20):
        answers.append(api.get(f"/api/v1/jobs/{job}").status_code)  # 200
        answers.append(api.get(f"/api/v1/jobs/{job}/results").status_code)  # 409: not finished
        answers.append(api.get("/api/v1/jobs/nosuchjob").status_code)  # 404
        answers.append(api.get("/api/v1/masks/nosuchmask.png").status_code)  # 404
    assert sorted(set(answers)) == [200, 404, 409]
    assert get_engine().pool.checkedout() == 0


def test_a_2xx_is_committed_and_an_error_is_rolled_back(api: Any) -> None:
    job = new_job(api, 2)
    # a read is audited in the request's own transaction, committed before the answer leaves
    assert api.get(f"/api/v1/jobs/{job}").status_code == 200
    assert _audit_events(f"job/{job}") >= 1
    # the results of an unfinished job: the audit event is written, then the request fails
    # with 409, and its transaction is rolled back with everything it wrote
    before = _audit_events(f"job/{job}/results")
    assert api.get(f"/api/v1/jobs/{job}/results").status_code == 409
    assert _audit_events(f"job/{job}/results") == before
