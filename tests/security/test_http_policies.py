"""CORS allow-list, per-key rate limits, generic error bodies, JSON-only Celery
(reliability P10, P11, P12, P13 configuration part)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import reset_caches
from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.services import ADMIN_KEY

ALLOWED = "https://viewer.example.org"
UNLISTED = "https://evil.example.com"


def _client(monkeypatch: pytest.MonkeyPatch, **env: str) -> Any:
    from fastapi.testclient import TestClient

    from app.main import create_app

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    reset_caches()
    return TestClient(
        create_app(),
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        raise_server_exceptions=False,
    )


def _key(role: str = "viewer", name: str = "k") -> str:
    from app.auth.service import create_key
    from app.db.records import Role
    from app.db.session import session_scope

    with session_scope() as session:
        return create_key(session=session, name=name, role=Role(role))[1]


# --------------------------------------------------------------------------------------
# P10 CORS
# --------------------------------------------------------------------------------------


@pytest.fixture
def cors_client(sqlite_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with _client(monkeypatch, MEDCAD_CORS_ORIGINS=json.dumps([ALLOWED])) as client:
        yield client


def _preflight(client: Any, origin: str) -> Any:
    return client.options(
        "/api/v1/jobs",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization",
        },
    )


def test_cors_allows_only_listed_origins(cors_client: Any) -> None:
    ok = _preflight(cors_client, ALLOWED)
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == ALLOWED
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert ok.headers.get("access-control-allow-credentials") is None  # bearer keys, no cookies
    bad = _preflight(cors_client, UNLISTED)
    assert "access-control-allow-origin" not in bad.headers
    assert bad.status_code == 400
    # a simple request still runs (CORS is enforced by browsers) but gets no permission to read
    simple = cors_client.get("/api/v1/jobs", headers={"Origin": UNLISTED})
    assert simple.status_code == 200 and "access-control-allow-origin" not in simple.headers
    listed = cors_client.get("/api/v1/jobs", headers={"Origin": ALLOWED})
    assert listed.headers["access-control-allow-origin"] == ALLOWED


def test_cors_is_closed_by_default(sqlite_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with _client(monkeypatch) as client:
        for origin in (ALLOWED, UNLISTED, "null"):
            r = _preflight(client, origin)
            assert "access-control-allow-origin" not in r.headers, origin
            r = client.get("/api/v1/jobs", headers={"Origin": origin})
            assert "access-control-allow-origin" not in r.headers, origin


# --------------------------------------------------------------------------------------
# P11 rate limits
# --------------------------------------------------------------------------------------


@pytest.fixture
def limited_client(sqlite_env: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with _client(
        monkeypatch, MEDCAD_RATE_LIMIT_PER_MINUTE="60", MEDCAD_RATE_LIMIT_BURST="5"
    ) as client:
        yield client


def test_rate_limit_answers_429_with_retry_after_and_spares_other_keys(
    limited_client: Any,
) -> None:
    a, b = _key(name="a"), _key(name="b")
    as_a, as_b = {"Authorization": f"Bearer {a}"}, {"Authorization": f"Bearer {b}"}
    statuses = [limited_client.get("/api/v1/me", headers=as_a).status_code for _ in range(8)]
    assert statuses[:5] == [200] * 5 and set(statuses[5:]) == {429}, statuses
    r = limited_client.get("/api/v1/me", headers=as_a)
    assert r.status_code == 429 and r.json()["error"] == "rate_limited"
    retry_after = int(r.headers["retry-after"])
    assert 1 <= retry_after <= 2
    # another key, probes and the page are unaffected
    assert [limited_client.get("/api/v1/me", headers=as_b).status_code for _ in range(5)] == [
        200
    ] * 5
    assert limited_client.get("/healthz").status_code == 200
    assert limited_client.get("/readyz").status_code == 200
    # the bucket refills at the configured rate
    time.sleep(retry_after + 0.1)
    assert limited_client.get("/api/v1/me", headers=as_a).status_code == 200
    print(f"P11 burst 5 at 60/min: 5 x 200 then 429, Retry-After {retry_after} s, key B 5/5 200")


def test_knowing_a_key_prefix_does_not_let_anyone_drain_its_bucket(limited_client: Any) -> None:
    victim = _key(name="victim")
    forged = {"Authorization": f"Bearer mc_{victim.split('_')[1]}_{'x' * 43}"}
    forged_statuses = {limited_client.get("/api/v1/me", headers=forged).status_code
                       for _ in range(10)}  # fmt: skip
    assert forged_statuses == {401, 429}
    r = limited_client.get("/api/v1/me", headers={"Authorization": f"Bearer {victim}"})
    assert r.status_code == 200


def test_token_buckets_are_exact_and_bounded() -> None:
    from app.ratelimit import TokenBuckets

    now = [0.0]
    buckets = TokenBuckets(rate_per_second=2.0, burst=3, max_buckets=4, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)
    now[0] = 0.5
    assert buckets.take("a") == 0.0 and buckets.take("a") == pytest.approx(0.5)
    for i in range(100):
        buckets.take(f"made-up-{i}")
    assert len(buckets._buckets) == 4  # memory stays bounded under a flood of callers


# --------------------------------------------------------------------------------------
# P12 error bodies
# --------------------------------------------------------------------------------------


def test_an_internal_error_answers_a_generic_body_with_a_reference(
    sqlite_env: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A blob turned into a directory under the store: the read fails with an OS error that
    names the path; neither the path nor a traceback may reach the caller."""
    from sqlalchemy import select

    from app.db.records import InstanceRecord
    from app.db.session import session_scope
    from app.settings import get_settings
    from app.storage import BlobStore

    with _client(monkeypatch) as client:
        blobs, _ = bright_disc_series(n=1, seed=3)
        files = [("files", ("a.dcm", blobs[0], "application/dicom"))]
        assert client.post("/api/v1/studies", files=files).status_code == 202
        with session_scope() as session:
            instance = session.scalars(select(InstanceRecord)).one()
        path = BlobStore(get_settings().blob_dir).path_for(instance.blob_sha256)
        path.unlink()
        path.mkdir()
        with caplog.at_level(logging.ERROR):
            r = client.get(f"/api/v1/instances/{instance.sop_instance_uid}/frames/0/pixels")
    assert r.status_code == 500
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"] == "internal_error"
    assert body["detail"].startswith("an unexpected error occurred (reference ")
    reference = body["detail"].rsplit(" ", 1)[1].rstrip(")")
    for leak in ("Traceback", 'File "', str(sqlite_env), "blobs", "Errno", "IsADirectory",
                 "sqlalchemy", "SELECT", ".py"):  # fmt: skip
        assert leak not in r.text, leak
    logged = [rec for rec in caplog.records if getattr(rec, "error_reference", None) == reference]
    assert len(logged) == 1 and str(sqlite_env) not in logged[0].getMessage()


def test_database_errors_answer_503_without_sql(
    sqlite_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy import text

    from app.db.session import session_scope

    with _client(monkeypatch) as client:
        with session_scope() as session:
            session.execute(text("ALTER TABLE jobs RENAME TO jobs_gone"))
        r = client.get("/api/v1/jobs")
    assert r.status_code == 503 and r.headers["retry-after"]
    assert r.json() == {
        "error": "service_unavailable",
        "detail": "the database is unavailable; retry later",
    }


# --------------------------------------------------------------------------------------
# P13 Celery: JSON only, on both sides
# --------------------------------------------------------------------------------------


def test_celery_accepts_and_sends_json_only(sqlite_env: Path) -> None:
    from app.queue import make_celery
    from app.settings import get_settings
    from workers.celery_app import celery_app

    for app in (make_celery(get_settings()), celery_app):
        conf = app.conf
        assert conf.task_serializer == "json"
        assert list(conf.accept_content) == ["json"]
        assert conf.result_serializer == "json" and conf.event_serializer == "json"
        assert conf.result_accept_content in (None, ["json"])
        assert conf.result_backend is None


# --------------------------------------------------------------------------------------
# P7 (unit): what other libraries log is redacted, medcad's own records are kept
# --------------------------------------------------------------------------------------


def test_quoted_values_from_other_libraries_are_redacted_before_formatting() -> None:
    from app.logging_setup import JsonFormatter, RedactThirdPartyValues

    def formatted(name: str, msg: str, *args: object, **extra: object) -> str:
        record = logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)
        for key, value in extra.items():
            setattr(record, key, value)
        assert RedactThirdPartyValues().filter(record)
        return JsonFormatter().format(record)

    pydicom_warning = formatted(
        "py.warnings", "%s", "valuerep.py:440: UserWarning: Invalid value for VR DA: 'x19010203'."
    )
    assert "19010203" not in pydicom_warning and "Invalid value for VR DA" in pydicom_warning
    for repr_line in ("(0010,0010) Patient's Name    PN: 'CANARY^PHI^Zebulon'",
                      "(0010,0010) Patient's Name PN: \"O'Hara^CANARY\"",
                      "RawDataElement(tag=(0010,0020), value=b'CANARY-ID-7731')"):  # fmt: skip
        line = formatted("highdicom.base", "copy %s", repr_line)
        assert "CANARY" not in line and "Hara" not in line, line
        assert "Patient's Name" in line or "RawDataElement" in line
    task_log = formatted("celery.app.trace", "Task failed: %r", ValueError("could not convert 'CANARY'"),
                         data="args: ('CANARY',)")  # fmt: skip
    assert "CANARY" not in task_log
    own = formatted("workers.runner", "job %s failed at stage '%s'", "abc123", "decode")
    assert "'decode'" in own and "abc123" in own
