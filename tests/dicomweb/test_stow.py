"""STOW-RS ``POST /dicomweb/studies[/{study}]`` over the real ingest path, SQLite and PostgreSQL.

Each response is the Store Instances Response Module (PS3.18 Annex I) in DICOM JSON; the status
codes follow PS3.18 Table 10.5.3-1.
"""

from __future__ import annotations

import io
from typing import Any

import pydicom
import pytest
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from app.db.records import AuditEventRecord, InstanceRecord, JobRecord
from app.db.session import session_scope
from tests.dicomweb.support import chunks, stow_body, stow_content_type, value
from tests.fixtures.dicom_files import bright_disc_series, ct_slice

REFERENCED, FAILED, RETRIEVE_URL = "00081199", "00081198", "00081190"
FAILURE_REASON, SOP_INSTANCE = "00081197", "00081155"


def _post(
    api: Any,
    blobs: list[bytes],
    *,
    path: str = "/dicomweb/studies",
    quoted: bool = True,
    chunked: bool = False,
    part_type: str = "application/dicom",
) -> Any:
    body = stow_body(blobs, "medcad-test-0f1e", part_type=part_type)
    return api.post(
        path,
        content=chunks(body, 4096) if chunked else body,
        headers={
            "Content-Type": stow_content_type("medcad-test-0f1e", quoted=quoted),
            "Accept": "application/dicom+json",
        },
    )


def _stored(blobs: list[bytes]) -> int:
    """How many of these instances are in the database."""
    uids = [_uids(b)[2] for b in blobs]
    with session_scope() as session:
        return int(
            session.scalar(
                select(func.count())
                .select_from(InstanceRecord)
                .where(InstanceRecord.sop_instance_uid.in_(uids))
            )
            or 0
        )


def _jobs(api: Any, blobs: list[bytes]) -> list[dict]:
    series = _uids(blobs[0])[1]
    return api.get("/api/v1/jobs", params={"series_instance_uid": series}).json()["items"]


def _uids(blob: bytes) -> tuple[str, str, str]:
    ds = pydicom.dcmread(io.BytesIO(blob))
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _items(body: dict, tag: str) -> list[dict]:
    return list(body.get(tag, {}).get("Value", []))


@pytest.mark.parametrize(("quoted", "chunked"), [(True, False), (False, True)])
def test_store_series_returns_referenced_instances(
    module_api: Any, quoted: bool, chunked: bool
) -> None:
    api = module_api
    blobs, _ = bright_disc_series(n=3)
    study, series, _ = _uids(blobs[0])
    r = _post(api, blobs, quoted=quoted, chunked=chunked)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    body = r.json()
    assert value(body, RETRIEVE_URL) == f"http://testserver/dicomweb/studies/{study}"
    assert FAILED not in body
    referenced = _items(body, REFERENCED)
    assert sorted(value(i, SOP_INSTANCE) for i in referenced) == sorted(_uids(b)[2] for b in blobs)
    for item in referenced:
        assert value(item, "00081150") == "1.2.840.10008.5.1.4.1.1.2"
        assert value(item, RETRIEVE_URL).endswith(
            f"/studies/{study}/series/{series}/instances/{value(item, SOP_INSTANCE)}"
        )
    jobs = _jobs(api, blobs)
    assert len(jobs) == 1 and jobs[0]["instance_count"] == 3
    with session_scope() as session:
        audit = session.scalars(
            select(AuditEventRecord).where(
                AuditEventRecord.detail == "STOW-RS",
                AuditEventRecord.series_instance_uid == series,
            )
        ).all()
    assert [(a.action, a.resource, a.series_instance_uid) for a in audit] == [
        ("upload", f"job/{jobs[0]['id']}", series)
    ]


@pytest.mark.usefixtures("medcad_env")
def test_identical_restore_is_referenced_again_without_new_job(api: Any) -> None:
    # on SQLite and PostgreSQL
    blobs, _ = bright_disc_series(n=2)
    assert _post(api, blobs).status_code == 200
    r = _post(api, blobs)
    assert r.status_code == 200 and len(_items(r.json(), REFERENCED)) == 2
    assert len(_jobs(api, blobs)) == 1 and _stored(blobs) == 2
    with session_scope() as session:
        assert session.scalar(select(func.count()).select_from(JobRecord)) == 1


def test_study_uid_mismatch_is_409_with_processing_failure(module_api: Any) -> None:
    api = module_api
    blobs, _ = bright_disc_series(n=2)
    r = _post(api, blobs, path="/dicomweb/studies/1.2.3.4.5")
    assert r.status_code == 409, r.text
    failed = _items(r.json(), FAILED)
    assert [value(f, FAILURE_REASON) for f in failed] == [0x0110, 0x0110]
    assert {value(f, SOP_INSTANCE) for f in failed} == {_uids(b)[2] for b in blobs}
    assert REFERENCED not in r.json() and _stored(blobs) == 0
    # the same instances posted to their own study are stored
    study = _uids(blobs[0])[0]
    r = _post(api, blobs, path=f"/dicomweb/studies/{study}")
    assert r.status_code == 200 and value(r.json(), RETRIEVE_URL).endswith(f"/studies/{study}")


def test_mixed_parts_are_202_with_failure_reasons(module_api: Any) -> None:
    api = module_api
    blobs, _ = bright_disc_series(n=1)
    report = open(get_testdata_file("reportsi.dcm"), "rb").read()
    r = _post(api, [blobs[0], b"this is not DICOM", report])
    assert r.status_code == 202, r.text
    body = r.json()
    assert [value(i, SOP_INSTANCE) for i in _items(body, REFERENCED)] == [_uids(blobs[0])[2]]
    reasons = {value(f, FAILURE_REASON): f for f in _items(body, FAILED)}
    assert set(reasons) == {0xC000, 0x0122}
    sr = pydicom.dcmread(io.BytesIO(report))
    assert value(reasons[0x0122], SOP_INSTANCE) == sr.SOPInstanceUID
    assert value(reasons[0x0122], "00081150") == sr.SOPClassUID
    assert _stored(blobs) == 1 and len(_jobs(api, blobs)) == 1


def test_nothing_understandable_is_400(module_api: Any) -> None:
    api = module_api
    r = _post(api, [b"garbage one", b"\x00" * 300])
    assert r.status_code == 400
    assert [value(f, FAILURE_REASON) for f in _items(r.json(), FAILED)] == [0xC000, 0xC000]


def test_same_uid_other_bytes_is_409_conflict(module_api: Any) -> None:
    api = module_api
    import numpy as np

    blobs, _ = bright_disc_series(n=1)
    assert _post(api, blobs).status_code == 200
    study, series, sop = _uids(blobs[0])
    other = ct_slice(np.zeros((64, 64)), study_uid=study, series_uid=series, index=0, sop_uid=sop)
    r = _post(api, [other])
    assert r.status_code == 409
    assert [value(f, FAILURE_REASON) for f in _items(r.json(), FAILED)] == [0x0111]


def test_zip_and_non_dicom_parts_fail_per_part(module_api: Any) -> None:
    api = module_api
    import zipfile

    blobs, _ = bright_disc_series(n=1)
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.dcm", blobs[0])
    r = _post(api, [archive.getvalue()])
    assert r.status_code == 400 and _stored(blobs) == 0
    r = _post(api, blobs, part_type="application/octet-stream")
    assert r.status_code == 400 and _stored(blobs) == 0


def test_other_media_types_are_415(module_api: Any) -> None:
    api = module_api
    for content_type in (
        "application/json",
        "application/dicom",
        'multipart/related; type="application/dicom+json"; boundary=x',
        "multipart/form-data; boundary=x",
    ):
        r = api.post("/dicomweb/studies", content=b"--x--", headers={"Content-Type": content_type})
        assert r.status_code == 415 and r.json()["error"] == "unsupported_media_type", content_type


def test_malformed_bodies_are_400(module_api: Any) -> None:
    api = module_api
    headers = {"Content-Type": stow_content_type("b")}
    r = api.post("/dicomweb/studies", content=b"--b\r\n\r\nno end", headers=headers)
    assert r.status_code == 400 and r.json()["error"] == "malformed_multipart"
    r = api.post("/dicomweb/studies", content=b"--b--\r\n", headers=headers)
    assert r.status_code == 400 and r.json()["error"] == "no_parts"
    r = api.post(
        "/dicomweb/studies",
        content=b"",
        headers={"Content-Type": "multipart/related; type=application/dicom"},
    )
    assert r.status_code == 400 and r.json()["error"] == "malformed_multipart"


def test_roles_are_checked(module_api: Any) -> None:
    api = module_api
    from app.auth.service import create_key
    from app.db.records import Role

    with session_scope() as session:
        _, viewer = create_key(session=session, name="v", role=Role.VIEWER)
    blobs, _ = bright_disc_series(n=1)
    body = stow_body(blobs, "b")
    headers = {"Content-Type": stow_content_type("b")}
    r = api.post("/dicomweb/studies", content=body, headers={**headers, "Authorization": ""})
    assert r.status_code == 401
    r = api.post(
        "/dicomweb/studies", content=body, headers={**headers, "Authorization": f"Bearer {viewer}"}
    )
    assert r.status_code == 403 and _stored(blobs) == 0
    assert (
        api.get("/dicomweb/studies", headers={"Authorization": f"Bearer {viewer}"}).status_code
        == 200
    )


def test_body_over_the_upload_cap_is_413(module_api: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    api = module_api
    from app.settings import get_settings

    monkeypatch.setenv("MEDCAD_MAX_UPLOAD_BYTES", "20000")
    get_settings.cache_clear()
    try:
        blobs, _ = bright_disc_series(n=3)  # ~3 x 8.5 kB
        r = _post(api, blobs)  # declared Content-Length
        assert r.status_code == 413
        r = _post(api, blobs, chunked=True)  # counted while streaming
        assert r.status_code == 413 and _stored(blobs) == 0
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()


@pytest.mark.usefixtures("medcad_env")
def test_search_and_retrieve_sql_on_both_databases(api: Any) -> None:
    """QIDO-RS conditions (wildcards, case, ranges, modalities) run as SQL on each database."""
    from workers import runner

    blobs, _ = bright_disc_series(n=2)
    study, series, _ = _uids(blobs[0])
    assert _post(api, blobs).status_code == 200
    (job,) = _jobs(api, blobs)
    assert runner.run_job(job["id"]) == "succeeded"

    def studies(**params: str) -> list[str]:
        r = api.get("/dicomweb/studies", params=params)
        assert r.status_code == 200, r.text
        return [value(i, "0020000D") for i in r.json()]

    assert studies(PatientName="CANARY*") == [study]
    assert studies(PatientName="canary*") == []  # case-sensitive unless fuzzy
    assert studies(PatientName="canary^phi^z?bulon", fuzzymatching="true") == [study]
    assert studies(PatientName="CANARY^PHI_*") == []  # '_' is not a wildcard
    assert studies(StudyDate="20251231-20260101", StudyTime="1100-1300") == [study]
    assert studies(ModalitiesInStudy="SEG") == [study] and studies(ModalitiesInStudy="MR") == []
    series_list = api.get(f"/dicomweb/studies/{study}/series", params={"Modality": "CT,SR"}).json()
    assert sorted(value(s, "00080060") for s in series_list) == ["CT", "SR"]
    instances = api.get("/dicomweb/instances", params={"SeriesInstanceUID": series}).json()
    assert len(instances) == 2
    r = api.get(f"/dicomweb/studies/{study}/metadata")
    assert r.status_code == 200 and len(r.json()) == value(studies_body(api, study), "00201208")


def studies_body(api: Any, study: str) -> dict:
    (item,) = api.get("/dicomweb/studies", params={"StudyInstanceUID": study}).json()
    return dict(item)
