"""Checks every upload route makes before it reads a body: caller, capacity, ingest budgets.

Shared by the REST upload (``POST /api/v1/studies``) and STOW-RS (``POST /dicomweb/studies``):
both authenticate and refuse work while the queue is full before the first byte of the body is
read, and both ingest under the same budgets.
"""

from __future__ import annotations

from app.auth.service import Principal, authenticate
from app.db.records import Role
from app.db.session import session_scope
from app.errors import Overloaded
from app.jobs.service import queue_depth
from app.settings import Settings
from app.studies.validation import IngestLimits


def ingest_limits(settings: Settings) -> IngestLimits:
    """The ingest budgets configured in ``settings``."""
    return IngestLimits(
        max_decoded_bytes=settings.max_decoded_bytes,
        max_zip_members=settings.max_zip_members,
        max_zip_member_ratio=settings.max_zip_ratio,
    )


def admit_upload(token: str | None, settings: Settings) -> Principal:
    """The caller of an upload route, once it may send work.

    401 without a valid key, 403 below the uploader role, then 429 while the queue is over its
    configured depth. Both reads share one database session (one connection check-out and
    one transaction per upload instead of two).
    """
    with session_scope() as session:
        principal = authenticate(session=session, token=token)
        principal.require(Role.UPLOADER)
        depth = queue_depth(session=session)
    if depth >= settings.max_queue_depth:
        raise Overloaded(
            detail=f"{depth} jobs are queued (limit {settings.max_queue_depth}); retry later",
            retry_after=30,
            status=429,
        )
    return principal
