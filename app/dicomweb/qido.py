"""QIDO-RS result objects (PS3.18 §10.6.3, Tables 10.6.3-3 / -4 / -5) as DICOM JSON.

The required return keys of each level, the attributes used as match keys, and ``includefield``
attributes: those the database holds, then the rest read from a stored header.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydicom import Dataset

from app.dicomweb.dicom_json import put, to_json
from app.dicomweb.query import QidoQuery
from app.dicomweb.service import (
    ACCESSION_NUMBER,
    BITS_ALLOCATED,
    COLUMNS,
    INSTANCE_AVAILABILITY,
    INSTANCE_NUMBER,
    MODALITIES_IN_STUDY,
    MODALITY,
    NUMBER_OF_FRAMES,
    NUMBER_OF_SERIES_RELATED_INSTANCES,
    NUMBER_OF_STUDY_RELATED_INSTANCES,
    NUMBER_OF_STUDY_RELATED_SERIES,
    PATIENT_BIRTH_DATE,
    PATIENT_ID,
    PATIENT_NAME,
    PATIENT_SEX,
    PPS_START_DATE,
    PPS_START_TIME,
    REFERRING_PHYSICIAN_NAME,
    RETRIEVE_URL,
    ROWS,
    SERIES_DESCRIPTION,
    SERIES_INSTANCE_UID,
    SERIES_NUMBER,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    SPECIFIC_CHARACTER_SET,
    STUDY_DATE,
    STUDY_DESCRIPTION,
    STUDY_ID,
    STUDY_INSTANCE_UID,
    STUDY_TIME,
    InstanceView,
    SeriesView,
    StudyView,
    Urls,
    header_attributes,
    header_summary,
)
from app.storage import BlobStore


def _study_attributes(ds: Dataset, view: StudyView, urls: Urls) -> None:
    study = view.record
    put(ds, SPECIFIC_CHARACTER_SET, "ISO_IR 192")  # JSON is Unicode (PS3.18 §F.2.1)
    put(ds, STUDY_DATE, study.study_date)
    put(ds, STUDY_TIME, study.study_time)
    put(ds, ACCESSION_NUMBER, study.accession_number)
    put(ds, INSTANCE_AVAILABILITY, "ONLINE")
    put(ds, MODALITIES_IN_STUDY, list(view.modalities) or None)
    put(ds, REFERRING_PHYSICIAN_NAME, study.referring_physician_name)
    put(ds, RETRIEVE_URL, urls.study(study.study_instance_uid), "UR")
    put(ds, PATIENT_NAME, study.patient_name)
    put(ds, PATIENT_ID, study.patient_id)
    put(ds, PATIENT_BIRTH_DATE, study.patient_birth_date)
    put(ds, PATIENT_SEX, study.patient_sex)
    put(ds, STUDY_INSTANCE_UID, study.study_instance_uid)
    put(ds, STUDY_ID, study.study_id)
    put(ds, NUMBER_OF_STUDY_RELATED_SERIES, view.series_count)
    put(ds, NUMBER_OF_STUDY_RELATED_INSTANCES, view.instance_count)


def _series_attributes(ds: Dataset, view: SeriesView | InstanceView, urls: Urls) -> None:
    put(ds, MODALITY, view.modality)
    put(ds, SERIES_INSTANCE_UID, view.series_instance_uid)
    put(ds, SERIES_NUMBER, view.series_number)
    put(ds, SERIES_DESCRIPTION, view.series_description)
    put(ds, PPS_START_DATE, None)
    put(ds, PPS_START_TIME, None)
    if isinstance(view, SeriesView):
        put(ds, NUMBER_OF_SERIES_RELATED_INSTANCES, view.instance_count)
        put(
            ds,
            RETRIEVE_URL,
            urls.series(view.study.study_instance_uid, view.series_instance_uid),
            "UR",
        )


def _known_values(view: StudyView | SeriesView | InstanceView) -> dict[int, Any]:
    study = view.record if isinstance(view, StudyView) else view.study
    return {STUDY_DESCRIPTION: study.study_description}


def _add_includes(
    ds: Dataset,
    query: QidoQuery,
    store: BlobStore,
    view: StudyView | SeriesView | InstanceView,
) -> None:
    """``includefield`` attributes: those we hold, then the rest from a stored header."""
    known = _known_values(view)
    wanted = set(query.include) | set(query.matchers)
    if query.include_all:
        wanted |= set(known)
    missing = []
    for tag in sorted(wanted):
        if tag in ds:
            continue
        if tag in known:
            put(ds, tag, known[tag])
        else:
            missing.append(tag)
    key = view.blob_key if isinstance(view, InstanceView) else view.sample_blob
    if missing and key:
        for elem in header_attributes(store, key, missing):
            ds.add(elem)


def study_results(
    *, views: Sequence[StudyView], query: QidoQuery, store: BlobStore, urls: Urls
) -> list[dict[str, Any]]:
    """DICOM JSON of a study search."""
    out = []
    for view in views:
        ds = Dataset()
        _study_attributes(ds, view, urls)
        _add_includes(ds, query, store, view)
        out.append(to_json(ds))
    return out


def series_results(
    *,
    views: Sequence[SeriesView],
    studies: dict[str, StudyView],
    query: QidoQuery,
    store: BlobStore,
    urls: Urls,
) -> list[dict[str, Any]]:
    """DICOM JSON of a series search (study attributes repeated for top-level searches)."""
    out = []
    for view in views:
        ds = Dataset()
        study = studies.get(view.study.study_instance_uid)
        if study is not None:
            _study_attributes(ds, study, urls)
        put(ds, STUDY_INSTANCE_UID, view.study.study_instance_uid)
        _series_attributes(ds, view, urls)
        _add_includes(ds, query, store, view)
        out.append(to_json(ds))
    return out


def instance_results(
    *,
    views: Sequence[InstanceView],
    studies: dict[str, StudyView],
    query: QidoQuery,
    store: BlobStore,
    urls: Urls,
) -> list[dict[str, Any]]:
    """DICOM JSON of an instance search (Table 10.6.3-5 plus study and series identity)."""
    out = []
    for view in views:
        ds = Dataset()
        study = studies.get(view.study.study_instance_uid)
        if study is not None:
            _study_attributes(ds, study, urls)
        put(ds, STUDY_INSTANCE_UID, view.study.study_instance_uid)
        _series_attributes(ds, view, urls)
        summary = header_summary(store, view.blob_key)
        put(ds, SOP_CLASS_UID, view.sop_class_uid)
        put(ds, SOP_INSTANCE_UID, view.sop_instance_uid)
        put(ds, INSTANCE_AVAILABILITY, "ONLINE")
        put(ds, INSTANCE_NUMBER, view.instance_number)
        put(ds, ROWS, view.rows)
        put(ds, COLUMNS, view.columns)
        put(ds, BITS_ALLOCATED, summary.bits_allocated)
        put(ds, NUMBER_OF_FRAMES, view.frames)
        put(
            ds,
            RETRIEVE_URL,
            urls.instance(
                view.study.study_instance_uid, view.series_instance_uid, view.sop_instance_uid
            ),
            "UR",
        )
        _add_includes(ds, query, store, view)
        out.append(to_json(ds))
    return out


def page(items: Sequence[Any], query: QidoQuery) -> list[Any]:
    """``offset``/``limit`` over an in-memory result list."""
    return list(items[query.offset : query.offset + query.limit])
