"""Results of a job, and the bytes behind them (masks, saliency maps, artifacts, pixels)."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response

from app.api.deps import SessionDep, StoreDep, client_address, require
from app.api.schemas import (
    ERRORS,
    NOT_FOUND,
    DicomLink,
    DicomOutputs,
    ErrorBody,
    FindingOut,
    InstanceInfo,
    MaskLabel,
    MaskOut,
    Results,
    SaliencyOut,
    SeriesInfo,
)
from app.auth.service import Principal, record_audit
from app.db.records import ArtifactRecord, JobStatus, Role
from app.errors import MedcadError
from app.jobs import service as jobs
from app.results import service as results
from app.storage import BlobStore

router = APIRouter(prefix="/api/v1", tags=["results"])
Viewer = Annotated[Principal, require(Role.VIEWER)]
API = "/api/v1"


class _SerialisedResults:
    """Result sets of jobs as JSON bytes, least recently used dropped first.

    Keyed by (job id, attempts, results_at, complete): a job's result rows change only when it
    runs again, which stamps a new ``results_at``, and its DICOM objects arrive only with
    ``complete``, so an entry is never stale. Bounded by total size, per API process.
    """

    def __init__(self, max_bytes: int = 32 * 2**20) -> None:
        self._items: OrderedDict[tuple[str, int, str, bool], bytes] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._lock = threading.Lock()

    def get(self, key: tuple[str, int, str, bool]) -> bytes | None:
        with self._lock:
            body = self._items.get(key)
            if body is not None:
                self._items.move_to_end(key)
            return body

    def put(self, key: tuple[str, int, str, bool], body: bytes) -> None:
        if len(body) > self._max // 4:
            return  # one huge result set must not evict everything else
        with self._lock:
            if key in self._items:
                return
            self._items[key] = body
            self._bytes += len(body)
            while self._bytes > self._max:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped)


_SERIALISED = _SerialisedResults()


def _results_schema(res: results.JobResults) -> Results:
    # saliency maps by (model, instance, frame): each mask lists its own in one pass
    maps_of: dict[tuple[str, str, int], list[str]] = {}
    for s in res.saliency:
        maps_of.setdefault((s.model, s.sop_instance_uid, s.frame), []).append(s.id)
    return Results(
        job_id=res.job.id,
        status=res.job.status,
        complete=res.job.status == JobStatus.SUCCEEDED,
        uncertain=res.job.uncertain,
        series=SeriesInfo(
            study_instance_uid=res.study.study_instance_uid,
            series_instance_uid=res.series.series_instance_uid,
            modality=res.series.modality,
            instances=[
                InstanceInfo(
                    sop_instance_uid=i.sop_instance_uid,
                    instance_number=i.instance_number,
                    frames=i.frames,
                    rows=i.rows,
                    columns=i.columns,
                    window=None,
                )
                for i in res.instances
            ],
        ),
        findings=[
            FindingOut(
                id=f.id,
                model=f.model,
                model_version=f.model_version,
                label=f.label,
                probability=f.probability,
                positive=f.positive,
                uncertain=f.uncertain,
                level=f.level,
                sop_instance_uid=f.sop_instance_uid,
                frame=f.frame,
                saliency_id=(f.extra or {}).get("saliency_id"),
                lesion=(f.extra or {}).get("lesion"),
            )
            for f in res.findings
        ],
        masks=[
            MaskOut(
                id=m.id,
                model=m.model,
                model_version=m.model_version,
                sop_instance_uid=m.sop_instance_uid,
                frame=m.frame,
                labels=[
                    MaskLabel(**{k: v for k, v in lab.items() if k != "saliency_ids"})
                    for lab in m.labels
                ],
                url=f"{API}/masks/{m.id}.png",
                overlay_url=f"{API}/masks/{m.id}/overlay.png",
                saliency_ids=maps_of.get((m.model, m.sop_instance_uid, m.frame), []),
            )
            for m in res.masks
        ],
        saliency=[
            SaliencyOut(
                id=s.id,
                model=s.model,
                model_version=s.model_version,
                method=s.method,
                sop_instance_uid=s.sop_instance_uid,
                frame=s.frame,
                url=f"{API}/saliency/{s.id}.npy",
                overlay_url=f"{API}/saliency/{s.id}/overlay.png",
                colorbar_url=f"{API}/saliency/{s.id}/colorbar.png",
                display_range=(s.display_lo, s.display_hi),
                suppressed=s.suppressed,
                target=s.target,
                params=s.params or {},
            )
            for s in res.saliency
        ],
        dicom=DicomOutputs(
            seg=[_link(a) for a in res.artifacts if a.kind == "seg"],
            sr=[_link(a) for a in res.artifacts if a.kind == "sr"],
            pmap=[_link(a) for a in res.artifacts if a.kind == "pmap"],
        ),
    )


def _link(a: ArtifactRecord) -> DicomLink:
    return DicomLink(
        model=a.model,
        url=f"{API}/artifacts/{a.id}",
        method=a.method,
        sop_instance_uid=a.sop_instance_uid,
    )


@router.get(
    "/jobs/{job_id}/results",
    response_model=Results,
    responses={
        **ERRORS,
        **NOT_FOUND,
        304: {"description": "Not modified: the If-None-Match ETag is current"},
        409: {"model": ErrorBody, "description": "No results yet (queued, running) or failed"},
    },
    summary="Findings, masks, saliency maps and DICOM outputs of a job",
)
def get_results(job_id: str, request: Request, session: SessionDep, principal: Viewer) -> Response:
    """Everything a job produced, with URLs for the bytes.

    Readable as soon as the job's ``results_at`` is set: masks, findings and saliency maps
    commit first, and ``complete`` is false (``dicom`` empty) while the worker builds the DICOM
    objects from them; once the job has succeeded, ``complete`` is true and ``dicom`` lists
    them. The ETag changes when the DICOM objects arrive and when the job runs again: a client
    that polls sends it back in If-None-Match and gets 304 (every read is audited either way).
    """
    job, series, study = jobs.get_job_context(session=session, job_id=job_id)
    record_audit(
        session=session,
        principal=principal,
        action="view",
        resource=f"job/{job.id}/results",
        client=client_address(request),
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
    )
    if not jobs.results_readable(job):
        raise MedcadError("not_ready", f"job {job.id} is {job.status}", status=409)
    complete = job.status == JobStatus.SUCCEEDED
    stamp = job.results_at or job.finished_at
    key = (job.id, job.attempts, stamp.isoformat() if stamp else "", complete)
    etag = '"' + hashlib.sha256(repr(key).encode()).hexdigest()[:32] + '"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    body = _SERIALISED.get(key)
    if body is None:
        schema = _results_schema(results.get_results(session=session, job=job))
        body = schema.model_dump_json().encode()
        _SERIALISED.put(key, body)
    return Response(body, media_type="application/json", headers=headers)


def _blob_response(
    request: Request, store: BlobStore, key: str, media_type: str, filename: str | None = None
) -> Response:
    etag = f'"{key}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=31536000, immutable"}
    if filename:
        headers["Content-Disposition"] = f'attachment; filename="{filename}"'
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(store.get(key), media_type=media_type, headers=headers)


def _audit_download(
    session: SessionDep, request: Request, principal: Principal, what: str, job_id: str
) -> None:
    uids = results.series_uids_of_job(session=session, job_id=job_id)
    record_audit(
        session=session,
        principal=principal,
        action="download",
        resource=what,
        client=client_address(request),
        study_instance_uid=uids[0] if uids else None,
        series_instance_uid=uids[1] if uids else None,
    )


BYTES = {**ERRORS, **NOT_FOUND}


def _bytes(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """OpenAPI responses of a route answering raw bytes of ``media_type``."""
    return {
        200: {
            "description": description,
            "content": {media_type: {"schema": {"type": "string", "format": "binary"}}},
        },
        **BYTES,
    }


def _stored_bytes(media_type: str, description: str) -> dict[int | str, dict[str, Any]]:
    """As :func:`_bytes`, for a stored blob: its sha256 is the ETag, so 304 is possible."""
    responses = _bytes(media_type, description)
    responses[200]["headers"] = {
        "ETag": {"description": "The sha256 of the bytes, quoted", "schema": {"type": "string"}}
    }
    responses[304] = {"description": "Not modified: the If-None-Match ETag is current"}
    return responses


@router.get(
    "/masks/{mask_id}.png",
    responses=_stored_bytes("image/png", "Label map: 8-bit grey PNG, pixel value = label value"),
    response_class=Response,
    summary="Label map PNG (pixel value = label value)",
)
def mask_png(
    mask_id: str, request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """The mask as an 8-bit PNG in source geometry."""
    row = results.get_mask(session=session, mask_id=mask_id)
    _audit_download(session, request, principal, f"mask/{row.id}", row.job_id)
    return _blob_response(request, store, row.blob_sha256, "image/png")


@router.get(
    "/masks/{mask_id}/overlay.png",
    responses=_stored_bytes("image/png", "RGBA PNG, one colour per label"),
    response_class=Response,
    summary="Coloured mask overlay (RGBA PNG)",
)
def mask_overlay(
    mask_id: str, request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """The mask with one colour per label, transparent background."""
    row = results.get_mask(session=session, mask_id=mask_id)
    _audit_download(session, request, principal, f"mask/{row.id}/overlay", row.job_id)
    return _blob_response(request, store, row.overlay_sha256, "image/png")


@router.get(
    "/saliency/{saliency_id}.npy",
    responses=_stored_bytes(
        "application/octet-stream", "NumPy .npy, float16, rows x columns of the source frame"
    ),
    response_class=Response,
    summary="Saliency map (float16 .npy, source geometry)",
)
def saliency_map(
    saliency_id: str, request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """The raw saliency map."""
    row = results.get_saliency(session=session, saliency_id=saliency_id)
    _audit_download(session, request, principal, f"saliency/{row.id}", row.job_id)
    return _blob_response(
        request,
        store,
        row.blob_sha256,
        "application/octet-stream",
        f"{row.model}_{row.method}_{row.sop_instance_uid}_{row.frame}.npy",
    )


@router.get(
    "/saliency/{saliency_id}/overlay.png",
    responses=_stored_bytes("image/png", "RGBA PNG heat overlay on the model's fixed scale"),
    response_class=Response,
    summary="Saliency heat overlay (RGBA PNG, fixed scale)",
)
def saliency_overlay(
    saliency_id: str, request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """The saliency map on the model's fixed scale, transparent below its minimum."""
    row = results.get_saliency(session=session, saliency_id=saliency_id)
    _audit_download(session, request, principal, f"saliency/{row.id}/overlay", row.job_id)
    return _blob_response(request, store, row.overlay_sha256, "image/png")


@router.get(
    "/artifacts/{artifact_id}",
    responses=_stored_bytes("application/dicom", "DICOM Part 10 file (SEG, SR or Parametric Map)"),
    response_class=Response,
    summary="A stored output (DICOM SEG, SR, Parametric Map)",
)
def artifact(
    artifact_id: str, request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """The bytes of an output object."""
    row = results.get_artifact(session=session, artifact_id=artifact_id)
    _audit_download(session, request, principal, f"artifact/{row.id}", row.job_id)
    name = f"{row.kind}_{row.model}{'_' + row.method if row.method else ''}.dcm"
    return _blob_response(request, store, row.blob_sha256, row.media_type, name)


@router.get(
    "/instances/{sop_instance_uid}/frames/{frame}/pixels",
    responses=_bytes(
        "application/octet-stream",
        "int16 little endian, rows x columns, modality units (HU for CT)",
    ),
    response_class=Response,
    summary="One frame in modality units (int16 LE)",
)
def frame_pixels(
    sop_instance_uid: str,
    frame: int,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
) -> Response:
    """Raw frame values (HU for CT) for client-side window/level."""
    instance = results.get_instance(session=session, sop_instance_uid=sop_instance_uid)
    pixels = results.read_frame(store=store, instance=instance, frame=frame)
    uids = _instance_uids(session, instance.series_id)
    record_audit(
        session=session,
        principal=principal,
        action="view",
        resource=f"instance/{sop_instance_uid}/frames/{frame}",
        client=client_address(request),
        study_instance_uid=uids[0],
        series_instance_uid=uids[1],
    )
    rows, cols = pixels.values.shape
    return Response(
        pixels.values.tobytes(),
        media_type="application/octet-stream",
        headers={
            "X-Rows": str(rows),
            "X-Columns": str(cols),
            "X-Window-Center": f"{pixels.window_center:g}",
            "X-Window-Width": f"{pixels.window_width:g}",
            "Cache-Control": "private, max-age=3600",
        },
    )


@router.get(
    "/instances/{sop_instance_uid}/frames/{frame}/rendered",
    responses=_bytes("image/png", "8-bit grey PNG of the frame"),
    response_class=Response,
    summary="One frame rendered to a grey PNG",
)
def frame_rendered(
    sop_instance_uid: str,
    frame: int,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
    center: Annotated[float | None, Query()] = None,
    width: Annotated[float | None, Query(gt=0)] = None,
) -> Response:
    """The frame windowed (default: its DICOM window) as an 8-bit PNG."""
    import io

    import numpy as np
    from PIL import Image

    instance = results.get_instance(session=session, sop_instance_uid=sop_instance_uid)
    pixels = results.read_frame(store=store, instance=instance, frame=frame)
    c = center if center is not None else pixels.window_center
    w = width if width is not None else pixels.window_width
    scaled = np.clip((pixels.values.astype(np.float32) - (c - w / 2)) / w, 0, 1) * 255
    buffer = io.BytesIO()
    Image.fromarray(scaled.astype(np.uint8), mode="L").save(buffer, format="PNG")
    uids = _instance_uids(session, instance.series_id)
    record_audit(
        session=session,
        principal=principal,
        action="view",
        resource=f"instance/{sop_instance_uid}/frames/{frame}/rendered",
        client=client_address(request),
        study_instance_uid=uids[0],
        series_instance_uid=uids[1],
    )
    return Response(buffer.getvalue(), media_type="image/png")


def _instance_uids(session: SessionDep, series_id: str) -> tuple[str | None, str | None]:
    from app.db.records import SeriesRecord, StudyRecord

    series = session.get(SeriesRecord, series_id)
    study = session.get(StudyRecord, series.study_id) if series else None
    return (
        study.study_instance_uid if study else None,
        series.series_instance_uid if series else None,
    )


@router.get(
    "/saliency/{saliency_id}/colorbar.png",
    responses=_stored_bytes("image/png", "RGBA PNG colour bar with its scale"),
    response_class=Response,
    summary="Colour bar (legend) of a saliency overlay's fixed scale",
)
def saliency_colorbar(
    saliency_id: str, request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """The legend PNG for the overlay: colormap and the fixed display range."""
    row = results.get_saliency(session=session, saliency_id=saliency_id)
    key = (row.params or {}).get("colorbar_sha256")
    if not isinstance(key, str):
        raise MedcadError("not_found", f"saliency map {row.id} has no colour bar", status=404)
    return _blob_response(request, store, key, "image/png")
