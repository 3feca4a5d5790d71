"""STOW-RS (PS3.18 §10.5) over the one ingest path, answered with the Store Instances
Response Module (PS3.18 Annex I)."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom import Dataset
from sqlalchemy.orm import Session

from app.auth.service import Principal, record_audit
from app.dicomweb import status as dicom_status
from app.dicomweb.dicom_json import referenced_item, store_response
from app.dicomweb.service import (
    DICOM_MEDIA_TYPE,
    SOP_CLASS_UID,
    SOP_INSTANCE_UID,
    STUDY_INSTANCE_UID,
    Urls,
)
from app.errors import BadRequest
from app.registry.service import RegisteredModel
from app.storage import BlobStore
from app.studies.service import CreatedJob, UploadedFile, ingest_files
from app.studies.validation import IngestLimits


@dataclass(frozen=True)
class StowPart:
    """One part of a STOW-RS request."""

    content_type: str
    data: bytes


@dataclass
class StowOutcome:
    """The answer to a STOW-RS request: HTTP status, response module, jobs."""

    status: int
    body: dict[str, Any]
    jobs: list[CreatedJob]
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    outcomes: list[str] = field(default_factory=list)  # per part: stored|duplicate|<error code>


@dataclass
class _Identity:
    sop_class_uid: str | None = None
    sop_instance_uid: str | None = None
    study_instance_uid: str | None = None


def _identify(data: bytes) -> _Identity:
    """The identity of a part from its header, for the response (never trusted for storage)."""
    try:
        ds = pydicom.dcmread(
            io.BytesIO(data),
            force=True,
            stop_before_pixels=True,
            specific_tags=[SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_INSTANCE_UID],
        )
        values = [
            str(ds.get(k, "") or "").strip() or None
            for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")
        ]
    except Exception:  # any part may be garbage; it then fails with 0xC000 below
        return _Identity()
    return _Identity(*values)


def _part_failure(part: StowPart, identity: _Identity, study: str | None) -> str | None:
    """A failure code decided before ingest (wrong part type, archive, study mismatch)."""
    if part.content_type not in ("", DICOM_MEDIA_TYPE):
        return "bad_part"
    if zipfile.is_zipfile(io.BytesIO(part.data)):
        return "bad_part"  # an archive is not application/dicom (the REST upload takes them)
    if study is not None and identity.study_instance_uid not in (None, study):
        return "study_uid_mismatch"
    return None


def store_instances(
    *,
    session: Session,
    store: BlobStore,
    parts: Sequence[StowPart],
    models: list[RegisteredModel],
    principal: Principal,
    client: str | None,
    limits: IngestLimits,
    urls: Urls,
    study_instance_uid: str | None = None,
) -> StowOutcome:
    """Store the parts through the one ingest path and build the Store Instances Response.

    Status (PS3.18 Table 10.5.3-1): 200 all stored (duplicates of identical bytes count as
    stored), 202 some failed, 409 none stored for reasons of content (conflict, unsupported
    class, Study UID mismatch), 400 none stored because no part could be understood.
    """
    if not parts:
        raise BadRequest("no_parts", "the multipart body has no parts")
    identities = [_identify(p.data) for p in parts]
    early = [
        _part_failure(p, i, study_instance_uid) for p, i in zip(parts, identities, strict=True)
    ]
    files = [
        UploadedFile(filename=f"part-{n}", data=p.data)
        for n, (p, failure) in enumerate(zip(parts, early, strict=True))
        if failure is None
    ]
    result = ingest_files(
        session=session, store=store, files=files, models=models, principal=principal, limits=limits
    )
    by_name = {f.filename: f for f in result.files}
    referenced, failed, outcomes = [], [], []
    studies: set[str] = set()
    for n, (identity, failure) in enumerate(zip(identities, early, strict=True)):
        outcome = by_name.get(f"part-{n}")
        code = failure or (outcome.error if outcome and outcome.outcome == "rejected" else None)
        if outcome is None and failure is None:
            code = "bad_part"
        if code is not None:
            failed.append(
                referenced_item(
                    identity.sop_class_uid,
                    identity.sop_instance_uid,
                    failure_reason=dicom_status.failure_status(code),
                )
            )
            outcomes.append(code)
            continue
        assert outcome is not None and outcome.sop_instance_uid and outcome.series_instance_uid
        # the stored instance's Study UID: with de-identification on ingest it is not the one
        # the sender wrote, and neither the response nor the audit trail may carry that one
        study = outcome.study_instance_uid or study_instance_uid or ""
        studies.add(study)
        referenced.append(
            referenced_item(
                identity.sop_class_uid,
                outcome.sop_instance_uid,
                retrieve_url=urls.instance(
                    study, outcome.series_instance_uid, outcome.sop_instance_uid
                ),
            )
        )
        outcomes.append(outcome.outcome)
    _audit_stow(session, principal, client, result.jobs, studies, len(referenced))
    retrieve = (next(iter(studies)) if len(studies) == 1 else None) or study_instance_uid
    body = store_response(urls.study(retrieve) if retrieve else None, referenced, failed)
    return StowOutcome(
        status=_stow_status(len(referenced), failed),
        body=body,
        jobs=result.jobs,
        stored=result.stored,
        duplicates=result.duplicates,
        failed=len(failed),
        outcomes=outcomes,
    )


def _stow_status(stored: int, failed: list[Dataset]) -> int:
    if stored and not failed:
        return 200
    if stored:
        return 202
    reasons = {int(item.FailureReason) for item in failed}
    return 400 if reasons <= dicom_status.SYNTAX_FAILURES else 409


def _audit_stow(
    session: Session,
    principal: Principal,
    client: str | None,
    jobs: list[CreatedJob],
    studies: set[str],
    stored: int,
) -> None:
    study = next(iter(studies)) if len(studies) == 1 else None
    for job in jobs:
        record_audit(
            session=session,
            principal=principal,
            action="upload",
            resource=f"job/{job.id}",
            client=client,
            study_instance_uid=study,
            series_instance_uid=job.series_instance_uid,
            detail="STOW-RS",
        )
    if not jobs:
        record_audit(
            session=session,
            principal=principal,
            action="upload",
            resource="dicomweb/studies",
            client=client,
            study_instance_uid=study,
            outcome="success" if stored else "rejected",
            detail="STOW-RS",
        )
