"""Read models for results: findings, masks, saliency maps, artifacts and source pixels."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.pixels.processing import apply_modality_lut
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.records import (
    ArtifactRecord,
    FindingRecord,
    InstanceRecord,
    JobRecord,
    MaskRecord,
    SaliencyRecord,
    SeriesRecord,
    StudyRecord,
)
from app.errors import MedcadError, NotFound
from app.storage import BlobStore


@dataclass
class JobResults:
    """Rows of one job's result set."""

    job: JobRecord
    series: SeriesRecord
    study: StudyRecord
    instances: list[InstanceRecord]
    findings: list[FindingRecord]
    masks: list[MaskRecord]
    saliency: list[SaliencyRecord]
    artifacts: list[ArtifactRecord]


def _instance_order(row: InstanceRecord) -> tuple[float, int, str]:
    return (row.slice_position or 0.0, row.instance_number or 0, row.sop_instance_uid)


def get_results(*, session: Session, job: JobRecord) -> JobResults:
    """The result set of ``job`` (caller checks the status)."""
    series = session.get(SeriesRecord, job.series_id)
    assert series is not None
    study = session.get(StudyRecord, series.study_id)
    assert study is not None
    instances = sorted(
        session.scalars(select(InstanceRecord).where(InstanceRecord.series_id == series.id)),
        key=_instance_order,
    )
    return JobResults(
        job=job,
        series=series,
        study=study,
        instances=instances,
        findings=list(
            session.scalars(
                select(FindingRecord)
                .where(FindingRecord.job_id == job.id)
                .order_by(FindingRecord.level, FindingRecord.sop_instance_uid, FindingRecord.frame)
            )
        ),
        masks=list(session.scalars(select(MaskRecord).where(MaskRecord.job_id == job.id))),
        saliency=list(
            session.scalars(select(SaliencyRecord).where(SaliencyRecord.job_id == job.id))
        ),
        artifacts=list(
            session.scalars(select(ArtifactRecord).where(ArtifactRecord.job_id == job.id))
        ),
    )


def get_mask(*, session: Session, mask_id: str) -> MaskRecord:
    """A mask row, or NotFound."""
    row = session.get(MaskRecord, mask_id)
    if row is None:
        raise NotFound(detail=f"no mask {mask_id[:64]!r}")
    return row


def get_saliency(*, session: Session, saliency_id: str) -> SaliencyRecord:
    """A saliency row, or NotFound."""
    row = session.get(SaliencyRecord, saliency_id)
    if row is None:
        raise NotFound(detail=f"no saliency map {saliency_id[:64]!r}")
    return row


def get_artifact(*, session: Session, artifact_id: str) -> ArtifactRecord:
    """An artifact row, or NotFound."""
    row = session.get(ArtifactRecord, artifact_id)
    if row is None:
        raise NotFound(detail=f"no artifact {artifact_id[:64]!r}")
    return row


_UIDS_OF_JOB: dict[str, tuple[str, str]] = {}  # a job never changes series: remembered
_UIDS_OF_JOB_MAX = 4096


def series_uids_of_job(*, session: Session, job_id: str) -> tuple[str, str] | None:
    """(study uid, series uid) of a job, for audit events (remembered per process)."""
    known = _UIDS_OF_JOB.get(job_id)
    if known is not None:
        return known
    row = session.execute(
        select(StudyRecord.study_instance_uid, SeriesRecord.series_instance_uid)
        .join(SeriesRecord, SeriesRecord.study_id == StudyRecord.id)
        .join(JobRecord, JobRecord.series_id == SeriesRecord.id)
        .where(JobRecord.id == job_id)
    ).first()
    if row is None:
        return None
    if len(_UIDS_OF_JOB) >= _UIDS_OF_JOB_MAX:
        _UIDS_OF_JOB.clear()
    _UIDS_OF_JOB[job_id] = (row[0], row[1])
    return (row[0], row[1])


def get_instance(*, session: Session, sop_instance_uid: str) -> InstanceRecord:
    """An instance row, or NotFound."""
    row = session.scalar(
        select(InstanceRecord).where(InstanceRecord.sop_instance_uid == sop_instance_uid)
    )
    if row is None:
        raise NotFound(detail=f"no instance {sop_instance_uid[:64]!r}")
    return row


@dataclass(frozen=True)
class FramePixels:
    """One frame in modality units (int16, clipped) with its default window."""

    values: np.ndarray
    window_center: float
    window_width: float


def read_frame(*, store: BlobStore, instance: InstanceRecord, frame: int) -> FramePixels:
    """Decode one frame for the viewer: Modality LUT applied (HU for CT), MONOCHROME1 inverted."""
    if frame < 0 or frame >= instance.frames:
        raise NotFound(detail=f"frame {frame} out of range 0..{instance.frames - 1}")
    ds = pydicom.dcmread(io.BytesIO(store.get(instance.blob_sha256)))
    try:
        if instance.frames > 1:
            pixels = ds.pixel_array[frame]
        else:
            pixels = ds.pixel_array
    except Exception as exc:  # codec failures are the caller's input problem, not a 500
        raise MedcadError(
            "undecodable",
            f"the stored instance cannot be decoded: {type(exc).__name__}",
            status=422,
        ) from exc
    if pixels.ndim == 3:  # colour: luminance (ITU-R BT.601), the same policy as the workers
        pixels = pixels[..., 0] * 0.299 + pixels[..., 1] * 0.587 + pixels[..., 2] * 0.114
    values = np.asarray(apply_modality_lut(pixels, ds), dtype=np.float32)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        values = values.max() + values.min() - values
    center, width = _window(ds, values)
    clipped = np.clip(np.rint(values), -32768, 32767).astype("<i2")
    return FramePixels(values=clipped, window_center=center, window_width=width)


def _window(ds: pydicom.Dataset, values: np.ndarray) -> tuple[float, float]:
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    try:
        c = float(center[0] if isinstance(center, pydicom.multival.MultiValue) else center)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if w > 0:
            return c, w
    except (TypeError, ValueError):
        pass
    lo, hi = np.percentile(values, [0.5, 99.5])
    return float((lo + hi) / 2), float(max(hi - lo, 1.0))
