"""De-identification on ingest, DICOM PS3.15 Annex E Basic Profile (reliability P8).

With ``MEDCAD_DEIDENTIFY_ON_INGEST=true`` no canary survives anywhere medcad stores bytes or
rows, UIDs are replaced consistently across uploads, and the job still runs on real
onnxruntime; images that declare burned-in annotation are refused.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import inspect as sa_inspect
from sqlalchemy import text

from app.deid import BASIC_PROFILE, Action, deidentify, replacement_uid
from app.errors import IngestRejected
from app.studies.validation import IngestLimits, inspect_instance
from tests.conftest import reset_caches
from tests.fixtures import dicom_corpus as corpus
from tests.fixtures.dicom_files import CANARY_BIRTH, CANARY_ID, CANARY_NAME, bright_disc_series
from tests.helpers.dciodvfy import dciodvfy_errors
from tests.security.conftest import stow_body

KEY = b"k" * 32
CANARIES = (CANARY_NAME, CANARY_ID, CANARY_BIRTH, "Zebulon")


def _item(**values: Any) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _everything_identifying() -> Dataset:
    """A CT image with canaries in Annex E attributes, sequences, private tags, overlays."""
    ds = corpus.ct_dataset()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.OtherPatientIDsSequence = Sequence([_item(PatientID=CANARY_ID, IssuerOfPatientID="H")])
        ds.PatientAddress = f"1 {CANARY_NAME} Street"
        ds.PatientTelephoneNumbers = CANARY_ID
        ds.PatientAge = "124Y"
        ds.PatientComments = f"born {CANARY_BIRTH}"
        ds.AccessionNumber = CANARY_ID
        ds.InstitutionName = f"Clinic of {CANARY_NAME}"
        ds.OperatorsName = CANARY_NAME
        ds.PerformingPhysicianName = CANARY_NAME
        ds.RequestingPhysician = CANARY_NAME
        ds.StationName = CANARY_ID
        ds.DeviceSerialNumber = CANARY_ID
        ds.AcquisitionDate = CANARY_BIRTH
        ds.ContentDate = CANARY_BIRTH
        ds.ImageComments = f"{CANARY_NAME} {CANARY_BIRTH}"
        ds.RequestAttributesSequence = Sequence([_item(RequestedProcedureID=CANARY_ID)])
        # a kept sequence: the person name and instance UID inside must be cleaned
        ds.ReferencedImageSequence = Sequence([_item(
            ReferencedSOPClassUID=ds.SOPClassUID,
            ReferencedSOPInstanceUID=corpus.SOP_UID + ".77",
            PersonName=CANARY_NAME,
        )])  # fmt: skip
        ds.add_new(0x00090010, "LO", "ACME 1.0")  # private creator
        ds.add_new(0x00091001, "LO", CANARY_NAME)  # private element
        ds.add_new(0x60004000, "LT", f"overlay note {CANARY_ID}")  # Overlay Comments
        ds.add_new(0x50000022, "LO", CANARY_ID)  # retired curve group
        ds.add_new(0x00081080, "LO", f"{CANARY_NAME} seen")  # Admitting Diagnoses Description
    return ds


def _deid(ds: Dataset) -> bytes:
    return deidentify(corpus.to_part10(ds), key=KEY)


def test_no_canary_survives_the_profile() -> None:
    out = _deid(_everything_identifying())
    for canary in (*CANARIES, "ACME", corpus.STUDY_UID, corpus.SERIES_UID, corpus.SOP_UID):
        assert canary.encode() not in out, canary
    ds = pydicom.dcmread(io.BytesIO(out))
    assert ds.PatientIdentityRemoved == "YES"
    assert ds.DeidentificationMethodCodeSequence[0].CodeValue == "113100"
    assert ds.LongitudinalTemporalInformationModified == "REMOVED"
    assert ds.PatientName == "" and ds.PatientID == "" and ds.StudyDate == ""
    assert "InstitutionName" not in ds and "OtherPatientIDsSequence" not in ds
    assert not any(elem.tag.is_private for elem in ds.iterall())
    item = ds.ReferencedImageSequence[0]
    assert item.PersonName == "" and item.ReferencedSOPClassUID == ds.SOPClassUID
    assert item.ReferencedSOPInstanceUID == replacement_uid(corpus.SOP_UID + ".77", KEY)
    # the image itself is untouched and the object is still acceptable
    original = pydicom.dcmread(io.BytesIO(corpus.to_part10(_everything_identifying())))
    assert ds.PixelData == original.PixelData and ds.Rows == original.Rows
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert out[:128] == bytes(128)
    inspected = inspect_instance(out, limits=IngestLimits())
    assert inspected.sop_instance_uid == replacement_uid(corpus.SOP_UID, KEY)


def test_uids_are_replaced_consistently_and_deterministically() -> None:
    a, b = corpus.ct_dataset(), corpus.ct_dataset()
    b.SOPInstanceUID = corpus.SOP_UID + ".2"
    out_a, out_b = _deid(a), _deid(b)
    da, db = (pydicom.dcmread(io.BytesIO(x)) for x in (out_a, out_b))
    assert da.StudyInstanceUID == db.StudyInstanceUID != corpus.STUDY_UID
    assert da.SeriesInstanceUID == db.SeriesInstanceUID
    assert da.FrameOfReferenceUID == db.FrameOfReferenceUID
    assert da.SOPInstanceUID != db.SOPInstanceUID
    assert da.SOPClassUID == corpus.CTImageStorage  # class UIDs are not identifiers
    assert _deid(corpus.ct_dataset()) == out_a  # same input, same bytes: dedup still works
    other_key = pydicom.dcmread(io.BytesIO(deidentify(corpus.to_part10(a), key=b"x" * 32)))
    assert other_key.StudyInstanceUID != da.StudyInstanceUID
    for uid in (da.StudyInstanceUID, da.SOPInstanceUID):
        assert uid.startswith("2.25.") and len(uid) <= 64 and ".0" not in uid[4:]


def test_burned_in_annotation_is_refused() -> None:
    ds = corpus.ct_dataset()
    ds.BurnedInAnnotation = "YES"
    with pytest.raises(IngestRejected) as caught:
        _deid(ds)
    assert caught.value.code == "burned_in_annotation" and caught.value.status == 422
    ds.BurnedInAnnotation = "NO"
    assert _deid(ds)


def test_profile_table_covers_the_patient_module_and_keeps_class_uids() -> None:
    from pydicom.datadict import tag_for_keyword

    def action(keyword: str) -> Action | None:
        return BASIC_PROFILE.get(int(tag_for_keyword(keyword) or 0))

    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate",
                    "AccessionNumber", "ReferringPhysicianName", "StudyID"):  # fmt: skip
        assert action(keyword) is Action.ZERO, keyword
    for keyword in ("OtherPatientIDsSequence", "PatientAddress", "InstitutionName",
                    "StudyDescription", "SeriesDescription", "ContentSequence"):  # fmt: skip
        assert action(keyword) is Action.REMOVE, keyword
    assert action("SOPClassUID") is Action.KEEP and action("TransferSyntaxUID") is Action.KEEP


def test_the_result_adds_no_iod_errors() -> None:
    ds = _everything_identifying()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = set(dciodvfy_errors(pydicom.dcmread(io.BytesIO(corpus.to_part10(ds)))))
        after = set(dciodvfy_errors(pydicom.dcmread(io.BytesIO(_deid(ds)))))
    assert after <= before, sorted(after - before)


# --------------------------------------------------------------------------------------
# Through the service: nothing identifying stored, the job still runs
# --------------------------------------------------------------------------------------


def _all_rows_text() -> str:
    from app.db.session import session_scope

    with session_scope() as session:
        tables = sa_inspect(session.get_bind()).get_table_names()
        rows = []
        for table in tables:
            rows += session.execute(text(f'SELECT * FROM "{table}"')).all()
    return "\n".join(" ".join(str(v) for v in row) for row in rows)


def _all_blob_bytes(data_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in (data_dir / "blobs").rglob("*") if p.is_file()]


def test_deidentified_ingest_stores_no_canary_and_the_job_runs(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.settings import get_settings
    from workers import runner

    monkeypatch.setenv("MEDCAD_DEIDENTIFY_ON_INGEST", "true")
    reset_caches()
    data_dir = get_settings().data_dir
    blobs, _ = bright_disc_series(n=3, seed=31)
    originals = [pydicom.dcmread(io.BytesIO(b)) for b in blobs]
    # three requests: still one series after UID replacement
    jobs = []
    for i in (0, 1, 2):
        r = api.post(
            "/api/v1/studies", files=[("files", (f"{i}.dcm", blobs[i], "application/dicom"))]
        )
        assert r.status_code == 202, r.text
        jobs += [j["id"] for j in r.json()["jobs"]]
    series = {api.get(f"/api/v1/jobs/{j}").json()["series_instance_uid"] for j in jobs}
    assert len(series) == 1 and next(iter(series)).startswith("2.25.")
    last = api.get("/api/v1/jobs", params={"limit": 1}).json()["items"][0]
    assert last["instance_count"] == 3
    assert runner.run_job(last["id"]) == "succeeded"
    results = api.get(f"/api/v1/jobs/{last['id']}/results").json()
    assert results["masks"] and results["dicom"]["seg"] and results["dicom"]["sr"]
    # nothing identifying in any stored byte (inputs and outputs) nor in any row
    stored = _all_blob_bytes(data_dir)
    assert len(stored) >= 3 + len(results["masks"])
    identifiers = [*CANARIES, originals[0].StudyInstanceUID, originals[0].SeriesInstanceUID,
                   *(o.SOPInstanceUID for o in originals)]  # fmt: skip
    for data in stored:
        for value in identifiers:
            assert value.encode() not in data, value
    rows = _all_rows_text()
    for value in identifiers:
        assert value not in rows, value
    # searching by the original identity finds nothing
    for query in ({"PatientName": "CANARY*"}, {"PatientID": CANARY_ID},
                  {"StudyInstanceUID": originals[0].StudyInstanceUID}):  # fmt: skip
        r = api.get("/dicomweb/studies", params=query)
        assert r.status_code in (200, 204) and (r.status_code == 204 or r.json() == [])
    print(f"P8 {len(stored)} stored blobs, {rows.count(chr(10)) + 1} rows: 0 canaries, "
          f"3 uploads -> 1 series, job succeeded")  # fmt: skip


def test_stow_under_deidentification_keeps_no_original_uid(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDCAD_DEIDENTIFY_ON_INGEST", "true")
    reset_caches()
    blobs, _ = bright_disc_series(n=1, seed=32)
    original = pydicom.dcmread(io.BytesIO(blobs[0]))
    body, content_type = stow_body(blobs)
    r = api.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
    assert r.status_code == 200, r.text
    assert original.StudyInstanceUID not in r.text
    assert original.StudyInstanceUID not in _all_rows_text()


def test_deidentified_ingest_refuses_burned_in_images(
    api: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.settings import get_settings

    monkeypatch.setenv("MEDCAD_DEIDENTIFY_ON_INGEST", "true")
    reset_caches()
    ds = corpus.ct_dataset()
    ds.BurnedInAnnotation = "YES"
    r = api.post(
        "/api/v1/studies", files=[("files", ("b.dcm", corpus.to_part10(ds), "application/dicom"))]
    )
    assert r.status_code == 422 and r.json()["rejected"][0]["error"] == "burned_in_annotation"
    assert not _all_blob_bytes(get_settings().data_dir)
