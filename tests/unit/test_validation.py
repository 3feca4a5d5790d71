"""Ingest validation on real files: every pydicom / pydicom-data test file, and a generated
corpus of hostile uploads, each accepted or rejected with its specific code."""

from __future__ import annotations

import io
import logging
import os
import time
import tracemalloc
import warnings
from dataclasses import FrozenInstanceError
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file, get_testdata_files

from app.errors import IngestRejected
from app.studies.validation import (
    REJECTION_CODES,
    REJECTION_STATUS,
    IngestLimits,
    InspectedInstance,
    inspect_instance,
    iter_zip_members,
    supported_transfer_syntaxes,
)
from tests.fixtures import dicom_corpus as corpus
from tests.fixtures.dicom_files import CANARY_BIRTH, CANARY_ID, CANARY_NAME

LIMITS = IngestLimits()


def _shipped_files() -> list[Path]:
    """Every file pydicom and pydicom-data ship as test data (DICOM or not)."""
    paths = {Path(p) for p in get_testdata_files() + get_charset_files()}
    return sorted(p for p in paths if p.is_file())


SHIPPED = _shipped_files()


def _id(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _outcome(data: bytes) -> InspectedInstance | IngestRejected:
    try:
        return inspect_instance(data, limits=LIMITS)
    except IngestRejected as exc:
        return exc


def test_the_shipped_corpus_is_large_and_includes_pydicom_data() -> None:
    # pydicom-data contributes the big compressed files; without it this sweep is thin
    assert len(SHIPPED) > 200
    assert any("data_store" in str(p) for p in SHIPPED)


@pytest.mark.parametrize("path", SHIPPED, ids=_id)
def test_every_shipped_file_is_accepted_or_rejected_with_a_specific_code(path: Path) -> None:
    data = path.read_bytes()
    outcome = _outcome(data)  # any other exception fails the test
    if isinstance(outcome, IngestRejected):
        assert outcome.code in REJECTION_CODES
        assert outcome.status == REJECTION_STATUS[outcome.code]
        assert 400 <= outcome.status < 500
        assert outcome.detail
        return
    stored = pydicom.dcmread(io.BytesIO(outcome.normalized_bytes))
    assert stored.preamble == bytes(128)
    assert stored.SOPInstanceUID == outcome.sop_instance_uid
    assert stored.file_meta.TransferSyntaxUID == outcome.transfer_syntax_uid
    assert (stored.Rows, stored.Columns) == (outcome.rows, outcome.columns)
    assert int(stored.get("NumberOfFrames", 1) or 1) == outcome.frames
    if outcome.container == "part10":
        # only the preamble may differ from what was uploaded
        assert outcome.normalized_bytes[128:] == data[128:]


def test_the_shipped_corpus_exercises_every_decodable_transfer_syntax() -> None:
    accepted = set()
    for path in SHIPPED:
        outcome = _outcome(path.read_bytes())
        if isinstance(outcome, InspectedInstance):
            accepted.add(outcome.transfer_syntax_uid)
    expected = {
        "1.2.840.10008.1.2",  # implicit VR little endian
        "1.2.840.10008.1.2.1",  # explicit VR little endian
        "1.2.840.10008.1.2.2",  # explicit VR big endian
        "1.2.840.10008.1.2.1.99",  # deflated
        "1.2.840.10008.1.2.5",  # RLE
        "1.2.840.10008.1.2.4.50",  # JPEG baseline
        "1.2.840.10008.1.2.4.51",  # JPEG extended
        "1.2.840.10008.1.2.4.70",  # JPEG lossless SV1
        "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
        "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
        "1.2.840.10008.1.2.4.91",  # JPEG 2000
    }
    assert expected <= accepted
    assert accepted <= supported_transfer_syntaxes()


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("MR_truncated.dcm", "truncated"),
        ("rtplan_truncated.dcm", "truncated"),
        ("emri_small_jpeg_2k_lossless_too_short.dcm", "truncated"),
        ("liver.dcm", "non_image_sop_class"),  # SEG
        ("test-SR.dcm", "non_image_sop_class"),
        ("rtstruct.dcm", "non_image_sop_class"),
        ("rtdose.dcm", "non_image_sop_class"),
        ("waveform_ecg.dcm", "non_image_sop_class"),
        ("meta_missing_tsyntax.dcm", "invalid_file_meta"),
        ("MR_small_padded.dcm", "pixel_length_mismatch"),
        ("bad_sequence.dcm", "invalid_uid"),
        ("JPEG2000-embedded-sequence-delimiter.dcm", "codec_header_mismatch"),
    ],
)
def test_known_broken_or_non_image_files_get_their_code(name: str, code: str) -> None:
    outcome = _outcome(Path(get_testdata_file(name)).read_bytes())
    assert isinstance(outcome, IngestRejected)
    assert outcome.code == code


def test_dicomdir_is_refused_as_non_image() -> None:
    path = Path(get_testdata_file("DICOMDIR"))
    outcome = _outcome(path.read_bytes())
    assert isinstance(outcome, IngestRejected) and outcome.code == "non_image_sop_class"


# --------------------------------------------------------------------------------------
# The hostile corpus
# --------------------------------------------------------------------------------------

_BOUNDED_MEMORY = {"deflate_bomb", "deflate_bomb_absolute_cap", "zip_ratio_bomb", "zip_overlap",
                   "rle_codec_bomb", "rle_100000_frames_within_limits", "over_budget",
                   "absurd_frames", "huge_declared_length", "zip_size_lie"}  # fmt: skip


def _run(case: corpus.HostileCase, data: bytes) -> None:
    if case.zip:
        for _ in iter_zip_members(data, limits=case.limits):
            pass
    else:
        inspect_instance(data, limits=case.limits)


@pytest.mark.parametrize("case", corpus.HOSTILE_CASES, ids=lambda c: c.name)
def test_hostile_input_is_rejected_with_its_code_quickly(case: corpus.HostileCase) -> None:
    data = case.build()
    started = time.perf_counter()
    with pytest.raises(IngestRejected) as caught:
        _run(case, data)
    elapsed = time.perf_counter() - started
    assert caught.value.code == case.code, caught.value.detail
    assert caught.value.status == REJECTION_STATUS[case.code]
    assert elapsed < 3.0, f"{case.name} took {elapsed:.2f} s"
    for canary in (CANARY_NAME, CANARY_ID, CANARY_BIRTH):
        assert canary not in caught.value.detail


@pytest.mark.parametrize(
    "case", [c for c in corpus.HOSTILE_CASES if c.name in _BOUNDED_MEMORY], ids=lambda c: c.name
)
def test_bombs_are_rejected_with_bounded_memory(case: corpus.HostileCase) -> None:
    data = case.build()
    tracemalloc.start()
    try:
        with pytest.raises(IngestRejected):
            _run(case, data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the deflate bomb hides 64 MiB of zeros; inflation must stop at the ratio cap
    assert peak < 32 * 1024 * 1024 + 4 * len(data), f"peak {peak} bytes"


def test_validation_never_logs_or_warns_phi(caplog: pytest.LogCaptureFixture) -> None:
    inputs = [case.build() for case in corpus.HOSTILE_CASES if not case.zip]
    inputs += [build() for build in corpus.ACCEPTED_ODDITIES.values()]
    inputs.append(corpus.hostile_uid("StudyInstanceUID", CANARY_NAME))
    caplog.set_level(logging.DEBUG)
    assert not [r for r in caplog.records if CANARY_NAME in r.getMessage()]  # builders are quiet
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for data in inputs:
            try:
                inspect_instance(data, limits=LIMITS)
            except IngestRejected as exc:
                assert CANARY_NAME not in exc.detail and CANARY_ID not in exc.detail
    text = "\n".join([r.getMessage() for r in caplog.records] + [str(w.message) for w in caught])
    for canary in (CANARY_NAME, CANARY_ID, CANARY_BIRTH):
        assert canary not in text


def test_hostile_uid_values_never_reach_the_result() -> None:
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        with pytest.raises(IngestRejected) as caught:
            inspect_instance(corpus.hostile_uid(keyword, "../../etc/passwd"), limits=LIMITS)
        assert caught.value.code == "invalid_uid"


@pytest.mark.parametrize(
    "uid",
    ["0", "1.2", "1.2.840.10008.5.1.4.1.1.2", "2.25.329800735698586629295641978511506172918",
     "1." + "2" * 62],
)  # fmt: skip
def test_valid_uids_are_accepted(uid: str) -> None:
    inspected = inspect_instance(corpus.hostile_uid("SOPInstanceUID", uid), limits=LIMITS)
    assert inspected.sop_instance_uid == uid


# --------------------------------------------------------------------------------------
# Accepted oddities and what the result carries
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(corpus.ACCEPTED_ODDITIES))
def test_unusual_but_valid_input_is_accepted_and_stored_as_part10(name: str) -> None:
    data = corpus.ACCEPTED_ODDITIES[name]()
    inspected = inspect_instance(data, limits=LIMITS)
    stored = pydicom.dcmread(io.BytesIO(inspected.normalized_bytes))
    assert stored.preamble == bytes(128)
    original = corpus.ct_dataset()
    assert stored.SOPInstanceUID == original.SOPInstanceUID
    if name.startswith(("valid_ct", "raw_", "implicit", "polyglot", "deflated")):
        assert np.array_equal(stored.pixel_array, original.pixel_array)


def test_raw_datasets_are_wrapped_without_changing_their_bytes() -> None:
    for implicit in (True, False):
        raw = corpus.to_raw_dataset(corpus.ct_dataset(), implicit=implicit)
        inspected = inspect_instance(raw, limits=LIMITS)
        assert inspected.container == "raw_dataset"
        assert inspected.normalized_bytes.endswith(raw)
        assert inspected.normalized_bytes[128:132] == b"DICM"
        expected = "1.2.840.10008.1.2" if implicit else "1.2.840.10008.1.2.1"
        assert inspected.transfer_syntax_uid == expected


@pytest.mark.parametrize("kind", sorted(corpus.PREAMBLES))
def test_polyglot_preambles_are_flagged_and_zeroed(kind: str) -> None:
    data = corpus.polyglot(kind)
    inspected = inspect_instance(data, limits=LIMITS)
    assert inspected.preamble_kind == kind
    assert inspected.normalized_bytes[:128] == bytes(128)
    assert inspected.normalized_bytes[128:] == data[128:]


def test_clean_preamble_is_stored_unchanged() -> None:
    data = corpus.valid_ct()
    inspected = inspect_instance(data, limits=LIMITS)
    assert inspected.preamble_kind is None
    assert inspected.normalized_bytes == data


def test_header_values_are_read_from_the_file() -> None:
    ds = corpus.ct_dataset(rows=48, columns=40, frames=2)
    inspected = inspect_instance(corpus.to_part10(ds), limits=LIMITS)
    assert (inspected.rows, inspected.columns, inspected.frames) == (48, 40, 2)
    assert inspected.sop_class_uid == ds.SOPClassUID
    assert inspected.study_instance_uid == ds.StudyInstanceUID
    assert inspected.series_instance_uid == ds.SeriesInstanceUID
    assert inspected.frame_of_reference_uid == ds.FrameOfReferenceUID
    assert inspected.modality == "CT"
    assert inspected.series_number == ds.SeriesNumber
    assert inspected.instance_number == ds.InstanceNumber
    assert inspected.image_position_patient == tuple(float(v) for v in ds.ImagePositionPatient)
    assert inspected.image_orientation_patient == tuple(
        float(v) for v in ds.ImageOrientationPatient
    )
    assert inspected.pixel_spacing == tuple(float(v) for v in ds.PixelSpacing)
    assert inspected.study_date == ds.StudyDate
    assert inspected.series_description == ds.SeriesDescription
    assert inspected.decoded_bytes == 48 * 40 * 2 * 2
    assert inspected.patient_id == CANARY_ID


def test_phi_stays_out_of_the_repr() -> None:
    inspected = inspect_instance(corpus.valid_ct(), limits=LIMITS)
    text = repr(inspected) + str(inspected)
    for canary in (CANARY_NAME, CANARY_ID, CANARY_BIRTH, "Chest"):
        assert canary not in text
    assert inspected.sop_instance_uid in text


def test_results_and_limits_are_frozen() -> None:
    inspected = inspect_instance(corpus.valid_ct(), limits=LIMITS)
    with pytest.raises(FrozenInstanceError):
        inspected.rows = 1  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        LIMITS.max_frames = 1  # type: ignore[misc]


def test_budget_is_the_configured_one() -> None:
    data = corpus.valid_ct(rows=64, columns=64, frames=2)  # 16 KiB decoded
    inspect_instance(data, limits=IngestLimits(max_decoded_bytes=64 * 64 * 2 * 2))
    with pytest.raises(IngestRejected) as caught:
        inspect_instance(data, limits=IngestLimits(max_decoded_bytes=64 * 64 * 2 * 2 - 1))
    assert caught.value.code == "decoded_size_over_budget"


def test_deflated_inflation_is_capped_by_ratio_not_only_by_size() -> None:
    data = corpus.deflate_bomb(16 * 1024 * 1024)
    # the same bomb passes when the caps allow its size and ratio: the caps are what stop it
    generous = IngestLimits(max_inflation_ratio=1e6, max_inflated_bytes=64 * 1024 * 1024)
    inspect_instance(data, limits=generous)
    with pytest.raises(IngestRejected) as caught:
        inspect_instance(data, limits=IngestLimits(inflation_ratio_floor_bytes=1024 * 1024))
    assert caught.value.code == "deflate_bomb"


def test_codec_ratio_cap_is_what_stops_the_rle_bomb() -> None:
    # RLE carries no geometry of its own: only the ratio cap sees 4 KiB claiming 128 MiB
    data = corpus.rle_header_lies(8192, 8192)
    with pytest.raises(IngestRejected) as caught:
        inspect_instance(data, limits=LIMITS)
    assert caught.value.code == "codec_bomb"
    inspected = inspect_instance(data, limits=IngestLimits(max_codec_ratio=1e9))
    assert inspected.decoded_bytes == 8192 * 8192 * 2


# --------------------------------------------------------------------------------------
# ZIP archives
# --------------------------------------------------------------------------------------


def test_zip_members_are_yielded_and_junk_skipped() -> None:
    members = dict(iter_zip_members(corpus.zip_with_junk(), limits=LIMITS))
    assert sorted(members) == ["study/a.dcm", "study/b.dcm"]
    for content in members.values():
        inspect_instance(content, limits=LIMITS)


def test_a_member_that_fails_late_rejects_the_whole_archive() -> None:
    good = corpus.valid_ct()
    archive = bytearray(corpus.zip_of({"a.dcm": good, "b.dcm": good}))
    # corrupt the second member's data: the first must not be handed out either
    second = archive.index(b"PK\x03\x04", archive.index(b"PK\x03\x04") + 4)
    archive[second + 30 + 5 + 20 : second + 30 + 5 + 60] = bytes(40)
    yielded: list[str] = []
    with pytest.raises(IngestRejected) as caught:
        for name, _ in iter_zip_members(bytes(archive), limits=LIMITS):
            yielded.append(name)
    assert caught.value.code == "invalid_zip"
    assert yielded == []


def test_nested_archives_are_not_opened() -> None:
    inner = corpus.zip_ratio_bomb(1024 * 1024)
    members = dict(iter_zip_members(corpus.zip_of({"inner.zip": inner}), limits=LIMITS))
    assert members == {"inner.zip": inner}


def test_zip_names_are_labels_not_paths(tmp_path: Path) -> None:
    before = set(os.listdir(tmp_path))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(IngestRejected):
            list(iter_zip_members(corpus.zip_traversal("../escape.dcm"), limits=LIMITS))
        list(iter_zip_members(corpus.zip_with_junk(), limits=LIMITS))
    finally:
        os.chdir(cwd)
    assert set(os.listdir(tmp_path)) == before
    assert not (tmp_path.parent / "escape.dcm").exists()
