"""Webhooks: an HMAC-signed POST to the caller's callback_url when a job ends, retried with
back-off, delivery status visible on the job. The receiver is a tiny local HTTP server (a system
we do not run)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from app.db.records import JobRecord, utcnow
from app.db.session import session_scope
from app.jobs.webhooks import deliver_due
from app.settings import get_settings
from tests.conftest import reset_caches
from tests.fixtures.dicom_files import bright_disc_series
from workers import runner

SECRET = "webhook-test-secret"


class Receiver:
    def __init__(self) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.requests.append((dict(self.headers), body))
                self.send_response(outer.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch, sqlite_env: Any) -> Iterator[Receiver]:
    monkeypatch.setenv("MEDCAD_WEBHOOK_SECRET", SECRET)
    monkeypatch.setenv("MEDCAD_WEBHOOK_MAX_ATTEMPTS", "3")
    reset_caches()
    r = Receiver()
    yield r
    r.server.shutdown()


def _job_with_callback(url: str) -> str:
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.helpers.services import ADMIN_KEY

    blobs, _ = bright_disc_series(n=1)
    with TestClient(create_app(), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        r = client.post("/api/v1/studies", data={"callback_url": url},
                        files=[("files", ("a.dcm", blobs[0], "application/dicom"))])
        assert r.status_code == 202, r.text
        job_id = str(r.json()["jobs"][0]["id"])
        assert client.get(f"/api/v1/jobs/{job_id}").json()["webhook"]["status"] == "pending"
    return job_id


def _webhook_on_the_job(job_id: str) -> dict[str, Any]:
    """The delivery status as ``GET /api/v1/jobs/{id}`` shows it to the caller."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.helpers.services import ADMIN_KEY

    with TestClient(create_app(), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
        r = client.get(f"/api/v1/jobs/{job_id}")
        assert r.status_code == 200, r.text
        return r.json()["webhook"]  # type: ignore[no-any-return]


def test_signed_delivery_when_job_ends(receiver: Receiver) -> None:
    job_id = _job_with_callback(receiver.url)
    assert deliver_due(get_settings()) == 0  # not finished yet: nothing sent
    assert runner.run_job(job_id) == "succeeded"
    assert deliver_due(get_settings()) == 1
    headers, body = receiver.requests[0]
    expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Medcad-Signature"] == expected
    payload = json.loads(body)
    assert payload["job_id"] == job_id and payload["status"] == "succeeded"
    with session_scope() as s:
        job = s.get(JobRecord, job_id)
        assert job is not None and job.webhook_status == "delivered" and job.webhook_attempts == 1
    assert deliver_due(get_settings()) == 0  # delivered once only
    assert _webhook_on_the_job(job_id) == {
        "url_host": "127.0.0.1",
        "status": "delivered",
        "attempts": 1,
    }


def test_failed_deliveries_back_off_then_give_up(receiver: Receiver) -> None:
    receiver.status = 500
    job_id = _job_with_callback(receiver.url)
    assert runner.run_job(job_id) == "succeeded"
    for attempt in range(1, 4):
        deliver_due(get_settings())
        with session_scope() as s:
            job = s.get(JobRecord, job_id)
            assert job is not None and job.webhook_attempts == attempt
            if attempt < 3:
                assert job.webhook_status == "pending"
                assert job.webhook_next_at is not None
                # exponential back-off: 2 s after the first failure, 4 s after the second
                wait = job.webhook_next_at.replace(tzinfo=None) - utcnow().replace(tzinfo=None)
                assert 2**attempt - 1 < wait.total_seconds() <= 2**attempt
                job.webhook_next_at = utcnow() - timedelta(seconds=1)  # skip the back-off wait
        if attempt < 3:
            assert _webhook_on_the_job(job_id) == {
                "url_host": "127.0.0.1",
                "status": "pending",
                "attempts": attempt,
            }
    with session_scope() as s:
        job = s.get(JobRecord, job_id)
        assert job is not None and job.webhook_status == "failed"
    assert len(receiver.requests) == 3
    assert _webhook_on_the_job(job_id) == {
        "url_host": "127.0.0.1",
        "status": "failed",
        "attempts": 3,
    }
