"""DICOM JSON of stored instances whose values break their VR (PS3.18 Annex F)."""

from __future__ import annotations

import io
import logging

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from app.dicomweb.dicom_json import metadata_json, to_json

CANARY = b"CANARY-ID-7731"


def _broken_instance() -> Dataset:
    """A CT header whose Window Center and a nested Slice Thickness are not numbers, as a
    broken modality writes them (pydicom refuses to write such a DS: the bytes are patched)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = CTImageStorage
    ds.PatientName = "DOE^JANE"
    ds.WindowCenter = "11223344556677"
    ds.ReferencedImageSequence = [Dataset()]
    ds.ReferencedImageSequence[0].SliceThickness = "12345678"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    raw = out.getvalue().replace(b"11223344556677", CANARY).replace(b"12345678", b"CANARY-7")
    return pydicom.dcmread(io.BytesIO(raw), defer_size=1024)


def test_pydicom_alone_fails_on_the_broken_value() -> None:
    with pytest.raises(ValueError):
        _broken_instance().to_json_dict()


def test_invalid_values_come_back_empty_and_the_rest_intact(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        out = to_json(_broken_instance())
        meta = metadata_json(_broken_instance(), lambda tag: f"bulk/{tag:08X}")
    for doc in (out, meta):
        assert doc["00281050"] == {"vr": "DS"}  # present, empty
        assert doc["00081140"]["Value"][0]["00180050"] == {"vr": "DS"}
        assert doc["00100010"]["Value"] == [{"Alphabetic": "DOE^JANE"}]
    assert Dataset.from_json(out).PatientName == "DOE^JANE"  # still valid DICOM JSON
    assert "CANARY" not in caplog.text and "00281050" in caplog.text
