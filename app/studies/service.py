"""Ingest: validate each file from its header, store it durably, record it, create jobs.

Services receive a session and never commit: the caller's unit of work commits the rows after
every blob is fsynced, and the jobs are sent to the queue only after that commit.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth.service import Principal
from app.db.records import (
    InstanceRecord,
    JobRecord,
    JobStatus,
    SeriesRecord,
    StudyRecord,
    utcnow,
)
from app.deid import ingest_deidentifier
from app.errors import IngestRejected, MedcadError
from app.queue_hooks import enqueue_after_commit
from app.registry.service import RegisteredModel
from app.storage import BlobStore, sha256_hex
from app.studies.validation import (
    IngestLimits,
    InspectedInstance,
    inspect_instance,
    iter_zip_members,
)


@dataclass(frozen=True)
class UploadedFile:
    """One part of an upload: its client-side name and its bytes."""

    filename: str
    data: bytes


@dataclass
class FileOutcome:
    """What happened to one file (or zip member)."""

    filename: str
    outcome: str  # stored | duplicate | rejected
    sop_instance_uid: str | None = None
    series_instance_uid: str | None = None
    study_instance_uid: str | None = None  # as stored (after de-identification, if enabled)
    error: str | None = None
    detail: str | None = None
    status: int | None = None


@dataclass(frozen=True)
class CreatedJob:
    """A job created by an upload."""

    id: str
    series_instance_uid: str
    status: str


@dataclass
class IngestResult:
    """The outcome of one upload request."""

    files: list[FileOutcome] = field(default_factory=list)
    jobs: list[CreatedJob] = field(default_factory=list)

    @property
    def stored(self) -> int:
        return sum(1 for f in self.files if f.outcome == "stored")

    @property
    def duplicates(self) -> int:
        return sum(1 for f in self.files if f.outcome == "duplicate")

    @property
    def rejected(self) -> list[FileOutcome]:
        return [f for f in self.files if f.outcome == "rejected"]

    @property
    def error_status(self) -> int | None:
        """The status to answer when nothing was accepted (409 if all conflicts, else 422...)."""
        if self.stored or self.duplicates:
            return None
        statuses = {f.status or 422 for f in self.rejected}
        if not statuses:
            return 400
        return statuses.pop() if len(statuses) == 1 else 422


_STUDY_ATTRS = {
    "patient_name": "PatientName",
    "patient_id": "PatientID",
    "patient_birth_date": "PatientBirthDate",
    "patient_sex": "PatientSex",
    "study_date": "StudyDate",
    "study_time": "StudyTime",
    "study_id": "StudyID",
    "accession_number": "AccessionNumber",
    "study_description": "StudyDescription",
    "referring_physician_name": "ReferringPhysicianName",
}


def _study_attributes(data: bytes) -> dict[str, str | None]:
    """Study-level attributes for the study record (QIDO-RS match keys); header only."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            stop_before_pixels=True,
            force=True,
            specific_tags=list(_STUDY_ATTRS.values()),
        )
    except (InvalidDicomError, ValueError, EOFError, OSError):
        return {}
    values: dict[str, str | None] = {}
    for column, keyword in _STUDY_ATTRS.items():
        value = ds.get(keyword)
        text = str(value) if value is not None and str(value) != "" else None
        limit = getattr(StudyRecord.__table__.c[column].type, "length", None)
        values[column] = text[:limit] if text and limit else text
    return values


def expand_upload(
    files: list[UploadedFile], limits: IngestLimits
) -> list[UploadedFile | FileOutcome]:
    """Expand zip archives into their members; a broken archive becomes a rejection."""
    expanded: list[UploadedFile | FileOutcome] = []
    for item in files:
        # A zip archive starts with a local file header; DICOM never does (preamble or raw data
        # set). Testing the start, not the end, keeps a DICOM file with a zip appended a DICOM file.
        if item.data[:4] != b"PK\x03\x04":
            expanded.append(item)
            continue
        try:
            for name, member in iter_zip_members(item.data, limits=limits):
                expanded.append(UploadedFile(filename=f"{item.filename}/{name}", data=member))
        except MedcadError as exc:
            expanded.append(_rejection(item.filename, exc))
    return expanded


def _rejection(filename: str, exc: MedcadError) -> FileOutcome:
    return FileOutcome(
        filename=filename, outcome="rejected", error=exc.code, detail=exc.detail, status=exc.status
    )


def _get_or_create_series(
    session: Session, inspected: InspectedInstance, data: bytes
) -> SeriesRecord:
    series = session.scalar(
        select(SeriesRecord).where(
            SeriesRecord.series_instance_uid == inspected.series_instance_uid
        )
    )
    if series is not None:
        return series
    study = session.scalar(
        select(StudyRecord).where(StudyRecord.study_instance_uid == inspected.study_instance_uid)
    )
    if study is None:
        study = StudyRecord(
            study_instance_uid=inspected.study_instance_uid, **_study_attributes(data)
        )
        session.add(study)
        session.flush()
    series = SeriesRecord(
        study_id=study.id,
        series_instance_uid=inspected.series_instance_uid,
        modality=inspected.modality,
        series_number=inspected.series_number,
        series_description=(inspected.series_description or None),
    )
    session.add(series)
    session.flush()
    return series


def _slice_position(inspected: InspectedInstance) -> float | None:
    pos, ori = inspected.image_position_patient, inspected.image_orientation_patient
    if pos is None or ori is None or len(pos) != 3 or len(ori) != 6:
        return None
    row, col = ori[:3], ori[3:]
    normal = (
        row[1] * col[2] - row[2] * col[1],
        row[2] * col[0] - row[0] * col[2],
        row[0] * col[1] - row[1] * col[0],
    )
    return float(sum(p * n for p, n in zip(pos, normal, strict=True)))


def store_instance(
    *, session: Session, store: BlobStore, item: UploadedFile, limits: IngestLimits
) -> tuple[FileOutcome, SeriesRecord | None]:
    """Validate, store and record one file; returns its outcome and (if new) its series."""
    try:
        inspected = inspect_instance(item.data, limits=limits)
        if (deidentify := ingest_deidentifier()) is not None:
            # validated, de-identified, validated again: what is stored is what was checked
            inspected = inspect_instance(deidentify(inspected.normalized_bytes), limits=limits)
    except MedcadError as exc:
        return _rejection(item.filename, exc), None
    data = inspected.normalized_bytes
    digest = sha256_hex(data)
    existing = session.scalar(
        select(InstanceRecord).where(InstanceRecord.sop_instance_uid == inspected.sop_instance_uid)
    )
    outcome = FileOutcome(
        filename=item.filename,
        outcome="stored",
        sop_instance_uid=inspected.sop_instance_uid,
        series_instance_uid=inspected.series_instance_uid,
        study_instance_uid=inspected.study_instance_uid,
    )
    if existing is not None:
        if existing.blob_sha256 == digest:
            outcome.outcome = "duplicate"
            return outcome, None
        outcome.outcome, outcome.error, outcome.status = "rejected", "conflict", 409
        outcome.detail = f"SOP Instance UID {inspected.sop_instance_uid} is already stored with different content"
        return outcome, None
    store.put(data)  # durable before the row that names it can commit
    series = _get_or_create_series(session, inspected, data)
    session.add(
        InstanceRecord(
            series_id=series.id,
            sop_instance_uid=inspected.sop_instance_uid,
            sop_class_uid=inspected.sop_class_uid,
            transfer_syntax_uid=inspected.transfer_syntax_uid,
            blob_sha256=digest,
            size_bytes=len(data),
            rows=inspected.rows,
            columns=inspected.columns,
            frames=inspected.frames,
            instance_number=inspected.instance_number,
            slice_position=_slice_position(inspected),
            geometry=_geometry(inspected),
        )
    )
    session.flush()
    return outcome, series


def _geometry(inspected: InspectedInstance) -> dict[str, Any] | None:
    position, orientation = inspected.image_position_patient, inspected.image_orientation_patient
    if position is None and inspected.pixel_spacing is None:
        return None
    return {
        "image_position": list(position) if position else None,
        "image_orientation": list(orientation) if orientation else None,
        "pixel_spacing": list(inspected.pixel_spacing) if inspected.pixel_spacing else None,
    }


def ingest_files(
    *,
    session: Session,
    store: BlobStore,
    files: list[UploadedFile],
    models: list[RegisteredModel],
    principal: Principal | None,
    limits: IngestLimits,
    callback_url: str | None = None,
    options: dict[str, Any] | None = None,
) -> IngestResult:
    """Ingest an upload: one job per series that received new instances, sent after commit."""
    result = IngestResult()
    new_by_series: dict[str, tuple[SeriesRecord, int]] = {}
    for item in expand_upload(files, limits):
        if isinstance(item, FileOutcome):
            result.files.append(item)
            continue
        outcome, series = store_instance(session=session, store=store, item=item, limits=limits)
        result.files.append(outcome)
        if series is not None:
            _, count = new_by_series.get(series.id, (series, 0))
            new_by_series[series.id] = (series, count + 1)
    model_keys = [m.manifest.key for m in models]
    for series, _new in new_by_series.values():
        job = JobRecord(
            series_id=series.id,
            status=JobStatus.QUEUED,
            models=model_keys,
            options=options or {},
            created_by=principal.key_id if principal else None,
            callback_url=callback_url,
            webhook_status="pending" if callback_url else None,
            instance_count=_count_instances(session, series.id),
            enqueued_at=utcnow(),
        )
        session.add(job)
        session.flush()
        enqueue_after_commit(session, job.id)
        result.jobs.append(CreatedJob(job.id, series.series_instance_uid, job.status))
    return result


def _count_instances(session: Session, series_id: str) -> int:
    from sqlalchemy import func

    return int(
        session.scalar(
            select(func.count())
            .select_from(InstanceRecord)
            .where(InstanceRecord.series_id == series_id)
        )
        or 0
    )


def reject_unknown(filename: str, detail: str) -> FileOutcome:
    """A rejection for a part that could not even be read."""
    return _rejection(filename, IngestRejected("bad_part", detail, status=400))
