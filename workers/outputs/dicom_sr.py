"""Comprehensive 3D SR (TID 1500 Measurement Report) of the findings on one series.

One report per analysed series, holding every model's findings, each measurement group naming
its model as algorithm:

- a classifier's series finding and the slices it calls positive or uncertain (every slice's
  probability is in the API's JSON results; a group per negative slice would bury the
  findings and cost about 0.1 s each to build);
- a segmenter's lesions, with volume and peak probability, or, when it keeps none, one
  series-level group stating the structure is absent.

PS3.3 A.35.13 (Comprehensive 3D SR IOD), PS3.16 TID 1500 / TID 1501, built with
:class:`highdicom.sr.Comprehensive3DSR` and :class:`highdicom.sr.MeasurementReport`.

Document layout::

    Imaging Measurement Report (TID 1500)
    ├── observation context: device observer = the models (names, versions, medcad)
    ├── procedure reported: "<modality> unspecified body region" of the sources
    ├── Image Library (TID 1600): the source images the groups reference (single-frame
    │   sources only)
    └── Imaging Measurements: one Measurement Group (TID 1501) per finding
        ├── tracking identifier + UID, finding = the label's code, algorithm = the model
        ├── qualitative evaluation: <label concept> = Present | Absent
        ├── qualitative evaluation: Certainty of finding = Uncertain (review band only)
        ├── measurement: Probability (DCM 122157), UCUM "1", with the algorithm; for a
        │   lesion its highest voxel probability (derivation Maximum, SCT 56851009)
        ├── measurement: Volume (SCT 118565006), UCUM "mm3" (lesions, when known)
        └── source: the slice (and frame) for a slice finding; every slice a lesion spans;
            for a series finding the slice that decides it (max aggregation), else none:
            it is about every image of the evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from app.registry.manifest import Label
from workers.outputs.dicom_common import (
    MANUFACTURER,
    SR_SERIES_NUMBER,
    Finding,
    derived_uid,
    drop_acquisition_equipment,
    is_multiframe,
    label_codes,
    new_uid,
    series_description,
    source_frame_count,
    sr_algorithm_identification,
)

PROBABILITY = codes.DCM.Probability  # (122157, DCM, "Probability")
UNITLESS = codes.UCUM.NoUnits  # (1, UCUM, "no units"): a probability in [0, 1]
PRESENT = codes.SCT.Present  # (52101004, SCT, "Present")
ABSENT = codes.SCT.Absent  # (272519000, SCT, "Absent")
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding  # (111012, DCM)
UNCERTAIN = codes.SCT.Uncertain  # (64957009, SCT)
MAXIMUM = codes.SCT.Maximum  # (56851009, SCT): derivation of a lesion's peak probability
VOLUME = codes.SCT.Volume  # (118565006, SCT)
CUBIC_MM = codes.UCUM.CubicMillimeter  # (mm3, UCUM)


# Procedure Reported (CID 100) by source modality; anything else is "Imaging procedure".
_PROCEDURES: dict[str, Code] = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
    "CR": codes.LN.XRUnspecifiedBodyRegion,
    "DX": codes.LN.XRUnspecifiedBodyRegion,
}


def _finding_code(name: str, labels: Sequence[Label]) -> Code:
    """The concept of a finding label: its manifest type code, else a fallback code."""
    label = next((lab for lab in labels if lab.name == name), None)
    return label_codes(label if label is not None else Label(value=0, name=name))[1]


def _source_reference(
    finding: Finding, sources: Sequence[pydicom.Dataset], by_uid: dict[str, pydicom.Dataset]
) -> list[hd.sr.SourceImageForMeasurementGroup]:
    """The image (and frame) a slice finding was computed on; the slices a lesion spans;
    the image that decides a series finding, if one does (else none: every image).
    """
    refs = (
        [(str(finding.sop_instance_uid), finding.frame)]
        if finding.level == "slice"
        else list(finding.extent)
    )
    out = []
    for uid, frame in refs:
        source = by_uid.get(uid)
        if source is None:
            raise ValueError(
                f"finding {finding.label!r} names instance {uid} not among the sources"
            )
        frames: list[int] | None = None
        if is_multiframe(source):
            if frame is None:
                raise ValueError(f"finding {finding.label!r} on multi-frame {uid} needs a frame")
            frames = [frame]
        elif frame not in (None, 1):
            raise ValueError(f"finding {finding.label!r}: {uid} has one frame, got {frame}")
        out.append(hd.sr.SourceImageForMeasurementGroup.from_source_image(source, frames))
    return out


def _measurements(
    finding: Finding, algorithm: hd.sr.AlgorithmIdentification
) -> list[hd.sr.Measurement]:
    """Probability (a lesion's is its maximum over the lesion) and a lesion's volume."""
    out = []
    if finding.probability is not None:
        out.append(
            hd.sr.Measurement(
                name=PROBABILITY,
                value=float(finding.probability),
                unit=UNITLESS,
                algorithm_id=algorithm,
                derivation=MAXIMUM if finding.level == "lesion" else None,
            )
        )
    if finding.volume_mm3 is not None:
        out.append(
            hd.sr.Measurement(
                name=VOLUME, value=float(finding.volume_mm3), unit=CUBIC_MM, algorithm_id=algorithm
            )
        )
    return out


def _tracking_name(index: int, finding: Finding) -> str:
    if finding.level == "lesion":
        return f"{finding.label} {finding.number}"[:64]
    return f"{finding.label} ({finding.level} finding {index})"[:64]


def _measurement_group(
    index: int,
    finding: Finding,
    *,
    labels: Sequence[Label],
    sources: Sequence[pydicom.Dataset],
    by_uid: dict[str, pydicom.Dataset],
    algorithm: hd.sr.AlgorithmIdentification,
    tracking_root: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    concept = _finding_code(finding.label, labels)
    evaluations = [hd.sr.QualitativeEvaluation(concept, PRESENT if finding.positive else ABSENT)]
    if finding.uncertain:
        evaluations.append(hd.sr.QualitativeEvaluation(CERTAINTY_OF_FINDING, UNCERTAIN))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derived_uid(tracking_root, str(index)),
            identifier=_tracking_name(index, finding),
        ),
        finding_type=concept,
        algorithm_id=algorithm,
        qualitative_evaluations=evaluations,
        measurements=_measurements(finding, algorithm) or None,
        source_images=_source_reference(finding, sources, by_uid) or None,
    )


def _library(
    sources: Sequence[pydicom.Dataset], findings: Sequence[Finding]
) -> list[pydicom.Dataset]:
    """The Image Library (TID 1600): the images the measurement groups reference, in source
    order; every source when no group names an image (the library is mandatory in TID 1500).

    Describing each image costs about 70 ms of highdicom and pydicom work once it is in the
    document, so a 100-slice series with a handful of findings is not described 100 times.
    """
    named = set()
    for f in findings:
        if f.level == "slice":
            named.add(str(f.sop_instance_uid))
        named.update(uid for uid, _frame in f.extent)
    used = [ds for ds in sources if str(ds.SOPInstanceUID) in named]
    return used or list(sources)


@dataclass(frozen=True)
class ModelFindings:
    """One model's part of a report: its identity, its manifest labels and its findings."""

    model_name: str
    model_version: str
    findings: Sequence[Finding]
    labels: Sequence[Label] = ()

    @property
    def identity(self) -> tuple[str, str]:
        return self.model_name, self.model_version


def build_findings_sr(
    source_datasets: Sequence[pydicom.Dataset],
    findings: Sequence[Finding],
    *,
    model_name: str,
    model_version: str,
    labels: Sequence[Label] = (),
    procedure_reported: Code | None = None,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> pydicom.Dataset:
    """A report of one model's findings: ``build_report_sr`` with a single part."""
    return build_report_sr(
        source_datasets,
        [ModelFindings(model_name, model_version, findings, labels)],
        procedure_reported=procedure_reported,
        series_number=series_number,
        instance_number=instance_number,
        series_instance_uid=series_instance_uid,
        sop_instance_uid=sop_instance_uid,
    )


def build_report_sr(
    source_datasets: Sequence[pydicom.Dataset],
    parts: Sequence[ModelFindings],
    *,
    procedure_reported: Code | None = None,
    series_number: int = SR_SERIES_NUMBER,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> pydicom.Dataset:
    """Build a Comprehensive 3D SR (TID 1500) carrying the findings of one or more models.

    One report per analysed series: the Image Library describes the sources once, however
    many models report on them, and every measurement group names its model as algorithm.

    Parameters
    ----------
    source_datasets:
        The images the findings were computed on (single-frame images of one series, or
        one multi-frame image). They form the Image Library and the SR evidence.
    parts:
        Per model, one measurement group per finding, in the given order. Slice findings
        must name one of the source instances (and a 1-based frame for a multi-frame
        source), lesion findings every source image they span. A series finding names the
        image that decides it, or none: then it is about every image of the evidence (TID
        1501 "Source" is optional).
        The model is the algorithm (TID 4019) of its groups and probabilities; its manifest
        labels give the coded concept of each finding label (else SNOMED CT fallbacks).
    procedure_reported:
        Procedure Reported (CID 100); defaults to "<modality> unspecified body region" of
        the source modality (CT, MR, PET, NM, X-ray), else "Imaging procedure".
    series_number, instance_number, series_instance_uid, sop_instance_uid:
        Identity of the new series and instance; UIDs default to fresh random ones.

    Returns
    -------
    pydicom.Dataset
        A Comprehensive 3D SR instance (SOP Class 1.2.840.10008.5.1.4.1.1.88.34) in a new
        series of the source study, observed by a device named after the models, marked
        complete, preliminary and unverified: a model output awaiting review.
    """
    source_frame_count(source_datasets)  # validates the source layout
    if not any(part.findings for part in parts):
        raise ValueError("no findings to report")
    by_uid = {str(ds.SOPInstanceUID): ds for ds in source_datasets}
    sr_uid = sop_instance_uid or new_uid()
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for part in parts:
        algorithm = sr_algorithm_identification(part.model_name, part.model_version)
        for finding in part.findings:
            groups.append(
                _measurement_group(
                    len(groups) + 1,
                    finding,
                    labels=part.labels,
                    sources=source_datasets,
                    by_uid=by_uid,
                    algorithm=algorithm,
                    tracking_root=sr_uid,
                )
            )
    names = [p.model_name for p in parts]
    versions = [p.model_version for p in parts]
    observed = ", ".join(f"{n} {v}" for n, v in zip(names, versions, strict=True))
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derived_uid(MANUFACTURER, "device", *(x for p in parts for x in p.identity)),
            name=observed[:64],
            manufacturer_name=MANUFACTURER,
            model_name="+".join(names)[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure_reported
        or _PROCEDURES.get(
            str(source_datasets[0].get("Modality", "")), codes.cid100.ImagingProcedure
        ),
        imaging_measurements=groups,
        # highdicom describes Image Library entries from classic single-frame attributes
        # (PixelSpacing at the top level), so enhanced multi-frame sources go without one.
        referenced_images=None
        if is_multiframe(source_datasets[0])
        else _library(source_datasets, [f for part in parts for f in part.findings]),
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=list(source_datasets),
        content=report,
        series_instance_uid=series_instance_uid or new_uid(),
        series_number=series_number,
        sop_instance_uid=sr_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        series_description=series_description(
            "SR", "+".join(names), versions[0] if len(parts) == 1 else ""
        ),
    )
    drop_acquisition_equipment(sr)
    return sr
