"""DICOMweb read models: source and result objects as one study, and QIDO-RS (PS3.18 §10.6).

Two kinds of instances live in a study: the source instances (InstanceRecord rows, stored by
ingest) and the result objects a job produced (SEG, SR and Parametric Map ArtifactRecords, each
in its own new series of the source study). Both are presented as one study here: result
series have the modality of their object (SEG, SR, OT for a Parametric Map) and the attributes
the database does not hold (series number, SOP class, rows, ...) come from the stored header.

QIDO-RS answers are built in :mod:`app.dicomweb.qido`, WADO-RS (:mod:`app.dicomweb.wado`)
resolves instances through the same views, and STOW-RS lives in
:mod:`app.dicomweb.stow`. Services receive a session and never commit; the route's unit of work
commits, including the audit event of every access to patient data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any, Final

import pydicom
from pydicom import Dataset
from sqlalchemy import ColumnElement, Select, exists, false, func, or_, select
from sqlalchemy.orm import Session

from app.db.records import (
    ArtifactRecord,
    InstanceRecord,
    JobRecord,
    SeriesRecord,
    StudyRecord,
)
from app.dicomweb.dicom_json import (
    BULK_VRS,
)
from app.dicomweb.query import Matcher, QidoQuery
from app.dicomweb.transcode import (
    EXPLICIT_VR_LITTLE_ENDIAN,
)
from app.errors import MedcadError
from app.storage import BlobStore

KIND_MODALITY: Final[dict[str, str]] = {"seg": "SEG", "sr": "SR", "pmap": "OT"}
DICOM_MEDIA_TYPE: Final = "application/dicom"
# A search that would have to look at more rows than this is refused as too broad (413).
MAX_CANDIDATES: Final = 20_000

# Tags (named once so the builders below read like the PS3.18 tables they follow).
SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
STUDY_DATE = 0x00080020
STUDY_TIME = 0x00080030
ACCESSION_NUMBER = 0x00080050
INSTANCE_AVAILABILITY = 0x00080056
MODALITY = 0x00080060
MODALITIES_IN_STUDY = 0x00080061
REFERRING_PHYSICIAN_NAME = 0x00080090
STUDY_DESCRIPTION = 0x00081030
SERIES_DESCRIPTION = 0x0008103E
RETRIEVE_URL = 0x00081190
PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
PATIENT_BIRTH_DATE = 0x00100030
PATIENT_SEX = 0x00100040
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
STUDY_ID = 0x00200010
SERIES_NUMBER = 0x00200011
INSTANCE_NUMBER = 0x00200013
NUMBER_OF_STUDY_RELATED_SERIES = 0x00201206
NUMBER_OF_STUDY_RELATED_INSTANCES = 0x00201208
NUMBER_OF_SERIES_RELATED_INSTANCES = 0x00201209
NUMBER_OF_FRAMES = 0x00280008
ROWS = 0x00280010
COLUMNS = 0x00280011
BITS_ALLOCATED = 0x00280100
PPS_START_DATE = 0x00400244
PPS_START_TIME = 0x00400245
REQUEST_ATTRIBUTE_SEQUENCE = 0x00400275

_STUDY_COLUMNS: Final[dict[int, Any]] = {
    STUDY_INSTANCE_UID: StudyRecord.study_instance_uid,
    PATIENT_ID: StudyRecord.patient_id,
    PATIENT_NAME: StudyRecord.patient_name,
    PATIENT_BIRTH_DATE: StudyRecord.patient_birth_date,
    PATIENT_SEX: StudyRecord.patient_sex,
    STUDY_DATE: StudyRecord.study_date,
    STUDY_TIME: StudyRecord.study_time,
    ACCESSION_NUMBER: StudyRecord.accession_number,
    REFERRING_PHYSICIAN_NAME: StudyRecord.referring_physician_name,
    STUDY_ID: StudyRecord.study_id,
    STUDY_DESCRIPTION: StudyRecord.study_description,
}


# ---------------------------------------------------------------------------------------
# Stored headers (result objects carry attributes the database does not hold)
# ---------------------------------------------------------------------------------------

_SUMMARY_TAGS: Final = [
    SOP_CLASS_UID, MODALITY, SERIES_DESCRIPTION, SERIES_NUMBER, INSTANCE_NUMBER,
    NUMBER_OF_FRAMES, ROWS, COLUMNS, BITS_ALLOCATED,
]  # fmt: skip


@dataclass(frozen=True)
class HeaderSummary:
    """The few header attributes QIDO needs from a stored object."""

    transfer_syntax_uid: str
    sop_class_uid: str
    modality: str | None
    series_description: str | None
    series_number: int | None
    instance_number: int | None
    frames: int
    rows: int | None
    columns: int | None
    bits_allocated: int | None


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


@lru_cache(maxsize=16_384)
def _summary_at(path: str) -> HeaderSummary:
    # Keyed by the blob path, which is the content hash: a stored blob never changes.
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_SUMMARY_TAGS)
    return HeaderSummary(
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT_VR_LITTLE_ENDIAN)),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        modality=str(ds.get("Modality", "")) or None,
        series_description=str(ds.get("SeriesDescription", "")) or None,
        series_number=_int_or_none(ds.get("SeriesNumber")),
        instance_number=_int_or_none(ds.get("InstanceNumber")),
        frames=_int_or_none(ds.get("NumberOfFrames")) or 1,
        rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        bits_allocated=_int_or_none(ds.get("BitsAllocated")),
    )


def header_summary(store: BlobStore, key: str) -> HeaderSummary:
    """The header summary of a stored blob (cached: blobs are immutable)."""
    return _summary_at(str(store.path_for(key)))


def header_attributes(store: BlobStore, key: str, tags: Iterable[int]) -> Dataset:
    """Requested top-level attributes from a stored header (``includefield``), bulk excluded."""
    wanted = sorted(set(tags))
    out = Dataset()
    if not wanted:
        return out
    ds = pydicom.dcmread(store.path_for(key), stop_before_pixels=True, specific_tags=wanted)
    for tag in wanted:
        if tag in ds and ds[tag].VR not in BULK_VRS:
            out.add(ds[tag])
    return out


# ---------------------------------------------------------------------------------------
# Views
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StudyView:
    """A study row with what QIDO computes from its series and results."""

    record: StudyRecord
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
    sample_blob: str | None  # one instance's blob, for includefield attributes


@dataclass(frozen=True)
class SeriesView:
    """A source series or a result series, uniformly."""

    study: StudyRecord
    series_instance_uid: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_count: int
    is_result: bool
    created_at: datetime
    sample_blob: str | None


@dataclass(frozen=True)
class InstanceView:
    """A source instance or a result object, uniformly."""

    study: StudyRecord
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    blob_key: str
    modality: str | None
    series_number: int | None
    series_description: str | None
    instance_number: int | None
    rows: int | None
    columns: int | None
    frames: int
    is_result: bool
    # (source 0 / result 1, series created, series UID, slice position, number, SOP UID)
    order: tuple[Any, ...] = field(compare=False)


@dataclass(frozen=True)
class Urls:
    """Absolute DICOMweb URLs under the service root (for RetrieveURL)."""

    root: str

    def study(self, study: str) -> str:
        return f"{self.root}/studies/{study}"

    def series(self, study: str, series: str) -> str:
        return f"{self.study(study)}/series/{series}"

    def instance(self, study: str, series: str, instance: str) -> str:
        return f"{self.series(study, series)}/instances/{instance}"


# ---------------------------------------------------------------------------------------
# Database queries
# ---------------------------------------------------------------------------------------


def _study_conditions(query: QidoQuery) -> list[ColumnElement[bool]]:
    """SQL conditions on StudyRecord for the study-level match keys of ``query``."""
    conditions: list[ColumnElement[bool]] = []
    for tag, matcher in query.matchers.items():
        if matcher.universal:
            continue
        column = _STUDY_COLUMNS.get(tag)
        if column is not None:
            conditions.append(matcher.sql(column))
        elif tag == MODALITIES_IN_STUDY:
            conditions.append(_modalities_condition(matcher))
    return conditions


def _kinds_matching(matcher: Matcher) -> list[str]:
    return [kind for kind, modality in KIND_MODALITY.items() if matcher.test(modality)]


def _modalities_condition(matcher: Matcher) -> ColumnElement[bool]:
    """ModalitiesInStudy: some source series or some result object has a matching modality."""
    source = exists(
        select(SeriesRecord.id).where(
            SeriesRecord.study_id == StudyRecord.id, matcher.sql(SeriesRecord.modality)
        )
    )
    kinds = _kinds_matching(matcher)
    if not kinds:
        return source
    result = exists(
        select(ArtifactRecord.id)
        .join(JobRecord, JobRecord.id == ArtifactRecord.job_id)
        .join(SeriesRecord, SeriesRecord.id == JobRecord.series_id)
        .where(SeriesRecord.study_id == StudyRecord.id, ArtifactRecord.kind.in_(kinds))
    )
    return or_(source, result)


def _result_artifacts() -> Select[ArtifactRecord, StudyRecord]:
    """Result objects with their source study (DICOM artifacts only)."""
    return (
        select(ArtifactRecord, StudyRecord)
        .join(JobRecord, JobRecord.id == ArtifactRecord.job_id)
        .join(SeriesRecord, SeriesRecord.id == JobRecord.series_id)
        .join(StudyRecord, StudyRecord.id == SeriesRecord.study_id)
        .where(
            ArtifactRecord.kind.in_(list(KIND_MODALITY)),
            ArtifactRecord.media_type == DICOM_MEDIA_TYPE,
            ArtifactRecord.sop_instance_uid.is_not(None),
            ArtifactRecord.series_instance_uid.is_not(None),
        )
    )


def _capped(session: Session, stmt: Select[*tuple[Any, ...]]) -> list[Any]:
    rows = list(session.execute(stmt.limit(MAX_CANDIDATES + 1)).tuples())
    if len(rows) > MAX_CANDIDATES:
        raise MedcadError(
            "query_too_broad",
            f"the search matches more than {MAX_CANDIDATES} objects; add match keys",
            status=413,
        )
    return rows


@dataclass(frozen=True)
class Scope:
    """Path-level restrictions of a search or retrieval."""

    study: str | None = None
    series: str | None = None
    instance: str | None = None


def _uid_condition(column: Any, path_value: str | None, matcher: Matcher | None) -> list[Any]:
    conditions = []
    if path_value is not None:
        conditions.append(column == path_value)
    if matcher is not None and not matcher.universal:
        conditions.append(matcher.sql(column))
    return conditions


def _source_series_rows(
    session: Session, query: QidoQuery, scope: Scope
) -> list[tuple[SeriesRecord, StudyRecord, int, str | None]]:
    count = (
        select(func.count(InstanceRecord.id))
        .where(InstanceRecord.series_id == SeriesRecord.id)
        .scalar_subquery()
    )
    sample = (
        select(func.min(InstanceRecord.blob_sha256))
        .where(InstanceRecord.series_id == SeriesRecord.id)
        .scalar_subquery()
    )
    stmt = (
        select(SeriesRecord, StudyRecord, count, sample)
        .join(StudyRecord, StudyRecord.id == SeriesRecord.study_id)
        .where(
            *_study_conditions(query),
            *_uid_condition(StudyRecord.study_instance_uid, scope.study, None),
            *_uid_condition(
                SeriesRecord.series_instance_uid,
                scope.series,
                query.matcher(SERIES_INSTANCE_UID),
            ),
        )
        .order_by(SeriesRecord.created_at, SeriesRecord.id)
    )
    modality = query.matcher(MODALITY)
    if modality is not None and not modality.universal:
        stmt = stmt.where(modality.sql(SeriesRecord.modality))
    return [(s, st, int(n or 0), b) for s, st, n, b in _capped(session, stmt)]


def _result_rows(
    session: Session, query: QidoQuery, scope: Scope
) -> list[tuple[ArtifactRecord, StudyRecord]]:
    stmt = _result_artifacts().where(
        *_study_conditions(query),
        *_uid_condition(StudyRecord.study_instance_uid, scope.study, None),
        *_uid_condition(
            ArtifactRecord.series_instance_uid, scope.series, query.matcher(SERIES_INSTANCE_UID)
        ),
        *_uid_condition(
            ArtifactRecord.sop_instance_uid, scope.instance, query.matcher(SOP_INSTANCE_UID)
        ),
    )
    modality = query.matcher(MODALITY)
    if modality is not None and not modality.universal:
        kinds = _kinds_matching(modality)
        stmt = stmt.where(ArtifactRecord.kind.in_(kinds) if kinds else false())
    stmt = stmt.order_by(ArtifactRecord.created_at, ArtifactRecord.id)
    return [(a, st) for a, st in _capped(session, stmt)]


# ---------------------------------------------------------------------------------------
# Views from rows
# ---------------------------------------------------------------------------------------


def _result_instance(
    store: BlobStore, artifact: ArtifactRecord, study: StudyRecord
) -> InstanceView:
    summary = header_summary(store, artifact.blob_sha256)
    assert artifact.sop_instance_uid is not None and artifact.series_instance_uid is not None
    return InstanceView(
        study=study,
        series_instance_uid=artifact.series_instance_uid,
        sop_instance_uid=artifact.sop_instance_uid,
        sop_class_uid=summary.sop_class_uid,
        transfer_syntax_uid=summary.transfer_syntax_uid,
        blob_key=artifact.blob_sha256,
        modality=KIND_MODALITY.get(artifact.kind, summary.modality),
        series_number=summary.series_number,
        series_description=summary.series_description,
        instance_number=summary.instance_number,
        rows=summary.rows,
        columns=summary.columns,
        frames=summary.frames,
        is_result=True,
        order=(
            1,
            _aware(artifact.created_at),
            artifact.series_instance_uid,
            0.0,
            summary.instance_number or 0,
            artifact.sop_instance_uid,
        ),
    )


def _source_instance(
    instance: InstanceRecord, series: SeriesRecord, study: StudyRecord
) -> InstanceView:
    return InstanceView(
        study=study,
        series_instance_uid=series.series_instance_uid,
        sop_instance_uid=instance.sop_instance_uid,
        sop_class_uid=instance.sop_class_uid,
        transfer_syntax_uid=instance.transfer_syntax_uid,
        blob_key=instance.blob_sha256,
        modality=series.modality,
        series_number=series.series_number,
        series_description=series.series_description,
        instance_number=instance.instance_number,
        rows=instance.rows,
        columns=instance.columns,
        frames=instance.frames,
        is_result=False,
        order=(
            0,
            _aware(series.created_at),
            series.series_instance_uid,
            instance.slice_position if instance.slice_position is not None else 0.0,
            instance.instance_number or 0,
            instance.sop_instance_uid,
        ),
    )


def _series_matches(query: QidoQuery, view: SeriesView | InstanceView) -> bool:
    checks = (
        (MODALITY, view.modality),
        (SERIES_NUMBER, view.series_number),
        (SERIES_DESCRIPTION, view.series_description),
    )
    return all(
        query.matcher(tag) is None or query.matchers[tag].test(value) for tag, value in checks
    )


def _instance_matches(query: QidoQuery, view: InstanceView) -> bool:
    checks = (
        (SOP_CLASS_UID, view.sop_class_uid),
        (SOP_INSTANCE_UID, view.sop_instance_uid),
        (INSTANCE_NUMBER, view.instance_number),
    )
    return _series_matches(query, view) and all(
        query.matcher(tag) is None or query.matchers[tag].test(value) for tag, value in checks
    )


def find_series(
    *, session: Session, store: BlobStore, query: QidoQuery, scope: Scope
) -> list[SeriesView]:
    """Source and result series matching ``query`` within ``scope``, in creation order."""
    views: list[SeriesView] = [
        SeriesView(
            study=study,
            series_instance_uid=series.series_instance_uid,
            modality=series.modality,
            series_number=series.series_number,
            series_description=series.series_description,
            instance_count=count,
            is_result=False,
            created_at=series.created_at,
            sample_blob=sample,
        )
        for series, study, count, sample in _source_series_rows(session, query, scope)
    ]
    grouped: dict[str, list[InstanceView]] = defaultdict(list)
    created: dict[str, datetime] = {}
    for artifact, study in _result_rows(session, query, Scope(scope.study, scope.series)):
        uid = str(artifact.series_instance_uid)
        grouped[uid].append(_result_instance(store, artifact, study))
        created[uid] = min(created.get(uid, artifact.created_at), artifact.created_at)
    for uid, members in grouped.items():
        first = members[0]
        views.append(
            SeriesView(
                study=first.study,
                series_instance_uid=uid,
                modality=first.modality,
                series_number=first.series_number,
                series_description=first.series_description,
                instance_count=len(members),
                is_result=True,
                created_at=created[uid],
                sample_blob=first.blob_key,
            )
        )
    matching = [v for v in views if _series_matches(query, v)]
    return sorted(
        matching, key=lambda v: (v.is_result, _aware(v.created_at), v.series_instance_uid)
    )


def _aware(value: datetime) -> datetime:
    # SQLite hands back naive datetimes; everything medcad stores is UTC.
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def find_instances(
    *, session: Session, store: BlobStore, query: QidoQuery, scope: Scope
) -> list[InstanceView]:
    """Source instances and result objects matching ``query`` within ``scope``."""
    stmt = (
        select(InstanceRecord, SeriesRecord, StudyRecord)
        .join(SeriesRecord, SeriesRecord.id == InstanceRecord.series_id)
        .join(StudyRecord, StudyRecord.id == SeriesRecord.study_id)
        .where(
            *_study_conditions(query),
            *_uid_condition(StudyRecord.study_instance_uid, scope.study, None),
            *_uid_condition(
                SeriesRecord.series_instance_uid, scope.series, query.matcher(SERIES_INSTANCE_UID)
            ),
            *_uid_condition(
                InstanceRecord.sop_instance_uid, scope.instance, query.matcher(SOP_INSTANCE_UID)
            ),
        )
    )
    modality = query.matcher(MODALITY)
    if modality is not None and not modality.universal:
        stmt = stmt.where(modality.sql(SeriesRecord.modality))
    views = [_source_instance(i, se, st) for i, se, st in _capped(session, stmt)]
    views += [_result_instance(store, a, st) for a, st in _result_rows(session, query, scope)]
    matching = [v for v in views if _instance_matches(query, v)]
    return sorted(matching, key=_instance_order)


def _instance_order(view: InstanceView) -> tuple[Any, ...]:
    return (_aware(view.study.created_at), view.study.study_instance_uid, *view.order)


def find_studies(*, session: Session, query: QidoQuery) -> list[StudyView]:
    """One page of studies matching ``query`` (paged in the database)."""
    stmt = (
        select(StudyRecord)
        .where(*_study_conditions(query))
        .order_by(StudyRecord.created_at, StudyRecord.id)
        .offset(query.offset)
        .limit(query.limit)
    )
    studies = list(session.scalars(stmt))
    return _with_study_stats(session, studies)


def _with_study_stats(session: Session, studies: Sequence[StudyRecord]) -> list[StudyView]:
    ids = [s.id for s in studies]
    if not ids:
        return []
    modalities: dict[str, set[str]] = defaultdict(set)
    series_uids: dict[str, set[str]] = defaultdict(set)
    instances: dict[str, int] = defaultdict(int)
    samples: dict[str, str] = {}
    source = session.execute(
        select(
            SeriesRecord.study_id,
            SeriesRecord.series_instance_uid,
            SeriesRecord.modality,
            func.count(InstanceRecord.id),
            func.min(InstanceRecord.blob_sha256),
        )
        .join(InstanceRecord, InstanceRecord.series_id == SeriesRecord.id)
        .where(SeriesRecord.study_id.in_(ids))
        .group_by(SeriesRecord.study_id, SeriesRecord.series_instance_uid, SeriesRecord.modality)
    ).tuples()
    for study_id, series_uid, modality, count, sample in source:
        if modality:
            modalities[study_id].add(modality)
        series_uids[study_id].add(series_uid)
        instances[study_id] += int(count)
        samples.setdefault(study_id, sample)
    results = session.execute(
        select(SeriesRecord.study_id, ArtifactRecord.kind, ArtifactRecord.series_instance_uid)
        .join(JobRecord, JobRecord.id == ArtifactRecord.job_id)
        .join(SeriesRecord, SeriesRecord.id == JobRecord.series_id)
        .where(
            SeriesRecord.study_id.in_(ids),
            ArtifactRecord.kind.in_(list(KIND_MODALITY)),
            ArtifactRecord.media_type == DICOM_MEDIA_TYPE,
            ArtifactRecord.series_instance_uid.is_not(None),
        )
    ).tuples()
    for study_id, kind, result_series in results:
        modalities[study_id].add(KIND_MODALITY[kind])
        series_uids[study_id].add(str(result_series))
        instances[study_id] += 1
    return [
        StudyView(
            record=s,
            modalities=tuple(sorted(modalities[s.id])),
            series_count=len(series_uids[s.id]),
            instance_count=instances[s.id],
            sample_blob=samples.get(s.id),
        )
        for s in studies
    ]


def study_views_for(session: Session, study_uids: Iterable[str]) -> dict[str, StudyView]:
    """Study views by UID (for series/instance results that repeat study attributes)."""
    uids = sorted(set(study_uids))
    if not uids:
        return {}
    studies = list(
        session.scalars(select(StudyRecord).where(StudyRecord.study_instance_uid.in_(uids)))
    )
    return {v.record.study_instance_uid: v for v in _with_study_stats(session, studies)}
