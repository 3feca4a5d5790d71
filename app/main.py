"""The FastAPI application factory."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from app.api.errors import install_error_handlers
from app.api.routes import jobs, results, studies, system
from app.auth.router import router as keys_router
from app.auth.service import ensure_key
from app.db.records import Role
from app.db.session import session_scope
from app.dicomweb.router import router as dicomweb_router
from app.http_guard import BodyGuardMiddleware
from app.jobs.sweeper import start_sweeper
from app.ratelimit import RateLimitMiddleware, TokenBuckets
from app.settings import Settings, get_settings

log = logging.getLogger(__name__)

DESCRIPTION = """
medcad analyses DICOM images with trained segmentation (U-Net, SegNet) and classification models
and returns masks, findings and **saliency maps** that show where each model looked.

**Not for clinical use** — research and demonstration only.

Authenticate with `Authorization: Bearer <api key>`. Errors are always
`{"error": "<code>", "detail": "<text>"}`.
"""


def seed_admin_key(settings: Settings) -> None:
    """Create the admin key given in ``MEDCAD_ADMIN_API_KEY`` if it does not exist yet."""
    if settings.admin_api_key is None:
        return
    with session_scope() as session:
        ensure_key(
            session=session,
            name="admin (from settings)",
            role=Role.ADMIN,
            token=settings.admin_api_key.get_secret_value(),
        )


def create_app(settings: Settings | None = None, *, run_sweeper: bool = False) -> FastAPI:
    """Build the API application."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # created on the serving event loop; see app.api.deps for why requests are admitted
        app.state.db_admission = anyio.Semaphore(settings.db_pool_size)
        seed_admin_key(settings)
        stop: threading.Event | None = start_sweeper(settings) if run_sweeper else None
        yield
        if stop is not None:
            stop.set()

    app = FastAPI(
        title="medcad",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        license_info={"name": "Apache-2.0"},
    )
    install_error_handlers(app)
    # Outermost last: CORS, then the rate limit, then the body guard, then the routes.
    app.add_middleware(
        BodyGuardMiddleware,
        max_body_bytes=settings.max_request_body_bytes,
        max_upload_bytes=settings.max_upload_bytes,
        idle_timeout=settings.http_body_idle_timeout_seconds,
    )
    if settings.rate_limit_per_minute > 0:
        app.add_middleware(
            RateLimitMiddleware,
            buckets=TokenBuckets(
                rate_per_second=settings.rate_limit_per_minute / 60.0,
                burst=settings.rate_limit_burst,
            ),
        )
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    for module in (system, studies, jobs, results):
        app.include_router(module.router)
    app.include_router(keys_router)
    app.include_router(dicomweb_router)
    _mount_optional(app)
    return app


def create_process_app() -> FastAPI:
    """The application of one of several API processes (``medcad serve --api-processes N``).

    uvicorn starts each process fresh and builds its application from this factory: logging is
    configured from the settings here; migrations, the admin key and the sweeper are the
    supervising ``medcad serve`` process's, done once before the processes start.
    """
    from app.cli import die_with_parent
    from app.logging_setup import configure_logging

    settings = get_settings()
    die_with_parent(settings.api_supervisor_pid)
    configure_logging(settings.log_level, settings.log_json)
    return create_app(settings, run_sweeper=False)


def _mount_optional(app: FastAPI) -> None:
    """Routers that live in their own packages (page, DICOMweb) when present."""
    try:
        from app.web.router import mount_static
        from app.web.router import router as web_router
    except ImportError:
        return
    app.include_router(web_router)
    mount_static(app)
