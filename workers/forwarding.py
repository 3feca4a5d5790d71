"""Forward a succeeded job's result objects (SEG, SR, Parametric Map) to hospital systems.

Destinations come from settings: a DICOMweb origin server (STOW-RS, ``MEDCAD_FORWARD_STOW_URL``
= its service root, e.g. ``http://pacs/dicom-web``) and/or a C-STORE SCP
(``MEDCAD_FORWARD_DIMSE`` = ``AETITLE@host:port``). The runner calls
:func:`forward_job_outputs` after the job's results are committed; forwarding never changes
the job's outcome (the results are safe in medcad whatever the PACS does), and every attempt,
successful or not, is an audit event because patient data leaves the system.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx
import pydicom
from pynetdicom import AE
from sqlalchemy import select

from app.auth.service import record_audit
from app.db.records import ArtifactKind, ArtifactRecord, JobRecord, SeriesRecord, StudyRecord
from app.db.session import session_scope
from app.dicomweb.multipart import encode_parts, new_boundary, related_content_type
from app.settings import Settings, get_settings
from app.storage import BlobStore

log = logging.getLogger(__name__)

FORWARDED_KINDS = (ArtifactKind.SEG.value, ArtifactKind.SR.value, ArtifactKind.PMAP.value)
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"


class ForwardError(Exception):
    """A destination refused or did not take every object."""


@dataclass(frozen=True)
class DimsePeer:
    """A C-STORE SCP: its AE title, host and port."""

    ae_title: str
    host: str
    port: int


def parse_dimse_peer(text: str) -> DimsePeer:
    """``AETITLE@host:port`` → :class:`DimsePeer` (ValueError when malformed)."""
    ae_title, at, address = text.strip().partition("@")
    host, colon, port = address.rpartition(":")
    if not at or not colon or not ae_title or not host or not port.isdigit():
        raise ValueError(f"expected AETITLE@host:port, got {text[:80]!r}")
    if len(ae_title) > 16:
        raise ValueError(f"AE title {ae_title!r} is longer than 16 characters")
    return DimsePeer(ae_title, host.strip("[]"), int(port))


@dataclass(frozen=True)
class _Outputs:
    study_instance_uid: str
    series_instance_uid: str
    objects: list[bytes]


def _load_outputs(job_id: str, store: BlobStore) -> _Outputs | None:
    with session_scope() as session:
        row = session.execute(
            select(StudyRecord.study_instance_uid, SeriesRecord.series_instance_uid)
            .join(SeriesRecord, SeriesRecord.study_id == StudyRecord.id)
            .join(JobRecord, JobRecord.series_id == SeriesRecord.id)
            .where(JobRecord.id == job_id)
        ).first()
        keys = list(
            session.scalars(
                select(ArtifactRecord.blob_sha256)
                .where(
                    ArtifactRecord.job_id == job_id,
                    ArtifactRecord.kind.in_(FORWARDED_KINDS),
                    ArtifactRecord.media_type == "application/dicom",
                )
                .order_by(ArtifactRecord.kind, ArtifactRecord.id)
            )
        )
    if row is None or not keys:
        return None
    return _Outputs(row[0], row[1], [store.get(key) for key in keys])


def stow(root: str, objects: list[bytes], settings: Settings) -> int:
    """POST the objects to ``{root}/studies`` (STOW-RS); returns how many the server stored.

    Raises :class:`ForwardError` unless every object is in ReferencedSOPSequence and none in
    FailedSOPSequence (the check Orthanc itself applies to STOW answers).
    """
    boundary = new_boundary()
    body = b"".join(encode_parts((("application/dicom", o) for o in objects), boundary))
    headers = {
        "Content-Type": related_content_type(boundary, "application/dicom"),
        "Accept": "application/dicom+json",
    }
    if settings.forward_authorization is not None:
        headers["Authorization"] = settings.forward_authorization.get_secret_value()
    url = root.rstrip("/") + "/studies"
    try:
        response = httpx.post(
            url, content=body, headers=headers, timeout=settings.forward_timeout_seconds
        )
    except httpx.HTTPError as exc:
        raise ForwardError(f"STOW-RS to {_host(url)} failed: {type(exc).__name__}") from exc
    if response.status_code not in (200, 202):
        raise ForwardError(f"STOW-RS to {_host(url)} answered {response.status_code}")
    try:
        answer = response.json()
    except ValueError as exc:
        raise ForwardError(f"STOW-RS to {_host(url)}: the answer is not DICOM JSON") from exc
    stored = len(answer.get("00081199", {}).get("Value", []))
    failed = len(answer.get("00081198", {}).get("Value", []))
    if failed or stored != len(objects):
        raise ForwardError(f"STOW-RS to {_host(url)} stored {stored} of {len(objects)} objects")
    return stored


def c_store(peer: DimsePeer, objects: list[bytes], settings: Settings) -> int:
    """Send the objects with C-STORE over one association; returns how many succeeded."""
    datasets = [pydicom.dcmread(io.BytesIO(o)) for o in objects]
    ae = AE(ae_title=settings.listener_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.forward_timeout_seconds
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN])
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title)
    if not assoc.is_established:
        raise ForwardError(f"C-STORE association with {peer.ae_title} was not established")
    stored = 0
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code == 0x0000 or 0xB000 <= code <= 0xBFFF:  # success or warning (PS3.4 B.2.3)
                stored += 1
    finally:
        assoc.release()
    if stored != len(datasets):
        raise ForwardError(f"C-STORE to {peer.ae_title} stored {stored} of {len(datasets)}")
    return stored


def _host(url: str) -> str:
    return urlsplit(url).netloc or url[:40]


def _audit(job_id: str, outputs: _Outputs, destination: str, outcome: str, detail: str) -> None:
    with session_scope() as session:
        record_audit(
            session=session,
            principal=None,
            action="forward",
            resource=f"job/{job_id}",
            outcome=outcome,
            client=destination[:64],
            study_instance_uid=outputs.study_instance_uid,
            series_instance_uid=outputs.series_instance_uid,
            detail=detail[:500],
        )


def forward_job_outputs(job_id: str, settings: Settings | None = None) -> None:
    """Push a succeeded job's SEG/SR/PM to every configured destination; never raises."""
    settings = settings or get_settings()
    if not (settings.forward_stow_url or settings.forward_dimse):
        return
    try:
        outputs = _load_outputs(job_id, BlobStore(settings.blob_dir))
    except Exception as exc:  # missing rows or blobs: log, the job itself stays succeeded
        log.error(
            "forwarding: outputs unavailable",
            extra={"job_id": job_id, "error_type": type(exc).__name__},
        )
        return
    if outputs is None:
        return
    stow_root, dimse = settings.forward_stow_url, settings.forward_dimse
    if stow_root:
        _attempt(
            job_id, outputs, _host(stow_root), lambda: stow(stow_root, outputs.objects, settings)
        )
    if dimse:
        _attempt(
            job_id,
            outputs,
            dimse,
            lambda: c_store(parse_dimse_peer(dimse), outputs.objects, settings),
        )


def _attempt(job_id: str, outputs: _Outputs, destination: str, send: Callable[[], int]) -> None:
    try:
        count = send()
        outcome, detail = "success", f"{count} objects forwarded"
        log.info("results forwarded", extra={"job_id": job_id, "destination": destination})
    except (ForwardError, ValueError, OSError, RuntimeError) as exc:
        outcome, detail = "failed", str(exc)
        log.warning("forwarding failed", extra={"job_id": job_id, "destination": destination})
    try:
        _audit(job_id, outputs, destination, outcome, detail)
    except Exception:  # the audit store being down must not crash the worker
        log.error("forwarding audit failed", extra={"job_id": job_id})
