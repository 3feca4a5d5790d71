"""Pieces shared by the DICOM result builders (SEG, SR, Parametric Map).

Everything here is pure: datasets and arrays in, values out. Nothing reads files, settings
or the database, and nothing logs patient data.

The rules every medcad result object follows:

- a new series in the source study, made by manufacturer ``medcad``;
- a Series Description that ends in ``AI-generated, not for clinical use``;
- the model (name + version) identified as the algorithm, family "Artificial Intelligence"
  (CID 7162);
- patient and study identity copied from the sources by highdicom, nothing else.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from app.registry.manifest import Code as ManifestCode
from app.registry.manifest import Label

MANUFACTURER = "medcad"
NOT_FOR_CLINICAL_USE = "AI-generated, not for clinical use"

# Namespace of medcad's name-based UIDs (see derived_uid).
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:medcad:dicom-uid")

# Long String (LO) values hold at most 64 characters (PS3.5 Table 6.2-1).
_LO_MAX = 64

# Default series numbers, so that the three result series of one run sort apart in a viewer.
# Callers that know better (e.g. one Parametric Map series per saliency method) pass their own.
SEG_SERIES_NUMBER = 901
SR_SERIES_NUMBER = 902
PMAP_SERIES_NUMBER = 903

# Fallback codes for labels whose manifest entry carries no codes. Keys are matched against
# words of the label name; the values are (segmented property category, property type).
# Category codes come from CID 7150, type codes from CID 7151 / SNOMED CT.
_FALLBACK_CODES: dict[str, tuple[Code, Code]] = {
    "lung": (codes.SCT.AnatomicalStructure, codes.SCT.Lung),
    "lungs": (codes.SCT.AnatomicalStructure, codes.SCT.Lung),
    "nodule": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule),
    "nodules": (codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule),
    "vessel": (codes.SCT.AnatomicalStructure, codes.SCT.BloodVessel),
    "vessels": (codes.SCT.AnatomicalStructure, codes.SCT.BloodVessel),
}
_GENERIC_CODES: tuple[Code, Code] = (codes.SCT.Tissue, codes.SCT.Tissue)


@dataclass(frozen=True, slots=True)
class Finding:
    """One model result to be written into a findings SR (one TID 1501 measurement group).

    Attributes
    ----------
    label:
        Name of the predicted label (a manifest ``Label.name``), e.g. ``"nodule"``.
    probability:
        Calibrated probability of ``label`` (slice, series), or a lesion's highest voxel
        probability, in [0, 1]; ``None`` when no probability applies (a segmenter's "no
        lesion" statement): then the group carries no Probability measurement.
    positive:
        Whether the finding is reported as present.
    sop_instance_uid:
        SOP Instance UID of the source image the finding was computed on (a lesion's key
        slice); ``None`` for a series-level finding.
    frame:
        1-based frame number inside a multi-frame source instance (the DICOM
        Referenced Frame Number convention, PS3.3 C.7.6.16.2.6); ``None`` for single-frame
        instances and for series-level findings.
    level:
        ``"slice"`` for a per-image finding, ``"series"`` for the aggregate over the series,
        ``"lesion"`` for one segmented lesion (a 3-D connected component).
    uncertain:
        Whether the result falls in the "uncertain — please review" band.
    number:
        A lesion's rank among the model's lesions of this label (1 = largest).
    volume_mm3:
        A lesion's volume, or ``None`` when the geometry is unknown.
    extent:
        The source images the finding was derived from, as (SOP Instance UID, 1-based frame
        or ``None``): every slice a lesion spans; for a series finding the image that decides
        it (the most probable slice under max aggregation), or none when it is derived from
        every image. Unused for slice findings.
    """

    label: str
    probability: float | None
    positive: bool
    sop_instance_uid: str | None
    frame: int | None
    level: Literal["slice", "series", "lesion"]
    uncertain: bool
    number: int | None = None
    volume_mm3: float | None = None
    extent: tuple[tuple[str, int | None], ...] = ()

    def __post_init__(self) -> None:
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {self.probability!r}")
        if self.level != "series" and self.sop_instance_uid is None:
            raise ValueError(f"{self.level}-level finding {self.label!r} needs a sop_instance_uid")
        if self.level == "series" and (self.sop_instance_uid is not None or self.frame is not None):
            raise ValueError(f"series-level finding {self.label!r} must not name an instance")
        if self.frame is not None and self.frame < 1:
            raise ValueError(f"frame numbers are 1-based, got {self.frame!r}")
        if self.level == "lesion" and (self.number is None or not self.extent):
            raise ValueError(f"lesion finding {self.label!r} needs a number and its extent")


def series_description(kind: str, model_name: str, model_version: str) -> str:
    """Series Description (0008,103E) of a result series.

    Always ends in ``AI-generated, not for clinical use`` and fits the 64 characters of
    the LO value representation: the model part is shortened, never the warning.
    """
    suffix = f" - {NOT_FOR_CLINICAL_USE}"
    head = f"{kind} {model_name} {model_version}".strip()
    return head[: _LO_MAX - len(suffix)].rstrip() + suffix


def algorithm_identification(
    model_name: str, model_version: str
) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence (0066,002C) naming the model, family AI (CID 7162)."""
    return hd.AlgorithmIdentificationSequence(
        name=model_name,
        family=codes.cid7162.ArtificialIntelligence,
        version=model_version,
        source=MANUFACTURER,
    )


def sr_algorithm_identification(
    model_name: str, model_version: str
) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification naming the model, family AI (CID 7162)."""
    return hd.sr.AlgorithmIdentification(
        name=model_name,
        version=model_version,
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=MANUFACTURER,
    )


def new_uid() -> str:
    """A fresh random UID under the 2.25 (UUID-derived) root, PS3.5 B.2."""
    return str(generate_uid(prefix=None))


def derived_uid(*parts: str) -> str:
    """A UID under the 2.25 root that is a deterministic function of ``parts``.

    Re-running a job with the same parts (e.g. job id, model key, object kind) yields the
    same Series/SOP Instance UIDs, so a second run replaces rather than duplicates results.
    """
    if not parts:
        raise ValueError("derived_uid needs at least one part")
    # A name-based (SHA-1, version 5) UUID as an integer under 2.25 (PS3.5 B.2). The unit
    # separator keeps ("ab", "c") and ("a", "bc") apart.
    name_based = uuid.uuid5(_UID_NAMESPACE, "\x1f".join(str(p) for p in parts))
    return f"2.25.{name_based.int}"


def to_code(code: ManifestCode) -> Code:
    """The pydicom ``Code`` of a manifest ``Code``."""
    return Code(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def label_codes(label: Label) -> tuple[Code, Code]:
    """(category, type) codes of a label: the manifest's, else a fallback.

    The fallback looks for known words in the label name (``"lung"``, ``"nodule"``,
    ``"vessel"``; the last one wins) and otherwise uses SNOMED CT "Tissue" for both.
    """
    words = label.name.lower().replace("-", "_").replace(" ", "_").split("_")
    # The last known word wins: in "lung_nodule" the nodule is the thing, the lung its site.
    known = [_FALLBACK_CODES[w] for w in words if w in _FALLBACK_CODES]
    fallback = known[-1] if known else _GENERIC_CODES
    category = to_code(label.category) if label.category is not None else fallback[0]
    prop_type = to_code(label.type) if label.type is not None else fallback[1]
    return category, prop_type


def slice_normal(image_orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of an image plane.

    Parameters
    ----------
    image_orientation:
        Image Orientation (Patient) (0020,0037): row direction cosines then column
        direction cosines (PS3.3 C.7.6.2.1.1).

    Returns
    -------
    numpy.ndarray
        float64, shape (3,): ``row × column`` in patient coordinates (LPS, mm).
    """
    iop = np.asarray([float(v) for v in image_orientation], dtype=np.float64)
    if iop.shape != (6,):
        raise ValueError(f"ImageOrientationPatient needs 6 values, got {len(iop)}")
    normal = np.cross(iop[:3], iop[3:])
    length = float(np.linalg.norm(normal))
    if length < 1e-6:
        raise ValueError(f"ImageOrientationPatient {list(iop)} has parallel row/column cosines")
    return normal / length


def sort_by_position(datasets: Sequence[pydicom.Dataset]) -> list[int]:
    """Order of single-frame images along their common slice normal.

    The position of a slice is ``dot(ImagePositionPatient, normal)`` with the normal from
    :func:`slice_normal` (PS3.3 C.7.6.2.1.1), which is right whatever the sign of the
    direction cosines and whatever order the instances arrived in.

    Parameters
    ----------
    datasets:
        Single-frame images sharing one Image Orientation (Patient).

    Returns
    -------
    list[int]
        Indices into ``datasets``, from the smallest to the largest position along the
        normal. Ties keep their input order.
    """
    if not datasets:
        return []
    normal = slice_normal(datasets[0].ImageOrientationPatient)
    for ds in datasets[1:]:
        if not np.allclose(slice_normal(ds.ImageOrientationPatient), normal, atol=1e-4):
            raise ValueError("images do not share one ImageOrientationPatient")
    distances = [
        float(np.dot(np.asarray([float(v) for v in ds.ImagePositionPatient]), normal))
        for ds in datasets
    ]
    return sorted(range(len(datasets)), key=lambda i: distances[i])


def is_multiframe(dataset: pydicom.Dataset) -> bool:
    """Whether an image stores more than one frame or uses multi-frame functional groups."""
    return (
        "PerFrameFunctionalGroupsSequence" in dataset
        or int(dataset.get("NumberOfFrames", 1) or 1) > 1
    )


def source_frame_count(source_datasets: Sequence[pydicom.Dataset]) -> int:
    """Number of source frames a result array must have along axis 0.

    The sources are either single-frame images of one series (one frame each) or exactly
    one multi-frame image (NumberOfFrames frames), as highdicom requires for derived
    multi-frame objects.
    """
    if not source_datasets:
        raise ValueError("at least one source image is needed")
    multiframe = [ds for ds in source_datasets if is_multiframe(ds)]
    if multiframe:
        if len(source_datasets) != 1:
            raise ValueError("a multi-frame source must be the only source image")
        return int(source_datasets[0].NumberOfFrames)
    series = {str(ds.SeriesInstanceUID) for ds in source_datasets}
    if len(series) != 1:
        raise ValueError(f"source images come from {len(series)} series, expected one")
    return len(source_datasets)


def check_frame_array(
    array: np.ndarray, source_datasets: Sequence[pydicom.Dataset], *, name: str
) -> None:
    """Check that ``array`` is (F, H, W) with one frame per source frame, in source geometry."""
    frames = source_frame_count(source_datasets)
    rows, columns = int(source_datasets[0].Rows), int(source_datasets[0].Columns)
    if array.ndim != 3 or array.shape != (frames, rows, columns):
        raise ValueError(
            f"{name} has shape {array.shape}, expected (frames, rows, columns) = "
            f"{(frames, rows, columns)} from the source images"
        )


def drop_acquisition_equipment(dataset: pydicom.Dataset) -> None:
    """Remove the source scanner from Contributing Equipment Sequence (0018,A001), in place.

    highdicom records the acquisition equipment of the source (manufacturer, institution,
    station name, serial number) as contributing equipment (PS3.3 C.12.1.1.5). medcad
    results carry over patient and study identity only, so that item goes; the processing
    equipment item (highdicom, DCM 109102) stays.
    """
    items = dataset.get("ContributingEquipmentSequence")
    if items is None:
        return
    kept = [
        item
        for item in items
        if not any(
            code.CodeValue == "109101" and code.CodingSchemeDesignator == "DCM"
            for code in item.get("PurposeOfReferenceCodeSequence", [])
        )
    ]
    if kept:
        dataset.ContributingEquipmentSequence = kept
    else:
        del dataset.ContributingEquipmentSequence


def encode(dataset: pydicom.Dataset) -> bytes:
    """The PS3.10 file bytes of ``dataset`` (preamble, file meta, data set), in memory."""
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()
