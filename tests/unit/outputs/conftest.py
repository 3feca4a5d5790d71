"""Source images for the DICOM result builder tests.

Small CT series are generated here with pydicom (real headers, real geometry), plus the
real test files shipped with pydicom (``CT_small.dcm``) and pydicom-data
(``eCT_Supplemental.dcm``, a 2-frame Enhanced CT).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from app.registry.manifest import Code, Label

PATIENT = {
    "PatientName": "Phantom^Lung",
    "PatientID": "PHANTOM-0001",
    "PatientBirthDate": "19600101",
    "PatientSex": "O",
}
STUDY = {
    "StudyDate": "20260101",
    "StudyTime": "101500",
    "AccessionNumber": "ACC0001",
    "StudyID": "S1",
    "ReferringPhysicianName": "Referrer^Ruth",
}
# Attributes that identify the site or staff, not the patient or study: no result object
# may carry them.
NOT_IDENTITY = {
    "InstitutionName": "Example General Hospital",
    "InstitutionAddress": "1 Example Road",
    "StationName": "CTSTATION7",
    "OperatorsName": "Operator^Olga",
    "PerformingPhysicianName": "Performer^Paul",
    "DeviceSerialNumber": "SCANNER-SN-42",
}
NOT_IDENTITY_VALUES = (*NOT_IDENTITY.values(), "ScannerCo")

LABELS = [
    Label(value=0, name="background"),
    Label(
        value=1,
        name="lung",
        category=Code(scheme="SCT", value="91723000", meaning="Anatomical Structure"),
        type=Code(scheme="SCT", value="39607008", meaning="Lung"),
        color=(80, 160, 255),
    ),
    # No codes: the builders fall back to SNOMED CT "Nodule".
    Label(value=2, name="nodule", color=(255, 64, 0)),
]


def make_ct_series(
    *,
    n: int = 7,
    rows: int = 64,
    columns: int = 64,
    orientation: Sequence[float] = (1, 0, 0, 0, 1, 0),
    spacing: tuple[float, float] = (0.75, 0.8),
    slice_step: float = 2.5,
    origin: Sequence[float] = (-24.0, -30.5, 40.0),
    upload_order: Sequence[int] | None = None,
    seed: int = 0,
) -> list[pydicom.Dataset]:
    """A CT series of ``n`` single-frame slices with consistent geometry.

    Slice ``k`` (in acquisition order) sits at ``origin + k * slice_step * normal`` with
    ``normal = row × column`` cosines. The list is returned in ``upload_order`` (indices
    into acquisition order), e.g. shuffled to mimic an unsorted upload. Each dataset is
    serialised and re-read, as an uploaded file would be.
    """
    rng = np.random.default_rng(seed)
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    slices = []
    for k in range(n):
        ds = pydicom.Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        sop_uid = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        for key, value in {**PATIENT, **STUDY, **NOT_IDENTITY}.items():
            setattr(ds, key, value)
        ds.Modality = "CT"
        ds.Manufacturer = "ScannerCo"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 3
        ds.InstanceNumber = k + 1
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageOrientationPatient = [float(v) for v in iop]
        position = np.asarray(origin, dtype=np.float64) + k * slice_step * normal
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(np.dot(position, normal)), 4)
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = slice_step
        ds.KVP = 120
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = rows, columns
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        pixels = rng.integers(0, 1400, size=(rows, columns), dtype=np.int16)
        ds.PixelData = pixels.tobytes()
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
        slices.append(pydicom.dcmread(io.BytesIO(buffer.getvalue())))
    order = list(range(n)) if upload_order is None else list(upload_order)
    assert sorted(order) == list(range(n))
    return [slices[i] for i in order]


def make_label_maps(shape: tuple[int, int, int], seed: int = 1) -> np.ndarray:
    """uint8 (F, H, W) label maps that differ on every frame.

    Frame ``i`` has a lung block whose extent depends on ``i`` and, on all but the first
    frame, a nodule whose position depends on ``i``; the last frame is empty (background),
    so empty-frame omission is exercised.
    """
    frames, rows, columns = shape
    rng = np.random.default_rng(seed)
    maps = np.zeros(shape, dtype=np.uint8)
    for i in range(frames - 1):
        top, left = int(rng.integers(2, rows // 4)), int(rng.integers(2, columns // 4))
        maps[i, top : top + rows // 2 + i, left : left + columns // 3] = 1
        if i > 0:
            r, c = int(rng.integers(0, rows - 6)), int(rng.integers(0, columns - 6))
            maps[i, r : r + 3 + i % 3, c : c + 4] = 2
    return maps


@pytest.fixture
def ct_series() -> list[pydicom.Dataset]:
    """Standard axial series (identity cosines), 7 slices in acquisition order."""
    return make_ct_series()


@pytest.fixture
def ct_series_factory() -> Callable[..., list[pydicom.Dataset]]:
    return make_ct_series


@pytest.fixture
def ct_small() -> pydicom.Dataset:
    return pydicom.dcmread(get_testdata_file("CT_small.dcm"))


@pytest.fixture
def enhanced_ct() -> pydicom.Dataset:
    """A real 2-frame Enhanced CT image (pydicom-data), for multi-frame sources."""
    path = get_testdata_file("eCT_Supplemental.dcm")
    if path is None:
        pytest.skip("pydicom-data (dev dependency) is not installed")
    return pydicom.dcmread(path)


def source_frames(
    sources: Sequence[pydicom.Dataset],
) -> dict[tuple[str, int | None], tuple[int, np.ndarray]]:
    """(SOP Instance UID, frame number or None) → (index along axis 0, Image Position).

    Single-frame sources are keyed with frame ``None``; the frames of a multi-frame source
    with their 1-based frame numbers, positions taken from its per-frame functional groups.
    """
    table: dict[tuple[str, int | None], tuple[int, np.ndarray]] = {}
    if len(sources) == 1 and "PerFrameFunctionalGroupsSequence" in sources[0]:
        ds = sources[0]
        for i, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
            position = item.PlanePositionSequence[0].ImagePositionPatient
            table[(str(ds.SOPInstanceUID), i + 1)] = (i, np.asarray(position, dtype=float))
        return table
    for i, ds in enumerate(sources):
        table[(str(ds.SOPInstanceUID), None)] = (i, np.asarray(ds.ImagePositionPatient, float))
    return table


def frame_reference(item: pydicom.Dataset) -> tuple[str, int | None]:
    """The (SOP Instance UID, frame) a derived frame names in its Derivation Image Sequence."""
    derivations = item.DerivationImageSequence
    assert len(derivations) == 1
    sources = derivations[0].SourceImageSequence
    assert len(sources) == 1
    frame = sources[0].get("ReferencedFrameNumber")
    return str(sources[0].ReferencedSOPInstanceUID), None if frame is None else int(frame)


@pytest.fixture
def labels() -> list[Label]:
    return list(LABELS)


@pytest.fixture
def label_maps_factory() -> Callable[..., np.ndarray]:
    return make_label_maps


@pytest.fixture
def source_frames_of() -> Callable[..., dict[tuple[str, int | None], tuple[int, np.ndarray]]]:
    return source_frames


@pytest.fixture
def frame_reference_of() -> Callable[[pydicom.Dataset], tuple[str, int | None]]:
    return frame_reference


@pytest.fixture
def site_values() -> tuple[str, ...]:
    """Values of site/staff attributes set on the generated sources."""
    return NOT_IDENTITY_VALUES


@pytest.fixture
def identity() -> dict[str, str]:
    """Patient and study attributes of the generated sources."""
    return {**PATIENT, **STUDY}
