"""FastAPI dependencies: settings, the unit of work, the caller, the blob store, the registry.

FastAPI runs a plain ``def`` dependency in its thread pool: one hand-off between the event loop
and a worker thread for each, two for a generator. A read of a result is a few milliseconds of
work, and under load those hand-offs (a queue, a lock, a wake-up of the loop) cost as much as the
read itself. So the dependencies that do no I/O are ``async def`` and run on the loop; the
unit of work opens its session there too (no I/O until first use) and hands only its ending —
commit or rollback, and the connection's return to the pool — to a worker thread.

A unit of work holds its connection between those hand-offs, so requests in flight, not
threads, are what need connections. With more of them than the pool can give, threads
blocked waiting for a connection took every thread the holders needed to finish, and the
API stalled until the pool's 30 s timeout answered 503 (measured: 127 of 240 reads, 80 at a
time, with a pool of 2 + 10). So at most ``Settings.db_pool_size`` units of work run at once
per API process (``db_admission``, set by the application's lifespan); the others wait on the
event loop, holding neither a thread nor a connection. The pool's overflow connections stay
for the work that takes a connection inside a single thread call (uploads, probes, the
sweeper), which never waits for a thread while holding one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from functools import lru_cache
from typing import Annotated

import anyio
from fastapi import Depends, Request
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from app.auth.service import Principal, authenticate
from app.db.records import Role
from app.db.session import get_sessionmaker
from app.registry.service import RegisteredModel, current_registry
from app.settings import Settings, get_settings
from app.storage import BlobStore


async def _settings() -> Settings:
    return get_settings()


SettingsDep = Annotated[Settings, Depends(_settings)]


def _commit(session: Session) -> None:
    try:
        session.commit()
    finally:
        session.close()


def _roll_back(session: Session) -> None:
    try:
        session.rollback()
    finally:
        session.close()


async def _admitted(request: Request, stack: AsyncExitStack) -> None:
    """Wait (on the event loop) until fewer than ``db_pool_size`` units of work are running."""
    admission: anyio.Semaphore | None = getattr(request.app.state, "db_admission", None)
    if admission is None:  # an application started without its lifespan
        return
    try:
        admission.acquire_nowait()  # the common case: no checkpoint, no wait
    except anyio.WouldBlock:
        await admission.acquire()
    stack.callback(admission.release)


async def get_session(request: Request) -> AsyncIterator[Session]:
    """One unit of work per request: commit before the response is sent, roll back on error."""
    async with AsyncExitStack() as stack:
        await _admitted(request, stack)
        session = get_sessionmaker()()
        try:
            yield session
        except BaseException:
            with anyio.CancelScope(shield=True):  # a dropped client must not leak the connection
                await run_in_threadpool(_roll_back, session)
            raise
        with anyio.CancelScope(shield=True):
            await run_in_threadpool(_commit, session)


# scope="function": the commit happens before the response leaves, so a 2xx means committed.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


@lru_cache(maxsize=4)
def _store(root: str) -> BlobStore:
    from pathlib import Path

    return BlobStore(Path(root))


def get_store(settings: Settings) -> BlobStore:
    """The blob store of these settings."""
    return _store(str(settings.blob_dir))


async def _store_dep(settings: SettingsDep) -> BlobStore:
    return get_store(settings)


StoreDep = Annotated[BlobStore, Depends(_store_dep)]


def get_registry(settings: SettingsDep) -> dict[str, RegisteredModel]:
    """Registered models (re-read when a manifest changes: new versions appear without restart)."""
    return current_registry(settings.models_dir)


RegistryDep = Annotated[dict[str, RegisteredModel], Depends(get_registry)]


def bearer_token(request: Request) -> str | None:
    """The bearer token of the request, if any (never taken from the URL)."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def get_principal(request: Request, session: SessionDep) -> Principal:
    """Authenticate the caller (before any request body is read)."""
    principal = authenticate(session=session, token=bearer_token(request))
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


def require(role: Role) -> object:
    """A dependency that requires at least ``role``."""

    async def _check(principal: PrincipalDep) -> Principal:
        principal.require(role)
        return principal

    return Depends(_check)


def client_address(request: Request) -> str | None:
    """The peer address, for audit events."""
    return request.client.host if request.client else None
