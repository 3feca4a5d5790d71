"""DICOMweb under ``/dicomweb``: STOW-RS, QIDO-RS and WADO-RS (PS3.18 §10.4–10.6).

Thin handlers: parse the HTTP request, call :mod:`app.dicomweb.service`, shape the response.
Every route needs an API key (viewer to read, uploader to store); STOW-RS authenticates and
checks the media type before the first byte of the body is read.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.api.deps import (
    SessionDep,
    StoreDep,
    bearer_token,
    client_address,
    get_registry,
    get_store,
    require,
)
from app.api.ingest_guards import admit_upload, ingest_limits
from app.api.schemas import ERRORS, ErrorBody
from app.auth.service import Principal, record_audit
from app.db.records import Role
from app.db.session import run_in_transaction
from app.dicomweb import qido, service, stow, wado
from app.dicomweb.dicom_json import parse_tag
from app.dicomweb.multipart import (
    encode_parts,
    new_boundary,
    parse_media_type,
    parse_stream,
    related_content_type,
    valid_boundary,
)
from app.dicomweb.query import Level, QidoQuery, parse_query, warning_header
from app.dicomweb.rendering import choose_media_type, parse_window, render_frame
from app.dicomweb.service import InstanceView, Scope, Urls
from app.dicomweb.stow import StowOutcome, StowPart
from app.dicomweb.transcode import NotAcceptable
from app.errors import BadRequest, MedcadError, PayloadTooLarge
from app.metrics import FILES, REJECTIONS, UPLOADS
from app.registry.service import resolve_models
from app.settings import Settings, get_settings

router = APIRouter(prefix="/dicomweb", tags=["dicomweb"])
Viewer = Annotated[Principal, require(Role.VIEWER)]
DICOM_JSON = "application/dicom+json"
MAX_STOW_PARTS = 10_000


def _urls(request: Request) -> Urls:
    return Urls(str(request.base_url).rstrip("/") + "/dicomweb")


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON, headers=headers)


def _accepts_json(request: Request) -> None:
    """QIDO-RS and metadata answer DICOM JSON only (406 for an Accept that excludes it)."""
    accept = request.headers.get("accept", "")
    if not accept.strip():
        return
    for entry in accept.split(","):
        media = parse_media_type(entry)[0]
        if media in (DICOM_JSON, "application/json", "*/*", "application/*"):
            return
    raise NotAcceptable(detail=f"this resource is {DICOM_JSON}, not {accept[:80]!r}")


# ---------------------------------------------------------------------------------------
# OpenAPI: what each route really answers (documentation only; errors in the one body shape)
# ---------------------------------------------------------------------------------------

_UID = "1.2.826.0.1.3680043.8.498.10952716306271532453127845672340965173"
_SERIES_UID = "1.2.826.0.1.3680043.8.498.21688549342248767199514913713792819343"
_SOP_UID = "1.2.826.0.1.3680043.8.498.73025310417846519263514800172964317055"
_BASE = "https://medcad.example/dicomweb"
_DATASETS: dict[str, Any] = {"type": "array", "items": {"type": "object"}}
_ERROR_TEXT = {
    400: "Invalid query key, window or frame list",
    404: "No such study, series, instance, frame or bulk data element",
    406: "The Accept header excludes every media type this resource has",
}


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {**ERRORS, **{c: {"model": ErrorBody, "description": _ERROR_TEXT[c]} for c in codes}}


def _dicom_json(description: str, example: Any) -> dict[str, Any]:
    return {
        "description": description,
        "content": {DICOM_JSON: {"schema": _DATASETS, "example": example}},
    }


def _related(description: str, part_type: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            f'multipart/related; type="{part_type}"': {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    }


_STUDY_EXAMPLE = [
    {
        "0020000D": {"vr": "UI", "Value": [_UID]},
        "00080020": {"vr": "DA", "Value": ["20260105"]},
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "DOE^JANE"}]},
        "00201206": {"vr": "IS", "Value": [2]},
        "00081190": {"vr": "UR", "Value": [f"{_BASE}/studies/{_UID}"]},
    }
]
_SERIES_EXAMPLE = [
    {
        "0020000D": {"vr": "UI", "Value": [_UID]},
        "0020000E": {"vr": "UI", "Value": [_SERIES_UID]},
        "00080060": {"vr": "CS", "Value": ["CT"]},
        "00201209": {"vr": "IS", "Value": [64]},
        "00081190": {"vr": "UR", "Value": [f"{_BASE}/studies/{_UID}/series/{_SERIES_UID}"]},
    }
]
_INSTANCE_EXAMPLE = [
    {
        "00080016": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
        "00080018": {"vr": "UI", "Value": [_SOP_UID]},
        "0020000E": {"vr": "UI", "Value": [_SERIES_UID]},
        "00200013": {"vr": "IS", "Value": [1]},
    }
]
_METADATA_EXAMPLE = [
    {
        **_INSTANCE_EXAMPLE[0],
        "0020000D": {"vr": "UI", "Value": [_UID]},
        "00280010": {"vr": "US", "Value": [512]},
        "00280011": {"vr": "US", "Value": [512]},
        "7FE00010": {
            "vr": "OW",
            "BulkDataURI": f"{_BASE}/studies/{_UID}/series/{_SERIES_UID}"
            f"/instances/{_SOP_UID}/bulk/7FE00010",
        },
    }
]
_STOW_EXAMPLE = {
    "00081190": {"vr": "UR", "Value": [f"{_BASE}/studies/{_UID}"]},
    "00081199": {
        "vr": "SQ",
        "Value": [
            {
                "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00081155": {"vr": "UI", "Value": [_SOP_UID]},
                "00081190": {
                    "vr": "UR",
                    "Value": [f"{_BASE}/studies/{_UID}/series/{_SERIES_UID}/instances/{_SOP_UID}"],
                },
            }
        ],
    },
}
_STOW_FAILED_EXAMPLE = {
    "00081198": {
        "vr": "SQ",
        "Value": [
            {
                "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                "00081155": {"vr": "UI", "Value": [_SOP_UID]},
                "00081197": {"vr": "US", "Value": [272]},
            }
        ],
    }
}


def _qido_doc(example: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "response_class": Response,
        "responses": {200: _dicom_json("Matches, in DICOM JSON (PS3.18 F.2)", example)}
        | _errors(400, 406),
    }


_METADATA_DOC: dict[str, Any] = {
    "response_class": Response,
    "responses": {200: _dicom_json("Instance metadata, in DICOM JSON", _METADATA_EXAMPLE)}
    | _errors(404, 406),
}
_RETRIEVE_DOC: dict[str, Any] = {
    "response_class": Response,
    "responses": {200: _related("The instances, as PS3.10 parts", "application/dicom")}
    | _errors(404, 406),
}
_RENDERED_DOC: dict[str, Any] = {
    "response_class": Response,
    "responses": {
        200: {
            "description": "The frame as an 8-bit image (JPEG unless PNG is preferred)",
            "content": {
                m: {"schema": {"type": "string", "format": "binary"}}
                for m in ("image/jpeg", "image/png")
            },
        }
    }
    | _errors(400, 404, 406),
}
_FRAMES_DOC: dict[str, Any] = {
    "response_class": Response,
    "responses": {200: _related("Uncompressed frames or bulk data", "application/octet-stream")}
    | _errors(400, 404),
}


# ---------------------------------------------------------------------------------------
# STOW-RS
# ---------------------------------------------------------------------------------------


def _stow_boundary(content_type: str) -> str:
    media, params = parse_media_type(content_type)
    part_type = params.get("type", "application/dicom").lower()
    if media != "multipart/related" or part_type != "application/dicom":
        raise MedcadError(
            "unsupported_media_type",
            'STOW-RS accepts multipart/related; type="application/dicom", '
            f"not {content_type[:100]!r}",
            status=415,
        )
    boundary = params.get("boundary", "")
    if not valid_boundary(boundary):
        raise BadRequest("malformed_multipart", "the Content-Type has no valid boundary parameter")
    return boundary


def _stow(
    parts: list[StowPart],
    study: str | None,
    principal: Principal,
    client: str | None,
    urls: Urls,
    settings: Settings,
) -> StowOutcome:
    models = resolve_models(get_registry(settings), None)

    def work(session: Session) -> StowOutcome:
        return stow.store_instances(
            session=session,
            store=get_store(settings),
            parts=parts,
            models=models,
            principal=principal,
            client=client,
            limits=ingest_limits(settings),
            urls=urls,
            study_instance_uid=study,
        )

    # concurrent stores of one instance or series race on unique keys: the loser re-runs
    return run_in_transaction(work)


async def _store(request: Request, study: str | None) -> Response:
    settings = get_settings()
    principal = await run_in_threadpool(admit_upload, bearer_token(request), settings)
    boundary = _stow_boundary(request.headers.get("content-type", ""))
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > settings.max_upload_bytes:
        raise PayloadTooLarge(
            detail=f"body of {declared} bytes exceeds the limit of {settings.max_upload_bytes}"
        )
    body_parts = await parse_stream(
        request.stream(), boundary, max_bytes=settings.max_upload_bytes, max_parts=MAX_STOW_PARTS
    )
    try:
        parts = [StowPart(p.content_type, p.read()) for p in body_parts]
    finally:
        for part in body_parts:
            part.close()
    outcome = await run_in_threadpool(
        _stow, parts, study, principal, client_address(request), _urls(request), settings
    )
    for result in outcome.outcomes:
        FILES.labels(result if result in ("stored", "duplicate") else "rejected").inc()
        if result not in ("stored", "duplicate"):
            REJECTIONS.labels(result).inc()
    UPLOADS.labels("accepted" if outcome.status in (200, 202) else "rejected").inc()
    return _json(outcome.body, outcome.status)


STOW_DOC: dict[str, Any] = {
    "response_class": Response,
    "responses": {
        200: _dicom_json("All instances stored (Store Instances Response Module)", _STOW_EXAMPLE),
        202: _dicom_json(
            "Some instances stored, others failed (FailedSOPSequence)",
            {**_STOW_EXAMPLE, **_STOW_FAILED_EXAMPLE},
        ),
        **ERRORS,
        400: {
            "model": ErrorBody,
            "description": "Malformed multipart body (error body), or no part was DICOM "
            "(FailedSOPSequence in DICOM JSON)",
            "content": {
                DICOM_JSON: {"schema": {"type": "object"}, "example": _STOW_FAILED_EXAMPLE}
            },
        },
        409: _dicom_json(
            "No instance stored: conflicts, unsupported classes, UID mismatch (FailedSOPSequence)",
            _STOW_FAILED_EXAMPLE,
        ),
        413: {"model": ErrorBody, "description": "Body over the upload size limit"},
        415: {"model": ErrorBody, "description": 'Not multipart/related; type="application/dicom"'},
        507: {"model": ErrorBody, "description": "Not enough free disk space to store the upload"},
    },
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                'multipart/related; type="application/dicom"': {
                    "schema": {"type": "string", "format": "binary"}
                }
            },
        }
    },
}


@router.post("/studies", summary="STOW-RS: store instances", **STOW_DOC)
async def store_instances(request: Request) -> Response:
    """Store PS3.10 instances; one analysis job per series that received new instances."""
    return await _store(request, None)


@router.post("/studies/{study}", summary="STOW-RS: store instances of one study", **STOW_DOC)
async def store_study_instances(study: str, request: Request) -> Response:
    """Store instances that must all belong to ``study`` (others fail with 0x0110)."""
    return await _store(request, study)


# ---------------------------------------------------------------------------------------
# QIDO-RS
# ---------------------------------------------------------------------------------------


def _query(request: Request, level: Level) -> QidoQuery:
    _accepts_json(request)
    return parse_query(request.query_params.multi_items(), level)


def _audit_search(
    session: SessionDep,
    request: Request,
    principal: Principal,
    query: QidoQuery,
    results: int,
    scope: Scope,
) -> None:
    keys = ",".join(query.key_names()) or "none"
    record_audit(
        session=session,
        principal=principal,
        action="search",
        resource=request.url.path,
        client=client_address(request),
        study_instance_uid=scope.study,
        series_instance_uid=scope.series,
        detail=f"QIDO-RS {results} results; keys {keys}"[:500],
    )


def _search_series(
    request: Request, session: SessionDep, store: StoreDep, principal: Principal, scope: Scope
) -> Response:
    query = _query(request, "series")
    views = qido.page(
        service.find_series(session=session, store=store, query=query, scope=scope), query
    )
    studies = (
        service.study_views_for(session, (v.study.study_instance_uid for v in views))
        if scope.study is None
        else {}
    )
    body = qido.series_results(
        views=views, studies=studies, query=query, store=store, urls=_urls(request)
    )
    _audit_search(session, request, principal, query, len(body), scope)
    return _json(body, headers=dict(warning_header(query)))


def _search_instances(
    request: Request, session: SessionDep, store: StoreDep, principal: Principal, scope: Scope
) -> Response:
    query = _query(request, "instance")
    views = qido.page(
        service.find_instances(session=session, store=store, query=query, scope=scope), query
    )
    studies = (
        service.study_views_for(session, (v.study.study_instance_uid for v in views))
        if scope.study is None
        else {}
    )
    body = qido.instance_results(
        views=views, studies=studies, query=query, store=store, urls=_urls(request)
    )
    _audit_search(session, request, principal, query, len(body), scope)
    return _json(body, headers=dict(warning_header(query)))


@router.get("/studies", summary="QIDO-RS: search for studies", **_qido_doc(_STUDY_EXAMPLE))
def search_studies(
    request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """Studies matching the query keys (``PatientName=DOE*``, ``StudyDate=20260101-``, ...)."""
    query = _query(request, "study")
    views = service.find_studies(session=session, query=query)
    body = qido.study_results(views=views, query=query, store=store, urls=_urls(request))
    _audit_search(session, request, principal, query, len(body), Scope())
    return _json(body, headers=dict(warning_header(query)))


@router.get(
    "/series", summary="QIDO-RS: search for series in all studies", **_qido_doc(_SERIES_EXAMPLE)
)
def search_all_series(
    request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """Series (source and result series) matching the query keys."""
    return _search_series(request, session, store, principal, Scope())


@router.get(
    "/studies/{study}/series",
    summary="QIDO-RS: search for series of a study",
    **_qido_doc(_SERIES_EXAMPLE),
)
def search_study_series(
    study: str, request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """The study's series, including medcad's SEG, SR and Parametric Map result series."""
    return _search_series(request, session, store, principal, Scope(study=study))


@router.get(
    "/instances",
    summary="QIDO-RS: search for instances in all studies",
    **_qido_doc(_INSTANCE_EXAMPLE),
)
def search_all_instances(
    request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """Instances matching the query keys."""
    return _search_instances(request, session, store, principal, Scope())


@router.get(
    "/studies/{study}/instances",
    summary="QIDO-RS: search for instances of a study",
    **_qido_doc(_INSTANCE_EXAMPLE),
)
def search_study_instances(
    study: str, request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """The study's instances (source and result objects)."""
    return _search_instances(request, session, store, principal, Scope(study=study))


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="QIDO-RS: search for instances of a series",
    **_qido_doc(_INSTANCE_EXAMPLE),
)
def search_series_instances(
    study: str,
    series: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
) -> Response:
    """The series' instances."""
    return _search_instances(request, session, store, principal, Scope(study, series))


# ---------------------------------------------------------------------------------------
# WADO-RS
# ---------------------------------------------------------------------------------------


def _accepted_syntaxes(accept: str | None) -> list[str | None]:
    """Transfer syntaxes the client accepts for ``multipart/related; type=application/dicom``,
    best first (``None`` = the default, ``"*"`` = as stored); 406 if it accepts none."""
    if not accept or not accept.strip():
        return [None]
    ranked: list[tuple[float, int, str | None]] = []
    for index, entry in enumerate(accept.split(",")):
        media, params = parse_media_type(entry)
        try:
            quality = float(params.get("q", "1"))
        except ValueError:
            quality = 0.0
        if quality <= 0:
            continue
        if media == "multipart/related":
            if params.get("type", "application/dicom").lower() != "application/dicom":
                continue
            ranked.append((-quality, index, params.get("transfer-syntax") or None))
        elif media in ("*/*", "multipart/*"):
            ranked.append((-quality, index, None))
    if not ranked:
        raise NotAcceptable(
            detail='instances are sent as multipart/related; type="application/dicom", '
            f"not {accept[:80]!r}"
        )
    return [syntax for _, _, syntax in sorted(ranked, key=lambda r: (r[0], r[1]))]


def _audit_retrieve(
    session: SessionDep,
    request: Request,
    principal: Principal,
    action: str,
    scope: Scope,
    views: list[InstanceView],
) -> None:
    record_audit(
        session=session,
        principal=principal,
        action=action,
        resource=request.url.path,
        client=client_address(request),
        study_instance_uid=scope.study,
        series_instance_uid=scope.series or (views[0].series_instance_uid if views else None),
        detail=f"WADO-RS {len(views)} instances",
    )


def _retrieve(
    request: Request, session: SessionDep, store: StoreDep, principal: Principal, scope: Scope
) -> Response:
    views = wado.resolve_instances(session=session, store=store, scope=scope)
    syntaxes: list[str] | None = None
    failure: NotAcceptable | None = None
    for requested in _accepted_syntaxes(request.headers.get("accept")):
        try:
            syntaxes = wado.delivery_plan(views, requested)
            break
        except NotAcceptable as exc:
            failure = exc
    if syntaxes is None:
        assert failure is not None
        raise failure
    _audit_retrieve(session, request, principal, "download", scope, views)
    boundary = new_boundary()
    body: Iterator[bytes] = encode_parts(wado.retrieve_parts(store, views, syntaxes), boundary)
    return StreamingResponse(body, media_type=related_content_type(boundary, "application/dicom"))


def _metadata(
    request: Request, session: SessionDep, store: StoreDep, principal: Principal, scope: Scope
) -> Response:
    _accepts_json(request)
    views = wado.resolve_instances(session=session, store=store, scope=scope)
    body = wado.instance_metadata(store=store, views=views, urls=_urls(request))
    _audit_retrieve(session, request, principal, "view", scope, views)
    return _json(body)


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study", **_RETRIEVE_DOC)
def retrieve_study(
    study: str, request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """Every instance of the study (sources and results), one PS3.10 file per part."""
    return _retrieve(request, session, store, principal, Scope(study))


@router.get("/studies/{study}/metadata", summary="WADO-RS: study metadata", **_METADATA_DOC)
def retrieve_study_metadata(
    study: str, request: Request, session: SessionDep, store: StoreDep, principal: Viewer
) -> Response:
    """The headers of every instance of the study as DICOM JSON."""
    return _metadata(request, session, store, principal, Scope(study))


@router.get(
    "/studies/{study}/series/{series}", summary="WADO-RS: retrieve a series", **_RETRIEVE_DOC
)
def retrieve_series(
    study: str,
    series: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
) -> Response:
    """Every instance of the series."""
    return _retrieve(request, session, store, principal, Scope(study, series))


@router.get(
    "/studies/{study}/series/{series}/metadata",
    summary="WADO-RS: series metadata",
    **_METADATA_DOC,
)
def retrieve_series_metadata(
    study: str,
    series: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
) -> Response:
    """The headers of every instance of the series."""
    return _metadata(request, session, store, principal, Scope(study, series))


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}",
    summary="WADO-RS: retrieve an instance",
    **_RETRIEVE_DOC,
)
def retrieve_instance(
    study: str,
    series: str,
    instance: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
) -> Response:
    """One instance as a single-part multipart/related body."""
    return _retrieve(request, session, store, principal, Scope(study, series, instance))


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="WADO-RS: instance metadata",
    **_METADATA_DOC,
)
def retrieve_instance_metadata(
    study: str,
    series: str,
    instance: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
) -> Response:
    """The instance header as DICOM JSON (bulk data by BulkDataURI)."""
    return _metadata(request, session, store, principal, Scope(study, series, instance))


def _one_instance(session: SessionDep, store: StoreDep, scope: Scope) -> InstanceView:
    return wado.resolve_instances(session=session, store=store, scope=scope)[0]


def _rendered(
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Principal,
    scope: Scope,
    frame: int,
    window: str | None,
) -> Response:
    media_type = choose_media_type(request.headers.get("accept"))
    view = _one_instance(session, store, scope)
    image = render_frame(
        store.get(view.blob_key), frame=frame, media_type=media_type, window=parse_window(window)
    )
    _audit_retrieve(session, request, principal, "view", scope, [view])
    return Response(image, media_type=media_type)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="WADO-RS: instance rendered as JPEG or PNG",
    **_RENDERED_DOC,
)
def retrieve_instance_rendered(
    study: str,
    series: str,
    instance: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
    window: Annotated[str | None, Query(description="center,width[,LINEAR|SIGMOID]")] = None,
) -> Response:
    """The first frame as an image (JPEG by default, PNG with ``Accept: image/png``)."""
    return _rendered(request, session, store, principal, Scope(study, series, instance), 0, window)


def _frame_numbers(frames: str) -> list[int]:
    try:
        numbers = [int(f) for f in frames.split(",") if f.strip()]
    except ValueError as exc:
        raise BadRequest("invalid_frames", f"frame list {frames[:40]!r} is not 1,2,...") from exc
    if not numbers or any(n < 1 for n in numbers):
        raise BadRequest("invalid_frames", f"frame numbers start at 1: {frames[:40]!r}")
    return numbers


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}/rendered",
    summary="WADO-RS: one frame rendered as JPEG or PNG",
    **_RENDERED_DOC,
)
def retrieve_frame_rendered(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
    window: Annotated[str | None, Query(description="center,width[,LINEAR|SIGMOID]")] = None,
) -> Response:
    """Frame ``frames`` (one 1-based number) as an image."""
    numbers = _frame_numbers(frames)
    if len(numbers) != 1:
        raise BadRequest("invalid_frames", "a rendered frame request names exactly one frame")
    scope = Scope(study, series, instance)
    return _rendered(request, session, store, principal, scope, numbers[0] - 1, window)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="WADO-RS: uncompressed frames",
    **_FRAMES_DOC,
)
def retrieve_frames(
    study: str,
    series: str,
    instance: str,
    frames: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
) -> Response:
    """Frames as ``application/octet-stream`` parts, native little endian (PS3.18 §8.7.3.5)."""
    numbers = _frame_numbers(frames)
    scope = Scope(study, series, instance)
    view = _one_instance(session, store, scope)
    values = wado.frame_values(store=store, view=view, frames=numbers)
    _audit_retrieve(session, request, principal, "download", scope, [view])
    return _octet_parts(values)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/bulk/{tag}",
    summary="WADO-RS: bulk data of a metadata BulkDataURI",
    **_FRAMES_DOC,
)
def retrieve_bulk(
    study: str,
    series: str,
    instance: str,
    tag: str,
    request: Request,
    session: SessionDep,
    store: StoreDep,
    principal: Viewer,
) -> Response:
    """A top-level bulk data element, uncompressed little endian."""
    scope = Scope(study, series, instance)
    view = _one_instance(session, store, scope)
    value = wado.bulk_value(store=store, view=view, tag=int(parse_tag(tag)))
    _audit_retrieve(session, request, principal, "download", scope, [view])
    return _octet_parts([value])


def _octet_parts(values: list[bytes]) -> Response:
    boundary = new_boundary()
    part_type = "application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
    body = b"".join(encode_parts(((part_type, v) for v in values), boundary))
    return Response(body, media_type=related_content_type(boundary, "application/octet-stream"))
