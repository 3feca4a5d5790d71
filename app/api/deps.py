"""FastAPI dependencies: settings, the unit of work, the caller, the blob store, the registry."""

from __future__ import annotations

from collections.abc import Iterator
from functools import lru_cache
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from app.auth.service import Principal, authenticate
from app.db.records import Role
from app.db.session import get_sessionmaker
from app.registry.service import RegisteredModel, current_registry
from app.settings import Settings, get_settings
from app.storage import BlobStore

SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_session() -> Iterator[Session]:
    """One unit of work per request: commit before the response is sent, roll back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# scope="function": the commit happens before the response leaves, so a 2xx means committed.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]


@lru_cache(maxsize=4)
def _store(root: str) -> BlobStore:
    from pathlib import Path

    return BlobStore(Path(root))


def get_store(settings: SettingsDep) -> BlobStore:
    """The blob store of these settings."""
    return _store(str(settings.blob_dir))


StoreDep = Annotated[BlobStore, Depends(get_store)]


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

    def _check(principal: PrincipalDep) -> Principal:
        principal.require(role)
        return principal

    return Depends(_check)


def client_address(request: Request) -> str | None:
    """The peer address, for audit events."""
    return request.client.host if request.client else None
