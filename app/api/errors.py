"""Render every error as ``{"error": code, "detail": text}``; expected failures are never 500."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.api.schemas import ErrorBody
from app.errors import MedcadError, Overloaded

log = logging.getLogger(__name__)


def error_body(code: str, detail: str) -> dict[str, str]:
    """The one error body shape."""
    return {"error": code, "detail": detail}


async def _medcad_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, MedcadError)
    headers = {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(exc.retry_after)
    if exc.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    return JSONResponse(error_body(exc.code, exc.detail), status_code=exc.status, headers=headers)


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    return JSONResponse(
        error_body(code, str(exc.detail)),
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return JSONResponse(error_body("invalid_request", "; ".join(parts)), status_code=422)


async def _database_down(_request: Request, _exc: Exception) -> JSONResponse:
    log.warning("database unavailable")
    return JSONResponse(
        error_body("service_unavailable", "the database is unavailable; retry later"),
        status_code=503,
        headers={"Retry-After": "15"},
    )


async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
    # Never leak stack traces, SQL or paths: log the type, answer a generic body. The reference
    # is in both, so an operator can find the log line a user reports.
    reference = uuid.uuid4().hex[:16]
    log.error(
        "unexpected error: %s",
        type(exc).__name__,
        exc_info=False,
        extra={"error_reference": reference},
    )
    return JSONResponse(
        error_body("internal_error", f"an unexpected error occurred (reference {reference})"),
        status_code=500,
    )


def _document_validation_errors(app: FastAPI) -> None:
    """Make the OpenAPI description say what a 422 really is: the one error body.

    FastAPI documents request validation errors as its own ``HTTPValidationError`` (a list
    under ``detail``), but :func:`_validation_error` answers ``{"error", "detail"}``; clients
    generated from the description, and schema-driven tests, would be misled.
    """
    generate = app.openapi
    error_ref = {"$ref": "#/components/schemas/ErrorBody"}

    def openapi() -> dict[str, Any]:
        schema = generate()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.setdefault("ErrorBody", ErrorBody.model_json_schema())
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                response = operation.get("responses", {}).get("422", {})
                for media in response.get("content", {}).values():
                    if media.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                        media["schema"] = error_ref
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers on ``app`` and document them in its OpenAPI description."""
    _document_validation_errors(app)
    app.add_exception_handler(MedcadError, _medcad_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(OperationalError, _database_down)
    app.add_exception_handler(PoolTimeout, _database_down)
    app.add_exception_handler(Exception, _unexpected)
