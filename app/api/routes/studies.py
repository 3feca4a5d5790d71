"""Upload: ``POST /api/v1/studies`` (multipart, .dcm and .zip parts)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from python_multipart.multipart import parse_options_header
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from app.api.deps import bearer_token, client_address, get_registry, get_store
from app.api.ingest_guards import admit_upload, ingest_limits
from app.api.schemas import (
    ERRORS,
    RETRY_AFTER,
    ErrorBody,
    FileResult,
    JobRef,
    RejectedFile,
    UploadResponse,
)
from app.auth.service import Principal, record_audit
from app.db.session import run_in_transaction
from app.errors import BadRequest, PayloadTooLarge
from app.metrics import FILES, REJECTIONS, UPLOADS
from app.registry.service import resolve_models
from app.settings import Settings, get_settings
from app.studies.service import IngestResult, UploadedFile, ingest_files

router = APIRouter(prefix="/api/v1", tags=["studies"])
# Files per request, as for STOW-RS: parsing and answering costs ~90 µs of CPU per part, so
# 100,000 one-byte parts would hold a worker for over 10 s. Larger sets go as zips or batches.
MAX_UPLOAD_PARTS = 10_000
_PARSE_SLICE = 16 * 1024
_RENDER_ON_LOOP_MAX_FILES = 32  # a larger upload answer is rendered in a worker thread


async def read_multipart(request: Request, max_bytes: int) -> list[tuple[str, str | UploadFile]]:
    """Parse a multipart body, counting bytes as they arrive (413 past ``max_bytes``)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(detail=f"body of {declared} bytes exceeds the limit of {max_bytes}")
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BadRequest(
            "unsupported_media_type", "the body must be multipart/form-data", status=415
        )

    # The parser silently drops a last part that never ends, so a truncated body would
    # look like a shorter upload: watch for the closing delimiter (RFC 2046 §5.1.1).
    closing = b"--" + _boundary(request.headers.get("content-type", "")) + b"--"
    closed, tail = False, b""

    async def limited() -> AsyncGenerator[bytes, None]:
        nonlocal closed, tail
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > max_bytes:
                raise PayloadTooLarge(detail=f"body exceeds the limit of {max_bytes} bytes")
            window = tail + chunk
            closed = closed or closing in window
            tail = window[-len(closing) :]
            # Parsing many tiny parts is CPU work on the event loop, and uvicorn hands over all
            # the body it has buffered at once: parse in slices, other requests between them.
            for start in range(0, len(chunk), _PARSE_SLICE):
                yield chunk[start : start + _PARSE_SLICE]
                await asyncio.sleep(0)

    parser = MultiPartParser(
        request.headers,
        limited(),
        max_files=MAX_UPLOAD_PARTS,
        max_fields=50,
        max_part_size=1024 * 1024,
    )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise BadRequest("malformed_multipart", str(exc)[:200]) from exc
    if not closed:
        await form.close()
        raise BadRequest("malformed_multipart", "the body ends before its closing boundary")
    return list(form.multi_items())


def _boundary(content_type: str) -> bytes:
    _, params = parse_options_header(content_type)
    return params.get(b"boundary", b"")


def _ingest(
    files: list[UploadedFile],
    model_names: list[str] | None,
    callback_url: str | None,
    principal: Principal,
    client: str | None,
    settings: Settings,
    options: dict[str, object],
) -> IngestResult:
    registry = get_registry(settings)
    models = resolve_models(registry, model_names)
    store = get_store(settings)

    def work(session: Session) -> IngestResult:
        result = ingest_files(
            session=session,
            store=store,
            files=files,
            models=models,
            principal=principal,
            limits=ingest_limits(settings),
            callback_url=callback_url,
            options=options,
        )
        for job in result.jobs:
            record_audit(
                session=session,
                principal=principal,
                action="upload",
                resource=f"job/{job.id}",
                client=client,
                series_instance_uid=job.series_instance_uid,
            )
        if not result.jobs:
            record_audit(
                session=session,
                principal=principal,
                action="upload",
                resource="studies",
                client=client,
                outcome="success" if result.duplicates else "rejected",
            )
        return result

    # concurrent uploads of one file or series race on unique keys: the loser re-runs
    return run_in_transaction(work)


def saliency_options(fields: dict[str, str], settings: Settings) -> dict[str, object]:
    """Saliency asked for on upload: ``saliency=occlusion,rise,tta_std``, ``saliency_budget=N``.

    The budget is the number of perturbation passes per model and series, so the cost is
    predictable; flip TTA (segmentation models) costs three passes per slice.
    """
    options: dict[str, object] = {}
    names = [m.strip() for m in fields.get("saliency", "").split(",") if m.strip()]
    allowed = {"occlusion", "rise", "tta_std"}
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise BadRequest(
            "invalid_saliency",
            f"saliency methods {unknown} are not available on request; use {sorted(allowed)}",
        )
    if names:
        options["saliency"] = names
    if "saliency_budget" in fields:
        raw = fields["saliency_budget"].strip()
        cap = settings.saliency_request_max_passes
        if not raw.isdigit() or not 1 <= int(raw) <= cap:
            raise BadRequest(
                "invalid_saliency_budget", f"saliency_budget {raw[:20]!r} must be 1..{cap}"
            )
        options["saliency_budget"] = int(raw)
    return options


def _validate_callback(url: str | None) -> str | None:
    if not url:
        return None
    if not (url.startswith("https://") or url.startswith("http://")) or len(url) > 2000:
        raise BadRequest("invalid_callback_url", "callback_url must be an http(s) URL")
    return url


def _either(description: str) -> dict[str, Any]:
    """A status answered with the error body or, when it is every file's, the upload body."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (ErrorBody, UploadResponse)]
    return {
        "description": description,
        "content": {"application/json": {"schema": {"anyOf": refs}}},
    }


@router.post(
    "/studies",
    status_code=202,
    response_model=UploadResponse,
    summary="Upload DICOM files or zip archives; one job per series",
    responses={
        **ERRORS,
        400: _either("Malformed request, or every file rejected as malformed"),
        409: {"model": UploadResponse, "description": "Every file conflicts with a stored one"},
        413: _either("Body over the upload size limit, or every file over a budget"),
        415: {"model": ErrorBody, "description": "Not multipart/form-data"},
        422: _either("Every file was rejected, or an unknown model was named"),
        429: {
            "model": ErrorBody,
            "description": "Queue over its configured depth, or over this key's request rate",
            "headers": RETRY_AFTER,
        },
        503: {"model": ErrorBody, "description": "Database unavailable", "headers": RETRY_AFTER},
        507: {"model": ErrorBody, "description": "Storage full; nothing stored"},
    },
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["files"],
                        "properties": {
                            "files": {
                                "type": "array",
                                "minItems": 1,
                                "items": {"type": "string", "format": "binary"},
                            },
                            "models": {"type": "string", "example": "unet,classifier"},
                            "callback_url": {"type": "string", "format": "uri"},
                            "saliency": {"type": "string", "example": "occlusion,rise"},
                            "saliency_budget": {"type": "integer", "minimum": 1},
                        },
                    }
                }
            },
        }
    },
)
async def upload_studies(request: Request) -> JSONResponse:
    """Store each file durably (or reject it with a reason) and queue one job per series."""
    settings = get_settings()
    principal = await run_in_threadpool(admit_upload, bearer_token(request), settings)
    items = await read_multipart(request, settings.max_upload_bytes)
    files: list[UploadedFile] = []
    models_field: str | None = None
    callback: str | None = None
    saliency_fields: dict[str, str] = {}
    for name, value in items:
        if isinstance(value, UploadFile):
            if name in ("files", "file"):
                files.append(UploadedFile(value.filename or "unnamed", await value.read()))
            await value.close()
        elif name == "models":
            models_field = value
        elif name == "callback_url":
            callback = value
        elif name in ("saliency", "saliency_budget"):
            saliency_fields[name] = value
    if not files:
        raise BadRequest("no_files", "the request has no 'files' part")
    model_names = (
        [m.strip() for m in models_field.split(",") if m.strip()] if models_field else None
    )
    options = saliency_options(saliency_fields, settings)
    result = await run_in_threadpool(
        _ingest,
        files,
        model_names,
        _validate_callback(callback),
        principal,
        client_address(request),
        settings,
        options,
    )
    # thousands of per-file outcomes take a while to render: not on the event loop (a few take
    # less than the hand-off to a worker thread would)
    if len(result.files) <= _RENDER_ON_LOOP_MAX_FILES:
        return _upload_response(result)
    return await run_in_threadpool(_upload_response, result)


def _upload_response(result: IngestResult) -> JSONResponse:
    for f in result.files:
        FILES.labels(f.outcome).inc()
        if f.error:
            REJECTIONS.labels(f.error).inc()
    body = UploadResponse(
        jobs=[
            JobRef(id=j.id, series_instance_uid=j.series_instance_uid, status=j.status)
            for j in result.jobs
        ],
        stored=result.stored,
        duplicates=result.duplicates,
        rejected=[
            RejectedFile(filename=f.filename, error=f.error or "rejected", detail=f.detail or "")
            for f in result.rejected
        ],
        files=[
            FileResult(
                filename=f.filename,
                outcome=f.outcome,
                sop_instance_uid=f.sop_instance_uid,
                series_instance_uid=f.series_instance_uid,
                error=f.error,
                detail=f.detail,
            )
            for f in result.files
        ],
    )
    status = result.error_status or 202
    UPLOADS.labels("accepted" if status == 202 else "rejected").inc()
    headers = {"Location": f"/api/v1/jobs/{result.jobs[0].id}"} if result.jobs else {}
    return JSONResponse(body.model_dump(mode="json"), status_code=status, headers=headers)
