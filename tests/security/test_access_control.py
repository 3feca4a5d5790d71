"""Access control, key lifecycle and audit (reliability P1, P2, P5, P6), on SQLite and PostgreSQL.

Routes are enumerated from the application, so a route added later (DICOMweb, the page...) is
covered without touching this file — and fails here if it forgets auth or its audit event.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select, text

from app.db.records import ApiKeyRecord, AuditEventRecord
from app.db.session import session_scope
from tests.fixtures.dicom_files import CANARY_BIRTH, CANARY_ID, CANARY_NAME, bright_disc_series
from tests.security.conftest import (
    RANK,
    ROLES,
    Populated,
    Route,
    app_routes,
    fill,
    is_public,
    protected_routes,
    required_role,
    stow_body,
)

pytestmark = pytest.mark.timeout(300)


def _bad_credentials(p: Populated) -> dict[str, dict[str, str]]:
    prefix = p.keys["viewer"].split("_")[1]
    return {
        "none": {},
        "empty bearer": {"Authorization": "Bearer "},
        "basic scheme": {"Authorization": "Basic dXNlcjpwYXNzd29yZA=="},
        "garbage": {"Authorization": "Bearer garbage"},
        "empty parts": {"Authorization": "Bearer mc__"},
        "right prefix, wrong secret": {"Authorization": f"Bearer mc_{prefix}_{'x' * 43}"},
        "oversized": {"Authorization": "Bearer mc_" + "a" * 8000},
        "expired": p.headers("expired"),
        "revoked": p.headers("revoked"),
    }


def _call(
    p: Populated, route: Route, headers: dict[str, str], *, strict: bool = False, client: Any = None
) -> Any:
    client = client or p.client
    url = fill(route.path, p.path_values, strict=strict)
    # the client sends the admin key by default: replace it, never add to it
    merged = {"Authorization": "", **headers}
    if route.method == "POST":
        return client.post(url, headers=merged, content=b"")
    return client.request(route.method, url, headers=merged)


@contextmanager
def _app_with_extra_route(p: Populated, path: str, method: str, endpoint: Any) -> Iterator[Any]:
    """A fresh app with one more (deliberately faulty) route, to show the checks can fail."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    app = create_app()
    app.add_api_route(path, endpoint, methods=[method])
    with TestClient(app, headers={"Authorization": f"Bearer {p.keys['admin']}"}) as client:
        yield app, client


def _audit_count(session: Any) -> int:
    return len(session.scalars(select(AuditEventRecord.id)).all())


# --------------------------------------------------------------------------------------
# P1: no data route answers without a valid key
# --------------------------------------------------------------------------------------


def test_route_inventory_is_complete(populated: Populated) -> None:
    """The inventory sees the routes of every router, hidden ones included."""
    routes = {r.label for r in app_routes(populated.app)}
    for expected in (
        "GET /api/v1/jobs/{job_id}",
        "POST /api/v1/studies",
        "GET /api/v1/audit",
        "POST /api/v1/keys",
        "GET /api/v1/keys/{prefix}",
        "GET /",
        "GET /dicomweb/studies",
    ):
        assert expected in routes
    openapi = populated.client.get("/openapi.json").json()["paths"]
    documented = {f"{m.upper()} {path}" for path, ops in openapi.items() for m in ops}
    assert documented <= routes  # nothing documented that the inventory missed


def _unauthenticated_failures(
    p: Populated, app: Any, client: Any, only: str = ""
) -> tuple[int, int, list[str]]:
    routes = [r for r in protected_routes(app) if only in r.path]
    failures, calls = [], 0
    for route in routes:
        for what, headers in _bad_credentials(p).items():
            r = _call(p, route, headers, client=client)
            calls += 1
            body = r.json() if r.headers.get("content-type", "").startswith("application/") else {}
            if r.status_code != 401 or body.get("error") != "unauthorized":
                failures.append(f"{route.label} [{what}] -> {r.status_code} {r.text[:80]}")
            elif r.headers.get("www-authenticate") != "Bearer":
                failures.append(f"{route.label} [{what}] -> 401 without WWW-Authenticate")
    return len(routes), calls, failures


def test_every_protected_route_refuses_missing_or_bad_keys(populated: Populated) -> None:
    routes, calls, failures = _unauthenticated_failures(populated, populated.app, populated.client)
    print(f"P1 {routes} protected routes x {len(_bad_credentials(populated))} credentials "
          f"= {calls} calls, {len(failures)} not 401")  # fmt: skip
    assert routes >= 35
    assert not failures, "\n".join(failures)


def test_the_auth_check_catches_an_unprotected_route(populated: Populated) -> None:
    if populated.backend != "sqlite":
        pytest.skip("a property of the check, not of the database")

    def leak(job_id: str) -> dict[str, str]:
        return {"job": job_id}

    with _app_with_extra_route(populated, "/api/v1/leak/{job_id}", "GET", leak) as (app, client):
        _, _, failures = _unauthenticated_failures(populated, app, client, only="/api/v1/")
    assert failures and all("/api/v1/leak/{job_id}" in f for f in failures)


def test_keys_are_never_taken_from_the_url(populated: Populated) -> None:
    key = populated.keys["admin"]
    for query in (f"api_key={key}", f"key={key}", f"token={key}", f"access_token={key}"):
        r = populated.client.get(f"/api/v1/jobs?{query}", headers={"Authorization": ""})
        assert r.status_code == 401, query


def test_public_routes_answer_without_a_key_and_metrics_hold_no_identifiers(
    populated: Populated,
) -> None:
    public = [r for r in app_routes(populated.app) if is_public(r.path) and "{" not in r.path]
    assert {r.path for r in public} >= {"/healthz", "/readyz", "/metrics", "/", "/openapi.json"}
    for route in public:
        r = populated.client.get(route.path, headers={"Authorization": ""})
        assert r.status_code == 200, route.label
    metrics = populated.client.get("/metrics", headers={"Authorization": ""}).text
    assert "medcad_jobs" in metrics
    for secret in (CANARY_NAME, CANARY_ID, CANARY_BIRTH, populated.study_uid,
                   populated.series_uid, populated.job_id):  # fmt: skip
        assert secret not in metrics


# --------------------------------------------------------------------------------------
# P2: route x role matrix
# --------------------------------------------------------------------------------------


def _matrix_mismatches(
    p: Populated, app: Any, client: Any, only: str = ""
) -> tuple[int, list[str]]:
    rows, mismatches = 0, []
    for route in (r for r in protected_routes(app) if only in r.path):
        need = required_role(route.method, route.path)
        for role in ROLES:
            r = _call(p, route, p.headers(role), strict=True, client=client)
            rows += 1
            allowed = RANK[role] >= RANK[need]
            if not allowed and r.status_code != 403:
                mismatches.append(f"{route.label} as {role}: {r.status_code}, expected 403")
            elif allowed and (r.status_code in (401, 403) or r.status_code >= 500):
                mismatches.append(f"{route.label} as {role}: {r.status_code} {r.text[:100]}")
            elif allowed and route.method == "GET" and not 200 <= r.status_code < 300:
                # every path parameter is a real id: a reader must get the resource
                mismatches.append(f"{route.label} as {role}: {r.status_code} {r.text[:100]}")
    return rows, mismatches


def test_route_role_matrix(populated: Populated) -> None:
    rows, mismatches = _matrix_mismatches(populated, populated.app, populated.client)
    print(f"P2 {rows} route x role cells, {len(mismatches)} mismatches")
    assert not mismatches, "\n".join(mismatches)


def test_the_matrix_catches_a_write_route_open_to_viewers(populated: Populated) -> None:
    if populated.backend != "sqlite":
        pytest.skip("a property of the check, not of the database")
    from app.api.deps import require
    from app.db.records import Role

    def delete_everything(_p: Any = require(Role.VIEWER)) -> dict[str, str]:
        return {"deleted": "all"}

    with _app_with_extra_route(populated, "/api/v1/purge", "POST", delete_everything) as (
        app,
        client,
    ):
        _, mismatches = _matrix_mismatches(populated, app, client, only="/api/v1/")
    assert mismatches and all("POST /api/v1/purge" in m for m in mismatches)


def test_viewer_cannot_upload_and_nothing_is_stored(populated: Populated) -> None:
    from app.db.records import InstanceRecord

    blobs, _ = bright_disc_series(n=1, seed=99)
    with session_scope() as session:
        before = len(session.scalars(select(InstanceRecord.id)).all())
    r = populated.client.post(
        "/api/v1/studies",
        files=[("files", ("a.dcm", blobs[0], "application/dicom"))],
        headers=populated.headers("viewer"),
    )
    assert r.status_code == 403 and r.json()["error"] == "forbidden"
    with session_scope() as session:
        assert len(session.scalars(select(InstanceRecord.id)).all()) == before


# --------------------------------------------------------------------------------------
# P5: API key lifecycle (REST and CLI); the database holds only hashes
# --------------------------------------------------------------------------------------


def _all_key_and_audit_text() -> str:
    """Every value of every row of the key and audit tables, as text."""
    with session_scope() as session:
        rows = [*session.execute(text("SELECT * FROM api_keys")).all(),
                *session.execute(text("SELECT * FROM audit_events")).all()]  # fmt: skip
    return "\n".join(" ".join(str(v) for v in row) for row in rows)


def test_key_lifecycle_over_rest(populated: Populated) -> None:
    c = populated.client
    r = c.post("/api/v1/keys", json={"name": "pacs-bridge", "role": "uploader",
                                     "expires_in_days": 30})  # fmt: skip
    assert r.status_code == 201, r.text
    created = r.json()
    token, prefix = created["key"], created["prefix"]
    assert token.startswith(f"mc_{prefix}_") and len(token) > 40
    # the 201 names the key's own resource, which reads back without the secret or its hash
    assert r.headers["location"] == f"/api/v1/keys/{prefix}"
    one = c.get(r.headers["location"])
    assert one.status_code == 200, one.text
    assert one.json() == {k: v for k, v in created.items() if k != "key"}
    assert token not in one.text and token.split("_", 2)[2] not in one.text
    assert hashlib.sha256(token.encode()).hexdigest() not in one.text
    expires = datetime.fromisoformat(created["expires_at"])
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)
    mine = {"Authorization": f"Bearer {token}"}
    assert c.get("/api/v1/me", headers=mine).json()["role"] == "uploader"
    listed = {k["prefix"]: k for k in c.get("/api/v1/keys").json()["items"]}
    assert listed[prefix]["role"] == "uploader" and listed[prefix]["revoked_at"] is None
    assert token not in c.get("/api/v1/keys").text
    # only admins manage keys
    for role in ("viewer", "uploader"):
        assert c.get("/api/v1/keys", headers=populated.headers(role)).status_code == 403
        r = c.get(f"/api/v1/keys/{prefix}", headers=populated.headers(role))
        assert r.status_code == 403 and r.json()["error"] == "forbidden", r.text
        assert c.post("/api/v1/keys", json={"name": "x", "role": "admin"},
                      headers=populated.headers(role)).status_code == 403  # fmt: skip
    # revoked: refused on the very next request
    r = c.post(f"/api/v1/keys/{prefix}/revoke")
    assert r.status_code == 200 and r.json()["revoked_at"]
    revoked_at = r.json()["revoked_at"]
    r = c.get("/api/v1/me", headers=mine)
    assert r.status_code == 401 and prefix in r.json()["detail"]
    assert c.post("/api/v1/keys/nosuchkey/revoke").status_code == 404
    assert c.get(f"/api/v1/keys/{prefix}").json()["revoked_at"] == revoked_at
    r = c.get("/api/v1/keys/nosuchkey")
    assert r.status_code == 404 and r.json() == {
        "error": "not_found", "detail": "no API key with prefix 'nosuchkey'"}  # fmt: skip
    # invalid requests are 422 in the one error shape
    for body in (
        {"name": "", "role": "viewer"},
        {"name": "x", "role": "root"},
        {"name": "x", "role": "viewer", "expires_in_days": -1},
        {"name": "x\n", "role": "viewer"},
        {"name": "x", "role": "viewer", "extra": 1},
    ):
        r = c.post("/api/v1/keys", json=body)
        assert r.status_code == 422 and r.json()["error"] == "invalid_request", body
    # hashes only: the secret is nowhere in the database, the hash is sha256(token)
    with session_scope() as session:
        record = session.scalar(select(ApiKeyRecord).where(ApiKeyRecord.prefix == prefix))
        assert record is not None
        assert record.key_hash == hashlib.sha256(token.encode()).hexdigest()
    secret = token.split("_", 2)[2]
    assert secret not in _all_key_and_audit_text()
    actions = [e["action"] for e in c.get("/api/v1/audit?limit=20").json()["items"]]
    assert "key_create" in actions and "key_revoke" in actions


def _cli(populated: Populated, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()}
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "keys", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_key_lifecycle_over_the_cli(populated: Populated) -> None:
    if populated.backend != "sqlite":
        pytest.skip("the CLI runs the same service code; its process start costs ~3 s a call")
    c = populated.client
    created = _cli(populated, "create", "--role", "viewer", "--name", "cli-made")
    assert created.returncode == 0, created.stderr[-500:]
    token = created.stdout.strip().splitlines()[-1]
    prefix = token.split("_")[1]
    mine = {"Authorization": f"Bearer {token}"}
    assert c.get("/api/v1/me", headers=mine).json() == {
        "name": "cli-made", "role": "viewer", "key_prefix": prefix}  # fmt: skip
    listing = _cli(populated, "list")
    assert listing.returncode == 0 and prefix in listing.stdout
    assert token.split("_", 2)[2] not in listing.stdout
    revoked = _cli(populated, "revoke", prefix)
    assert revoked.returncode == 0, revoked.stderr[-500:]
    assert c.get("/api/v1/me", headers=mine).status_code == 401
    assert token.split("_", 2)[2] not in _all_key_and_audit_text()
    # the raw database file too, WAL included
    raw = b"".join(p.read_bytes() for p in populated.data_dir.glob("medcad.sqlite3*"))
    assert token.split("_", 2)[2].encode() not in raw
    assert hashlib.sha256(token.encode()).hexdigest().encode() in raw


# --------------------------------------------------------------------------------------
# P6: every patient-data access writes exactly one audit event
# --------------------------------------------------------------------------------------

# GET routes that touch no patient data: who am I, model catalogue, audit/key administration,
# and a saliency colour bar (a legend: colour map and the model's fixed display range).
NOT_PATIENT_DATA = {
    "/api/v1/me",
    "/api/v1/models",
    "/api/v1/audit",
    "/api/v1/keys",
    "/api/v1/keys/{prefix}",
    "/api/v1/saliency/{saliency_id}/colorbar.png",
}


def _new_events(since: int) -> list[AuditEventRecord]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(AuditEventRecord)
                .where(AuditEventRecord.id > since)
                .order_by(AuditEventRecord.id)
            )
        )


def _last_event_id() -> int:
    with session_scope() as session:
        return int(session.scalar(select(AuditEventRecord.id).order_by(
            AuditEventRecord.id.desc()).limit(1)) or 0)  # fmt: skip


def _check_event(event: AuditEventRecord, p: Populated, who: str, t0: datetime) -> list[str]:
    problems = []
    at = event.at if event.at.tzinfo else event.at.replace(tzinfo=UTC)
    if event.actor_key_id != p.key_ids[who] or event.actor_name != f"{who}-key":
        problems.append(f"who: {event.actor_key_id}/{event.actor_name}")
    if not t0 - timedelta(seconds=1) <= at <= datetime.now(UTC) + timedelta(seconds=1):
        problems.append(f"when: {at}")
    if event.client != "testclient":
        problems.append(f"from: {event.client}")
    if event.outcome != "success":
        problems.append(f"outcome: {event.outcome}")
    if event.action not in ("view", "download", "search", "upload") or not event.resource:
        problems.append(f"what: {event.action} {event.resource}")
    return problems


def _audit_failures(p: Populated, app: Any, client: Any, only: str = "") -> tuple[int, list[str]]:
    reads = [r for r in protected_routes(app)
             if r.method == "GET" and r.path not in NOT_PATIENT_DATA and only in r.path]  # fmt: skip
    failures = []
    for route in reads:
        since, t0 = _last_event_id(), datetime.now(UTC)
        r = _call(p, route, p.headers("viewer"), strict=True, client=client)
        events = _new_events(since)
        if r.status_code != 200:
            failures.append(f"{route.label}: status {r.status_code}")
        elif len(events) != 1:
            failures.append(f"{route.label}: {len(events)} audit events")
        else:
            problems = _check_event(events[0], p, "viewer", t0)
            names_data = "{" in route.path.replace("{frames}", "").replace("{tag}", "")
            if names_data and not (
                events[0].study_instance_uid == p.study_uid
                and events[0].series_instance_uid in (p.series_uid, None)
            ):
                problems.append(f"study/series: {events[0].study_instance_uid}")
            failures += [f"{route.label}: {x}" for x in problems]
    return len(reads), failures


def test_every_patient_data_read_writes_exactly_one_audit_event(populated: Populated) -> None:
    reads, failures = _audit_failures(populated, populated.app, populated.client)
    print(f"P6 {reads} patient-data read routes, {len(failures)} audit failures")
    assert reads >= 25
    assert not failures, "\n".join(failures)


def test_the_audit_check_catches_a_read_without_audit(populated: Populated) -> None:
    if populated.backend != "sqlite":
        pytest.skip("a property of the check, not of the database")
    from app.api.deps import require
    from app.db.records import Role

    def peek(job_id: str, _p: Any = require(Role.VIEWER)) -> dict[str, str]:
        return {"job": job_id}

    with _app_with_extra_route(populated, "/api/v1/peek/{job_id}", "GET", peek) as (app, client):
        _, failures = _audit_failures(populated, app, client, only="/api/v1/")
    assert failures == ["GET /api/v1/peek/{job_id}: 0 audit events"]


def test_a_failed_audit_write_fails_the_access(populated: Populated) -> None:
    """Fail closed: the audit row is in the access's transaction, so no audit means no data."""
    if populated.backend != "sqlite":
        pytest.skip("breaks the database on purpose; once is enough")
    with session_scope() as session:
        session.execute(text("ALTER TABLE audit_events RENAME TO audit_events_away"))
    try:
        r = populated.client.get(f"/api/v1/jobs/{populated.job_id}")
        assert r.status_code == 503 and r.json()["error"] == "service_unavailable"
        assert "audit_events" not in r.text and "SELECT" not in r.text.upper()
    finally:
        with session_scope() as session:
            session.execute(text("ALTER TABLE audit_events_away RENAME TO audit_events"))
    assert populated.client.get(f"/api/v1/jobs/{populated.job_id}").status_code == 200


def test_cached_download_is_audited_too(populated: Populated) -> None:
    mask = populated.extra["results"]["masks"][0]["url"]
    etag = populated.client.get(mask).headers["etag"]
    since = _last_event_id()
    r = populated.client.get(mask, headers={"If-None-Match": etag})
    assert r.status_code == 304
    assert [e.action for e in _new_events(since)] == ["download"]


@pytest.mark.parametrize("route", ["/api/v1/studies", "/dicomweb/studies"])
def test_every_upload_writes_exactly_one_audit_event_per_new_series(
    populated: Populated, route: str
) -> None:
    blobs, _ = bright_disc_series(n=2, seed=hash(route) % 1000 + 5)
    since, t0 = _last_event_id(), datetime.now(UTC)
    if route == "/api/v1/studies":
        files = [("files", (f"u{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]
        r = populated.client.post(route, files=files, headers=populated.headers("uploader"))
    else:
        body, content_type = stow_body(blobs)
        r = populated.client.post(
            route,
            content=body,
            headers={**populated.headers("uploader"), "Content-Type": content_type},
        )
    assert r.status_code in (200, 202), r.text
    events = _new_events(since)
    assert len(events) == 1, [(e.action, e.resource) for e in events]
    assert events[0].action == "upload"
    assert not _check_event(events[0], populated, "uploader", t0)
    assert events[0].series_instance_uid
    # denied and unauthenticated attempts store nothing and add no access event
    since = _last_event_id()
    r = populated.client.get("/api/v1/jobs", headers=populated.headers("revoked"))
    assert r.status_code == 401 and _new_events(since) == []
