"""POST /api/v1/studies: durable ingest, duplicates, conflicts, rejections, auth — on SQLite and PostgreSQL."""

from __future__ import annotations

import io
import zipfile
from typing import Any

import pytest
from sqlalchemy import func, select

from app.db.records import AuditEventRecord, InstanceRecord, JobRecord
from app.db.session import session_scope
from tests.fixtures.dicom_files import bright_disc_series, ct_slice
from tests.helpers.services import ADMIN_KEY

pytestmark = pytest.mark.usefixtures("medcad_env")


def _files(blobs: list[bytes], prefix: str = "s") -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{prefix}{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]


def _count(model: Any) -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def test_upload_series_creates_one_job(api: Any) -> None:
    blobs, _ = bright_disc_series(n=3)
    r = api.post("/api/v1/studies", files=_files(blobs))
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["stored"] == 3 and body["duplicates"] == 0 and body["rejected"] == []
    assert len(body["jobs"]) == 1 and body["jobs"][0]["status"] == "queued"
    assert r.headers["location"] == f"/api/v1/jobs/{body['jobs'][0]['id']}"
    job = api.get(f"/api/v1/jobs/{body['jobs'][0]['id']}").json()
    assert job["status"] == "queued" and job["queue_position"] == 1
    assert sorted(job["models"]) == ["tinycls:1.0.0", "tinyseg:1.0.0"]
    assert job["instance_count"] == 3


def test_identical_reupload_is_duplicate_and_creates_no_job(api: Any) -> None:
    blobs, _ = bright_disc_series(n=2)
    assert api.post("/api/v1/studies", files=_files(blobs)).status_code == 202
    r = api.post("/api/v1/studies", files=_files(blobs))
    assert r.status_code == 202
    assert r.json()["duplicates"] == 2 and r.json()["stored"] == 0 and r.json()["jobs"] == []
    assert _count(InstanceRecord) == 2 and _count(JobRecord) == 1


def test_same_uid_different_bytes_is_409(api: Any) -> None:
    import numpy as np

    blobs, _ = bright_disc_series(n=1)
    assert api.post("/api/v1/studies", files=_files(blobs)).status_code == 202
    import pydicom

    ds = pydicom.dcmread(io.BytesIO(blobs[0]))
    other = ct_slice(
        np.zeros((64, 64)),
        study_uid=ds.StudyInstanceUID,
        series_uid=ds.SeriesInstanceUID,
        index=0,
        sop_uid=ds.SOPInstanceUID,
    )
    r = api.post("/api/v1/studies", files=_files([other]))
    assert r.status_code == 409
    assert r.json()["rejected"][0]["error"] == "conflict"
    assert ds.SOPInstanceUID in r.json()["rejected"][0]["detail"]


def test_partial_rejection_names_the_file(api: Any) -> None:
    blobs, _ = bright_disc_series(n=1)
    files = [*_files(blobs), ("files", ("notes.txt", b"hello, not dicom", "text/plain"))]
    r = api.post("/api/v1/studies", files=files)
    assert r.status_code == 202
    rejected = r.json()["rejected"]
    assert len(rejected) == 1 and rejected[0]["filename"] == "notes.txt"
    assert rejected[0]["error"] == "not_dicom"


def test_all_rejected_is_4xx_with_same_body_and_nothing_stored(api: Any) -> None:
    r = api.post("/api/v1/studies", files=[("files", ("a.txt", b"junk" * 50, "text/plain"))])
    assert r.status_code == 400  # the status of the (single) rejection: not_dicom
    assert r.json()["stored"] == 0 and r.json()["rejected"][0]["filename"] == "a.txt"
    assert _count(InstanceRecord) == 0 and _count(JobRecord) == 0


def test_zip_upload(api: Any) -> None:
    blobs, _ = bright_disc_series(n=3)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i, b in enumerate(blobs):
            archive.writestr(f"study/slice{i}.dcm", b)
    r = api.post(
        "/api/v1/studies", files=[("files", ("study.zip", buffer.getvalue(), "application/zip"))]
    )
    assert r.status_code == 202, r.text
    assert r.json()["stored"] == 3 and len(r.json()["jobs"]) == 1


def test_unknown_model_is_422(api: Any) -> None:
    blobs, _ = bright_disc_series(n=1)
    r = api.post("/api/v1/studies", files=_files(blobs), data={"models": "nosuchmodel"})
    assert r.status_code == 422 and r.json()["error"] == "unknown_model"
    assert "nosuchmodel" in r.json()["detail"]
    assert _count(InstanceRecord) == 0


def test_selected_models_only(api: Any) -> None:
    blobs, _ = bright_disc_series(n=1)
    r = api.post("/api/v1/studies", files=_files(blobs), data={"models": "tinyseg"})
    job = api.get(f"/api/v1/jobs/{r.json()['jobs'][0]['id']}").json()
    assert job["models"] == ["tinyseg:1.0.0"]


def test_upload_without_key_is_401_before_body_is_read(api: Any) -> None:
    blobs, _ = bright_disc_series(n=1)
    r = api.post("/api/v1/studies", files=_files(blobs), headers={"Authorization": ""})
    assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    assert _count(InstanceRecord) == 0


def test_viewer_cannot_upload(api: Any) -> None:
    from app.auth.service import create_key
    from app.db.records import Role

    with session_scope() as session:
        _, token = create_key(session=session, name="v", role=Role.VIEWER)
    blobs, _ = bright_disc_series(n=1)
    r = api.post(
        "/api/v1/studies", files=_files(blobs), headers={"Authorization": f"Bearer {token}"}
    )
    assert r.status_code == 403 and r.json()["error"] == "forbidden"


def test_oversized_body_is_413(api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.conftest import reset_caches

    monkeypatch.setenv("MEDCAD_MAX_UPLOAD_BYTES", "1000")
    reset_caches()
    blobs, _ = bright_disc_series(n=1)
    r = api.post("/api/v1/studies", files=_files(blobs))
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_not_multipart_is_415(api: Any) -> None:
    r = api.post("/api/v1/studies", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415


def test_upload_writes_audit_event(api: Any) -> None:
    blobs, _ = bright_disc_series(n=1)
    r = api.post("/api/v1/studies", files=_files(blobs))
    job_id = r.json()["jobs"][0]["id"]
    with session_scope() as session:
        events = list(
            session.scalars(
                select(AuditEventRecord).where(AuditEventRecord.resource == f"job/{job_id}")
            )
        )
    assert [e.action for e in events] == ["upload"]
    assert events[0].actor_name and events[0].outcome == "success"


def test_stored_blob_has_zeroed_preamble_and_same_sha(api: Any) -> None:
    import hashlib

    from app.settings import get_settings
    from app.storage import BlobStore

    blobs, _ = bright_disc_series(n=1)
    polyglot = b"MZ\x90\x00" + b"\xff" * 124 + blobs[0][128:]
    r = api.post("/api/v1/studies", files=_files([polyglot]))
    assert r.status_code == 202
    with session_scope() as session:
        inst = session.scalars(select(InstanceRecord)).one()
    data = BlobStore(get_settings().blob_dir).get(inst.blob_sha256)
    assert data[:128] == b"\0" * 128 and data[128:] == polyglot[128:]
    assert hashlib.sha256(data).hexdigest() == inst.blob_sha256


def test_health_and_models(api: Any) -> None:
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/readyz").status_code == 200
    names = {m["name"] for m in api.get("/api/v1/models").json()["items"]}
    assert names == {"tinyseg", "tinycls"}
    assert api.get("/api/v1/me").json()["role"] == "admin"
    assert api.get("/api/v1/models", headers={"Authorization": "Bearer mc_x_y"}).status_code == 401
    assert ADMIN_KEY


def test_the_embedded_broker_writes_only_inside_the_data_folder(
    api: Any, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.settings import get_settings

    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    blobs, _ = bright_disc_series(n=1)
    assert api.post("/api/v1/studies", files=_files(blobs)).status_code == 202
    assert list(cwd.iterdir()) == []  # kombu's default would leave control/ here
    broker = get_settings().broker_dir
    assert (broker / "control").is_dir() and list((broker / "out").iterdir())
