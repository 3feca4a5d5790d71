"""The DICOM objects of a job: SEG, the series' findings SR and saliency Parametric Maps.

Each object is built by its builder in ``workers.outputs`` from the source headers (never the
pixels: ``workers.series`` drops Pixel Data after decoding), encoded with a File Meta
Information header (PS3.10 §7.1) and stored as a blob before its row is returned. A source
series that cannot support an object (no Frame of Reference, duplicate plane positions, ...)
yields a job warning instead of a failure: ``guarded``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pydicom

from app.db.records import ArtifactKind, ArtifactRecord
from app.storage import BlobStore
from workers.analysis import ModelAnalysis
from workers.outputs import dicom_pmap, dicom_seg, dicom_sr
from workers.outputs.dicom_common import Finding
from workers.series import DecodedSeries, SourceFrame


@dataclass(frozen=True)
class ArtifactSink:
    """Where a job's objects go: their blobs into ``store``, their rows name ``job_id``."""

    job_id: str
    store: BlobStore


def guarded(
    kind: str,
    model: str,
    build: Callable[[], ArtifactRecord | list[ArtifactRecord]],
    warnings: list[dict[str, str]],
) -> list[ArtifactRecord]:
    """Build a DICOM output; if the source headers cannot support it, warn instead of failing.

    DICOM SEG/SR/PM need source attributes some valid images lack (Frame of Reference, plane
    positions, Patient ID...). The masks, findings and saliency maps are still delivered; the
    job carries a warning naming the object that could not be built and why.
    """
    try:
        built = build()
    except (ValueError, AttributeError, KeyError, TypeError, RuntimeError, IndexError) as exc:
        # highdicom's messages describe structure (missing attributes, duplicate planes), not values.
        warnings.append(
            {
                "code": f"dicom_{kind}_not_built",
                "detail": f"{model}: {type(exc).__name__}: {str(exc)[:200]}",
            }
        )
        return []
    return built if isinstance(built, list) else [built]


def model_objects(
    sink: ArtifactSink,
    series: DecodedSeries,
    analysis: ModelAnalysis,
    warnings: list[dict[str, str]],
) -> list[ArtifactRecord]:
    """One model's own objects: its SEG (segmenters) and a Parametric Map per saliency method."""
    name = analysis.manifest.name
    out: list[ArtifactRecord] = []
    if analysis.segmentation is not None:
        out += guarded("seg", name, lambda: segmentation_object(sink, series, analysis), warnings)
    out += guarded("pmap", name, lambda: parametric_maps(sink, series, analysis), warnings)
    return out


def source_headers(series: DecodedSeries) -> list[pydicom.Dataset]:
    """The headers of the source instances the analysed frames come from, in slice order."""
    used = sorted({ref.dataset_index for ref in series.refs})
    return [series.datasets[i] for i in used]


def store_object(
    sink: ArtifactSink,
    kind: ArtifactKind,
    model: str,
    ds: pydicom.Dataset,
    method: str | None = None,
) -> ArtifactRecord:
    """Encode ``ds`` as a DICOM file (PS3.10), store it durably and return its row."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    return ArtifactRecord(
        job_id=sink.job_id,
        kind=kind.value,
        model=model,
        method=method,
        blob_sha256=sink.store.put(data),
        media_type="application/dicom",
        size_bytes=len(data),
        sop_instance_uid=str(ds.SOPInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
    )


def segmentation_object(
    sink: ArtifactSink, series: DecodedSeries, analysis: ModelAnalysis
) -> ArtifactRecord:
    """The DICOM Segmentation (PS3.3 A.51) of a segmenter's label map."""
    seg = analysis.segmentation
    assert seg is not None
    datasets = source_headers(series)
    ds = dicom_seg.build_segmentation(
        datasets,
        seg.labels,
        analysis.manifest.labels,
        model_name=analysis.manifest.name,
        model_version=analysis.manifest.version,
    )
    return store_object(sink, ArtifactKind.SEG, analysis.manifest.name, ds)


def findings_report(
    sink: ArtifactSink,
    series: DecodedSeries,
    analyses: list[ModelAnalysis],
    warnings: list[dict[str, str]],
) -> list[ArtifactRecord]:
    """The series' findings SR, with every model that reports findings (classifiers, and
    segmenters with a component filter); a warning instead when the sources cannot support it.
    """
    reporting = [a for a in analyses if a.classification is not None or a.manifest.components]
    if not reporting:
        return []
    names = "+".join(a.manifest.name for a in reporting)[:64]
    return guarded("sr", names, lambda: _report_object(sink, series, reporting, names), warnings)


def _report_object(
    sink: ArtifactSink, series: DecodedSeries, analyses: list[ModelAnalysis], model: str
) -> ArtifactRecord:
    """One Comprehensive 3D SR for the series: per model, a classifier's series finding and
    its positive or uncertain slices, a segmenter's lesions (or that it found none)."""
    multi = any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in series.datasets)

    def frame_number(ref: SourceFrame) -> int | None:
        return ref.frame + 1 if multi else None

    parts = [
        dicom_sr.ModelFindings(
            model_name=a.manifest.name,
            model_version=a.manifest.version,
            findings=_classification_sr_findings(series, a, frame_number)
            if a.classification is not None
            else _lesion_sr_findings(series, a, frame_number),
            labels=a.manifest.labels,
        )
        for a in analyses
    ]
    ds = dicom_sr.build_report_sr(source_headers(series), parts)
    return store_object(sink, ArtifactKind.SR, model, ds)


def _classification_sr_findings(
    series: DecodedSeries,
    analysis: ModelAnalysis,
    frame_number: Callable[[SourceFrame], int | None],
) -> list[Finding]:
    cls = analysis.classification
    spec = analysis.manifest.classification
    assert cls is not None and spec is not None
    label = spec.positive_label
    top = series.refs[cls.series_index]
    findings = [
        Finding(
            label=label,
            probability=cls.series_probability,
            positive=cls.series_positive,
            sop_instance_uid=None,
            frame=None,
            level="series",
            uncertain=cls.series_uncertain,
            # under max aggregation one slice decides the series probability
            extent=((top.sop_instance_uid, frame_number(top)),)
            if spec.series_aggregation == "max"
            else (),
        )
    ]
    findings.extend(
        Finding(
            label=label,
            probability=float(cls.probabilities[i]),
            positive=bool(cls.positive[i]),
            sop_instance_uid=ref.sop_instance_uid,
            frame=frame_number(ref),
            level="slice",
            uncertain=bool(cls.uncertain[i]),
        )
        for i, ref in enumerate(series.refs)
        if cls.positive[i] or cls.uncertain[i]
    )
    return findings


def _lesion_sr_findings(
    series: DecodedSeries,
    analysis: ModelAnalysis,
    frame_number: Callable[[SourceFrame], int | None],
) -> list[Finding]:
    seg = analysis.segmentation
    manifest = analysis.manifest
    assert seg is not None
    findings = []
    for lesion in seg.lesions:
        key = series.refs[lesion.key_frame]
        span = series.refs[lesion.frames[0] : lesion.frames[1] + 1]
        findings.append(
            Finding(
                label=lesion.structure,
                probability=lesion.max_probability,
                positive=True,
                sop_instance_uid=key.sop_instance_uid,
                frame=frame_number(key),
                level="lesion",
                uncertain=lesion.uncertain,
                number=lesion.number,
                volume_mm3=lesion.volume_mm3,
                extent=tuple((ref.sop_instance_uid, frame_number(ref)) for ref in span),
            )
        )
    if not findings:  # say what was looked for and not found
        findings = [
            Finding(rule.label, None, False, None, None, "series", False)
            for rule in manifest.components
        ]
    return findings


def parametric_maps(
    sink: ArtifactSink, series: DecodedSeries, analysis: ModelAnalysis
) -> list[ArtifactRecord]:
    """One Parametric Map per saliency method that covers every frame of the series."""
    out: list[ArtifactRecord] = []
    maps = analysis.saliency
    n = len(series.refs)
    datasets = source_headers(series)
    for method in {m.method for m in maps}:
        per_frame = {m.index: m for m in maps if m.method is method}
        if len(per_frame) != n:
            continue  # partial maps (budgeted occlusion) stay as PNG/npy, not a PM
        stack = np.stack([per_frame[i].values for i in range(n)]).astype(np.float32)
        ds = dicom_pmap.build_parametric_map(
            datasets,
            stack,
            method=method.value,
            model_name=analysis.manifest.name,
            model_version=analysis.manifest.version,
            value_range=per_frame[0].display_range,
        )
        out.append(store_object(sink, ArtifactKind.PMAP, analysis.manifest.name, ds, method.value))
    return out
