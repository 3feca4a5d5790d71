"""Fixtures of the security tests: a populated medcad (keys of every role, a finished job) and
the route inventory, read from the application itself so that new routes are covered as soon
as they exist."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.routing import iter_route_contexts

from tests.conftest import _configure, reset_caches
from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.services import ADMIN_KEY, postgres_database

# Routes anyone may call. Everything else needs a key.
#  /healthz, /readyz: probes of the orchestrator (no data, no identifiers).
#  /metrics: counters and gauges with fixed label vocabularies (statuses, rejection codes,
#    stages); no identifiers or patient data (checked below), and Prometheus scrapes it
#    without credentials; keep it on a private network or behind the proxy.
#  /, /static/*: the page shell; it holds no data and asks for a key before calling the API.
#  /docs, /redoc, /openapi.json: the API description (what exists, not what is stored).
PUBLIC_PATHS = frozenset(
    {"/healthz", "/readyz", "/metrics", "/", "/docs", "/docs/oauth2-redirect", "/redoc",
     "/openapi.json"}
)  # fmt: skip
PUBLIC_PREFIXES = ("/static",)

ROLES = ("viewer", "uploader", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}

# Least role per route. Unlisted GET routes need "viewer"; every other unlisted method is
# expected to need "admin" (deny by default), so a new write route fails the matrix until its
# role is decided here.
REQUIRED_ROLE = {
    ("POST", "/api/v1/studies"): "uploader",
    ("POST", "/dicomweb/studies"): "uploader",
    ("POST", "/dicomweb/studies/{study}"): "uploader",
    ("GET", "/api/v1/audit"): "admin",
    ("GET", "/api/v1/keys"): "admin",
    ("GET", "/api/v1/keys/{prefix}"): "admin",
    ("POST", "/api/v1/keys"): "admin",
    ("POST", "/api/v1/keys/{prefix}/revoke"): "admin",
}


def required_role(method: str, path: str) -> str:
    """The least role expected to be allowed on ``method path``."""
    return REQUIRED_ROLE.get((method, path), "viewer" if method == "GET" else "admin")


def stow_body(files: list[bytes], boundary: str = "medcad-security-test") -> tuple[bytes, str]:
    """A STOW-RS multipart/related body (RFC 2387) and its Content-Type."""
    body = b"".join(
        f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data + b"\r\n"
        for data in files
    )
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


@dataclass(frozen=True)
class Route:
    method: str
    path: str

    @property
    def label(self) -> str:
        return f"{self.method} {self.path}"


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def app_routes(app: Any) -> list[Route]:
    """Every (method, path) the application answers, hidden routes included."""
    routes = set()
    for context in iter_route_contexts(app.routes):
        methods = context.methods or set()
        for method in methods - {"HEAD", "OPTIONS"}:
            routes.add(Route(method, str(context.path)))
    return sorted(routes, key=lambda r: (r.path, r.method))


def protected_routes(app: Any) -> list[Route]:
    return [r for r in app_routes(app) if not is_public(r.path)]


def fill(path: str, values: dict[str, str], *, strict: bool) -> str:
    """``path`` with its ``{name}`` parameters replaced from ``values``."""
    import re

    def repl(match: re.Match[str]) -> str:
        name = match.group(1).split(":")[0]
        if name in values:
            return values[name]
        if strict:
            raise KeyError(f"no value for path parameter {name!r}: add it to the fixture")
        return "1"

    return re.sub(r"\{([^}]+)\}", repl, path)


@dataclass
class Populated:
    """A configured medcad with keys of every role and one finished job."""

    backend: str
    data_dir: Path
    client: Any  # TestClient, admin by default
    app: Any
    keys: dict[str, str]  # role or label -> plaintext key
    key_ids: dict[str, str]
    path_values: dict[str, str]
    job_id: str
    study_uid: str
    series_uid: str
    extra: dict[str, Any] = field(default_factory=dict)

    def headers(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[who]}"}


def _make_keys(session: Any) -> tuple[dict[str, str], dict[str, str]]:
    from app.auth.service import create_key, revoke_key
    from app.db.records import Role, utcnow

    keys, ids = {}, {}
    for role in ROLES:
        record, token = create_key(session=session, name=f"{role}-key", role=Role(role))
        keys[role], ids[role] = token, record.id
    record, token = create_key(
        session=session,
        name="expired-key",
        role=Role.ADMIN,
        expires_at=utcnow() - timedelta(seconds=1),
    )
    keys["expired"], ids["expired"] = token, record.id
    record, token = create_key(session=session, name="revoked-key", role=Role.ADMIN)
    revoke_key(session=session, prefix=record.prefix)
    keys["revoked"], ids["revoked"] = token, record.id
    record, token = create_key(session=session, name="spare-key", role=Role.VIEWER)
    keys["spare"], ids["spare"] = token, record.id
    return keys, ids


def _finished_job(client: Any) -> dict[str, Any]:
    from workers import runner

    blobs, _ = bright_disc_series(n=2, seed=11)
    files = [("files", (f"s{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]
    r = client.post("/api/v1/studies", files=files)
    assert r.status_code == 202, r.text
    job_id = r.json()["jobs"][0]["id"]
    assert runner.run_job(job_id) == "succeeded"
    results = client.get(f"/api/v1/jobs/{job_id}/results").json()
    return {"job_id": job_id, "results": results}


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def populated(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[Populated]:
    """medcad on SQLite and on PostgreSQL, with keys of every role and one succeeded job."""
    from fastapi.testclient import TestClient

    from app.db.session import session_scope
    from app.main import create_app

    monkeypatch = pytest.MonkeyPatch()
    tmp = tmp_path_factory.mktemp(f"security-{request.param}")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(postgres_database()) if request.param == "postgres" else None
        data_dir = _configure(monkeypatch, tmp, tiny_models_dir, url)
        app = create_app()
        client = stack.enter_context(
            TestClient(app, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        )
        with session_scope() as session:
            keys, key_ids = _make_keys(session)
            from sqlalchemy import select

            from app.db.records import ApiKeyRecord

            spare_prefix = session.scalar(
                select(ApiKeyRecord.prefix).where(ApiKeyRecord.id == key_ids["spare"])
            )
        job = _finished_job(client)
        res = job["results"]
        series = res["series"]
        sop = series["instances"][0]["sop_instance_uid"]
        values = {
            "job_id": job["job_id"],
            "mask_id": res["masks"][0]["id"],
            "saliency_id": res["saliency"][0]["id"],
            "artifact_id": res["dicom"]["seg"][0]["url"].rsplit("/", 1)[1],
            "sop_instance_uid": sop,
            "frame": "0",
            "study": series["study_instance_uid"],
            "series": series["series_instance_uid"],
            "instance": sop,
            "frames": "1",
            "tag": "7FE00010",
            "prefix": str(spare_prefix),
        }
        yield Populated(
            backend=request.param,
            data_dir=data_dir,
            client=client,
            app=app,
            keys=keys,
            key_ids=key_ids,
            path_values=values,
            job_id=job["job_id"],
            study_uid=series["study_instance_uid"],
            series_uid=series["series_instance_uid"],
            extra={"results": res},
        )
    monkeypatch.undo()
    reset_caches()
