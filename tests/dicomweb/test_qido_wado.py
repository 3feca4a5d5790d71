"""QIDO-RS and WADO-RS over real stored studies and the real result objects of real jobs.

Two studies are stored by STOW-RS and analysed in-process by the worker runner (tiny ONNX
models, real onnxruntime, real highdicom outputs): study A uncompressed, study B with RLE
compressed and Implicit VR instances, so that WADO-RS has to transcode.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.uid import ImplicitVRLittleEndian, RLELossless
from sqlalchemy import select

from app.db.records import AuditEventRecord, JobRecord
from app.db.session import session_scope
from app.dicomweb.multipart import parse_media_type
from tests.dicomweb.support import datasets, multipart_parts, stow_body, stow_content_type, value
from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.dciodvfy import dciodvfy_errors
from workers import runner

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
PM_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
CT_CLASS = "1.2.840.10008.5.1.4.1.1.2"


@dataclass
class Study:
    uid: str
    series: str
    files: list[bytes]
    disc: np.ndarray


def _reencode(blob: bytes, index: int) -> bytes:
    """Study B: other patient identity; slice 0 Implicit VR, the others RLE Lossless."""
    ds = pydicom.dcmread(io.BytesIO(blob))
    ds.PatientName, ds.PatientID = "Roe^Richard", "PID-B"
    ds.StudyDate, ds.AccessionNumber, ds.StudyDescription = "20250615", "ACC-B", "Chest B"
    if index == 0:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        ds.compress(RLELossless, generate_instance_uid=False)
    out = io.BytesIO()
    pydicom.dcmwrite(out, ds, enforce_file_format=True)
    return out.getvalue()


def _store_and_analyse(api: Any, files: list[bytes]) -> None:
    r = api.post(
        "/dicomweb/studies",
        content=stow_body(files, "q1"),
        headers={"Content-Type": stow_content_type("q1")},
    )
    assert r.status_code == 200, r.text
    series = pydicom.dcmread(io.BytesIO(files[0])).SeriesInstanceUID
    with session_scope() as session:
        from app.db.records import SeriesRecord

        job_ids = list(
            session.scalars(
                select(JobRecord.id)
                .join(SeriesRecord, SeriesRecord.id == JobRecord.series_id)
                .where(SeriesRecord.series_instance_uid == series)
            )
        )
    assert [runner.run_job(j) for j in job_ids] == ["succeeded"]


@pytest.fixture(scope="module")
def studies(module_api: Any) -> dict[str, Study]:
    out = {}
    for name, seed in (("A", 1), ("B", 2)):
        files, disc = bright_disc_series(n=3, radius=10, seed=seed)
        if name == "B":
            files = [_reencode(b, i) for i, b in enumerate(files)]
        _store_and_analyse(module_api, files)
        ds = pydicom.dcmread(io.BytesIO(files[0]))
        out[name] = Study(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), files, disc)
    return out


def _search(api: Any, path: str, **params: Any) -> list[dict]:
    r = api.get(f"/dicomweb{path}", params=params)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/dicom+json")
    return list(r.json())


def _uids(items: list[dict], tag: str = "0020000D") -> list[str]:
    return [value(i, tag) for i in items]


# ---------------------------------------------------------------------------------------
# QIDO-RS
# ---------------------------------------------------------------------------------------


def test_study_search_match_keys(module_api: Any, studies: dict[str, Study]) -> None:
    a, b = studies["A"].uid, studies["B"].uid
    assert set(_uids(_search(module_api, "/studies"))) >= {a, b}
    assert _uids(_search(module_api, "/studies", PatientName="Roe*")) == [b]
    assert _uids(_search(module_api, "/studies", PatientName="roe*")) == []
    assert _uids(_search(module_api, "/studies", PatientName="roe*", fuzzymatching="true")) == [b]
    assert _uids(_search(module_api, "/studies", PatientID="PID-B")) == [b]
    assert _uids(_search(module_api, "/studies", StudyDate="20250101-20251231")) == [b]
    assert a in _uids(_search(module_api, "/studies", StudyDate="20260101-"))
    assert _uids(_search(module_api, "/studies", AccessionNumber="ACC-B")) == [b]
    assert _uids(_search(module_api, "/studies", StudyInstanceUID=f"{a},{b}")) == [a, b]
    assert _uids(_search(module_api, "/studies", **{"0020000D": b})) == [b]
    assert set(_uids(_search(module_api, "/studies", ModalitiesInStudy="SEG"))) == {a, b}
    assert _uids(_search(module_api, "/studies", ModalitiesInStudy="MR")) == []
    assert _search(module_api, "/studies", PatientID="nobody") == []


def test_study_search_return_keys_paging_and_includefield(
    module_api: Any, studies: dict[str, Study]
) -> None:
    a, b = studies["A"].uid, studies["B"].uid
    (item,) = _search(module_api, "/studies", StudyInstanceUID=b)
    assert value(item, "00100010") == {"Alphabetic": "Roe^Richard"}
    assert sorted(item["00080061"]["Value"]) == ["CT", "OT", "SEG", "SR"]
    series = _search(module_api, f"/studies/{b}/series")
    assert value(item, "00201206") == len(series)
    assert value(item, "00201208") == sum(value(s, "00201209") for s in series)
    assert value(item, "00081190") == f"http://testserver/dicomweb/studies/{b}"
    for tag in ("00080020", "00080030", "00080050", "00080090", "00100020", "00100030",
                "00100040", "00200010", "00080056"):  # fmt: skip
        assert tag in item, tag
    assert "00081030" not in item and "00080070" not in item
    (item,) = _search(
        module_api, "/studies", StudyInstanceUID=b, includefield="StudyDescription,00080070"
    )
    assert value(item, "00081030") == "Chest B"  # from the study record
    assert value(item, "00080070") == "medcad-tests"  # Manufacturer, from a stored header
    both = _search(module_api, "/studies", StudyInstanceUID=f"{a},{b}", limit="1")
    second = _search(module_api, "/studies", StudyInstanceUID=f"{a},{b}", limit="1", offset="1")
    assert _uids(both) == [a] and _uids(second) == [b]
    r = module_api.get("/dicomweb/studies", params={"SeriesNumber": "1", "PatientID": "PID-B"})
    assert r.status_code == 200 and "SeriesNumber" in r.headers["warning"]
    assert module_api.get("/dicomweb/studies", params={"StudyDate": "2026"}).status_code == 400
    r = module_api.get("/dicomweb/studies", headers={"Accept": "application/dicom+xml"})
    assert r.status_code == 406


def test_series_search_lists_result_series_with_their_modality(
    module_api: Any, studies: dict[str, Study]
) -> None:
    a = studies["A"]
    series = _search(module_api, f"/studies/{a.uid}/series")
    by_modality: dict[str, list[dict]] = {}
    for item in series:
        by_modality.setdefault(value(item, "00080060"), []).append(item)
    assert set(by_modality) == {"CT", "SEG", "SR", "OT"}
    assert _uids(by_modality["CT"], "0020000E") == [a.series]
    assert value(by_modality["SEG"][0], "00200011") == 901
    assert value(by_modality["SR"][0], "00200011") == 902
    assert "not for clinical use" in value(by_modality["SEG"][0], "0008103E")
    assert value(by_modality["CT"][0], "00201209") == 3
    seg = _search(module_api, f"/studies/{a.uid}/series", Modality="SEG")
    assert _uids(seg, "0020000E") == _uids(by_modality["SEG"], "0020000E")
    assert _search(module_api, f"/studies/{a.uid}/series", SeriesNumber="901") == seg
    # top level: result series of both studies, with their study attributes
    all_sr = _search(module_api, "/series", Modality="SR")
    assert {value(i, "0020000D") for i in all_sr} == {a.uid, studies["B"].uid}
    assert {value(i, "00100020") for i in all_sr} == {"CANARY-ID-7731", "PID-B"}


def test_instance_search(module_api: Any, studies: dict[str, Study]) -> None:
    a = studies["A"]
    (seg_series,) = _search(module_api, f"/studies/{a.uid}/series", Modality="SEG")
    seg_uid = value(seg_series, "0020000E")
    (seg,) = _search(module_api, f"/studies/{a.uid}/series/{seg_uid}/instances")
    assert value(seg, "00080016") == SEG_CLASS
    assert value(seg, "00280100") == 1 and value(seg, "00280010") == 64
    assert value(seg, "00280008") >= 3
    assert value(seg, "00081190").endswith(f"/series/{seg_uid}/instances/{value(seg, '00080018')}")
    ct = _search(module_api, f"/studies/{a.uid}/instances", SOPClassUID=CT_CLASS)
    assert sorted(value(i, "00200013") for i in ct) == [1, 2, 3]
    assert _uids(_search(module_api, "/instances", PatientID="PID-B", InstanceNumber="2")) == [
        studies["B"].uid
    ]
    classes = {value(i, "00080016") for i in _search(module_api, "/instances", PatientID="PID-B")}
    assert classes == {CT_CLASS, SEG_CLASS, SR_CLASS, PM_CLASS}


# ---------------------------------------------------------------------------------------
# WADO-RS
# ---------------------------------------------------------------------------------------


def _retrieve(api: Any, path: str, accept: str | None = None) -> Any:
    headers = {"Accept": accept} if accept else {}
    return api.get(f"/dicomweb{path}", headers=headers)


def test_retrieve_study_sends_sources_and_results(
    module_api: Any, studies: dict[str, Study]
) -> None:
    a = studies["A"]
    r = _retrieve(module_api, f"/studies/{a.uid}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
    parts = multipart_parts(r.headers["content-type"], r.content)
    assert all(ct.startswith("application/dicom; transfer-syntax=") for ct, _ in parts)
    objects = [pydicom.dcmread(io.BytesIO(data)) for _, data in parts]
    (study,) = _search(module_api, "/studies", StudyInstanceUID=a.uid)
    assert len(objects) == value(study, "00201208")
    by_class = {str(o.SOPClassUID) for o in objects}
    assert by_class == {CT_CLASS, SEG_CLASS, SR_CLASS, PM_CLASS}
    seg = next(o for o in objects if o.SOPClassUID == SEG_CLASS)
    assert seg.StudyInstanceUID == a.uid and dciodvfy_errors(seg) == []
    # the SEG frames cover the bright disc of the source
    assert seg.pixel_array.max() == 1


def test_retrieve_transcodes_to_explicit_little_endian(
    module_api: Any, studies: dict[str, Study]
) -> None:
    b = studies["B"]
    originals = {pydicom.dcmread(io.BytesIO(f)).SOPInstanceUID: f for f in b.files}
    r = _retrieve(module_api, f"/studies/{b.uid}/series/{b.series}")
    received = datasets(r.headers["content-type"], r.content)
    assert len(received) == 3
    for ds in received:
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        original = pydicom.dcmread(io.BytesIO(originals[ds.SOPInstanceUID]))
        assert np.array_equal(ds.pixel_array, original.pixel_array)
    as_stored = _retrieve(
        module_api,
        f"/studies/{b.uid}/series/{b.series}",
        'multipart/related; type="application/dicom"; transfer-syntax=*',
    )
    syntaxes = sorted(
        str(d.file_meta.TransferSyntaxUID)
        for d in datasets(as_stored.headers["content-type"], as_stored.content)
    )
    assert syntaxes == ["1.2.840.10008.1.2", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.5"]
    jpeg = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    assert _retrieve(module_api, f"/studies/{b.uid}", jpeg).status_code == 406
    assert _retrieve(module_api, f"/studies/{b.uid}", "application/dicom").status_code == 406
    first = pydicom.dcmread(io.BytesIO(b.files[0]))
    path = f"/studies/{b.uid}/series/{b.series}/instances/{first.SOPInstanceUID}"
    (one,) = datasets(*_ct_and_body(_retrieve(module_api, path)))
    assert one.SOPInstanceUID == first.SOPInstanceUID
    assert _retrieve(module_api, "/studies/1.2.3.999").status_code == 404
    assert (
        _retrieve(module_api, f"/studies/{b.uid}/series/{b.series}/instances/1.2.3").status_code
        == 404
    )


def _ct_and_body(r: Any) -> tuple[str, bytes]:
    assert r.status_code == 200, r.text
    return r.headers["content-type"], r.content


def test_metadata_with_bulk_data_uris(module_api: Any, studies: dict[str, Study]) -> None:
    b = studies["B"]
    r = _retrieve(module_api, f"/studies/{b.uid}/series/{b.series}/metadata")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom+json")
    items = r.json()
    assert len(items) == 3
    rle = next(i for i in items if value(i, "00200013") == 2)
    assert "InlineBinary" not in rle["7FE00010"] and "Value" not in rle["7FE00010"]
    bulk = module_api.get(rle["7FE00010"]["BulkDataURI"])
    assert bulk.status_code == 200
    ((part_type, pixels),) = multipart_parts(bulk.headers["content-type"], bulk.content)
    assert part_type.startswith("application/octet-stream")
    original = pydicom.dcmread(io.BytesIO(b.files[1]))
    assert np.array_equal(np.frombuffer(pixels, "<i2").reshape(64, 64), original.pixel_array)
    reread = pydicom.Dataset.from_json(rle, bulk_data_uri_handler=lambda *_: b"")
    assert reread.PatientID == "PID-B" and reread.Rows == 64
    a = studies["A"]
    study_meta = _retrieve(module_api, f"/studies/{a.uid}/metadata").json()
    seg = next(i for i in study_meta if value(i, "00080016") == SEG_CLASS)
    assert "Value" in seg["00620002"]  # SegmentSequence stays inline


def _instance_path(api: Any, study: Study, modality: str) -> str:
    (series,) = _search(api, f"/studies/{study.uid}/series", Modality=modality)[:1]
    (instance,) = _search(
        api, f"/studies/{study.uid}/series/{value(series, '0020000E')}/instances"
    )[:1]
    return str(value(instance, "00081190")).replace("http://testserver", "")


def test_rendered_images(module_api: Any, studies: dict[str, Study]) -> None:
    a = studies["A"]
    ct = _instance_path(module_api, a, "CT")
    jpeg = module_api.get(f"{ct}/rendered")
    assert jpeg.status_code == 200 and jpeg.headers["content-type"] == "image/jpeg"
    assert jpeg.content[:2] == b"\xff\xd8"
    png = module_api.get(f"{ct}/rendered", headers={"Accept": "image/png"})
    grey = np.asarray(Image.open(io.BytesIO(png.content)))
    assert grey.shape == (64, 64) and grey[a.disc].mean() > grey[~a.disc].mean() + 100
    narrow = module_api.get(
        f"{ct}/rendered", params={"window": "800,10"}, headers={"Accept": "image/png"}
    )
    narrow_grey = np.asarray(Image.open(io.BytesIO(narrow.content)))
    assert (narrow_grey[~a.disc] == 0).mean() > 0.99 and not np.array_equal(narrow_grey, grey)
    seg = _instance_path(module_api, a, "SEG")
    mask = np.asarray(
        Image.open(
            io.BytesIO(
                module_api.get(f"{seg}/frames/1/rendered", headers={"Accept": "image/png"}).content
            )
        )
    )
    assert set(np.unique(mask)) <= {0, 255} and mask.max() == 255
    pm = _instance_path(module_api, a, "OT")
    assert module_api.get(f"{pm}/rendered", headers={"Accept": "image/png"}).status_code == 200
    sr = _instance_path(module_api, a, "SR")
    assert module_api.get(f"{sr}/rendered").status_code == 406
    assert module_api.get(f"{ct}/rendered", headers={"Accept": "image/gif"}).status_code == 406
    assert module_api.get(f"{ct}/frames/2/rendered").status_code == 404
    assert module_api.get(f"{ct}/rendered", params={"window": "1,0"}).status_code == 400


def test_frames(module_api: Any, studies: dict[str, Study]) -> None:
    a = studies["A"]
    ct = _instance_path(module_api, a, "CT")
    r = module_api.get(f"{ct}/frames/1")
    ((part_type, raw),) = multipart_parts(r.headers["content-type"], r.content)
    assert parse_media_type(part_type) == (
        "application/octet-stream",
        {"transfer-syntax": "1.2.840.10008.1.2.1"},
    )
    sop = ct.rsplit("/", 1)[1]
    source = next(
        ds for ds in (pydicom.dcmread(io.BytesIO(f)) for f in a.files) if ds.SOPInstanceUID == sop
    )
    assert raw == source.PixelData
    seg = _instance_path(module_api, a, "SEG")
    seg_ds = datasets(*_ct_and_body(module_api.get(seg)))[0]
    r = module_api.get(f"{seg}/frames/1,2")
    frames = [data for _, data in multipart_parts(r.headers["content-type"], r.content)]
    for number, data in enumerate(frames):
        bits = np.unpackbits(np.frombuffer(data, np.uint8), bitorder="little")[: 64 * 64]
        assert np.array_equal(bits.reshape(64, 64), seg_ds.pixel_array[number])
    assert module_api.get(f"{seg}/frames/99").status_code == 404
    assert module_api.get(f"{seg}/frames/0").status_code == 400


def test_every_access_is_audited(module_api: Any, studies: dict[str, Study]) -> None:
    b = studies["B"]
    with session_scope() as session:
        before = session.scalar(select(AuditEventRecord.id).order_by(AuditEventRecord.id.desc()))
    _search(module_api, "/studies", PatientID="PID-B")
    _retrieve(module_api, f"/studies/{b.uid}")
    _retrieve(module_api, f"/studies/{b.uid}/metadata")
    with session_scope() as session:
        events = session.scalars(
            select(AuditEventRecord)
            .where(AuditEventRecord.id > (before or 0))
            .order_by(AuditEventRecord.id)
        ).all()
    assert [(e.action, e.resource) for e in events] == [
        ("search", "/dicomweb/studies"),
        ("download", f"/dicomweb/studies/{b.uid}"),
        ("view", f"/dicomweb/studies/{b.uid}/metadata"),
    ]
    assert events[0].detail == "QIDO-RS 1 results; keys PatientID"  # keys, never values
    assert events[1].study_instance_uid == b.uid and events[0].actor_name
