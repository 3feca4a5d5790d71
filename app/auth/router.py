"""API keys over REST (admins only): create (the key is shown once), list, read one, revoke.

The same operations as ``medcad keys create|list|revoke``; every change writes an audit event in
the same transaction. Listings never contain a key or its hash, only the lookup prefix.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import SessionDep, client_address, require
from app.api.schemas import ERRORS, NOT_FOUND, ErrorBody, Page, UtcDatetime
from app.auth.service import (
    Principal,
    create_key,
    find_key,
    list_keys,
    record_audit,
    revoke_key,
)
from app.db.records import ApiKeyRecord, Role, utcnow

router = APIRouter(prefix="/api/v1/keys", tags=["keys"])
Admin = Annotated[Principal, require(Role.ADMIN)]
Prefix = Annotated[str, Path(min_length=1, max_length=16, pattern=r"^[A-Za-z0-9-]+$")]


class KeyCreate(BaseModel):
    """A new key: who it is for, its role, and optionally how long it lives."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(
        min_length=1, max_length=128, pattern=r"^[^\x00-\x1f\x7f]+$", examples=["pacs-bridge"]
    )
    role: Role = Field(examples=["uploader"])
    expires_in_days: float | None = Field(default=None, gt=0, le=3650, examples=[90])


_EXAMPLE_KEY: dict[str, Any] = {
    "prefix": "3f9a1c2b",
    "name": "pacs-bridge",
    "role": "uploader",
    "created_at": "2026-01-05T09:00:00Z",
    "expires_at": "2026-04-05T09:00:00Z",
    "revoked_at": None,
    "last_used_at": "2026-01-05T09:31:12Z",
}


class KeyOut(BaseModel):
    """A key as listed: never the key itself nor its hash."""

    model_config = ConfigDict(json_schema_extra={"examples": [_EXAMPLE_KEY]})

    prefix: str
    name: str
    role: Role
    created_at: UtcDatetime
    expires_at: UtcDatetime | None
    revoked_at: UtcDatetime | None
    last_used_at: UtcDatetime | None


class KeyCreated(KeyOut):
    """A created key, with the secret shown this once."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{**_EXAMPLE_KEY, "last_used_at": None, "key": "mc_3f9a1c2b_" + "x" * 40}]
        }
    )

    key: str = Field(description="The API key; it is not stored and cannot be shown again.")


class KeyPage(Page):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"items": [_EXAMPLE_KEY], "total": 1, "limit": 50, "offset": 0}]
        }
    )

    items: list[KeyOut]


def _key_out(record: ApiKeyRecord) -> KeyOut:
    return KeyOut(
        prefix=record.prefix,
        name=record.name,
        role=Role(record.role),
        created_at=record.created_at,
        expires_at=record.expires_at,
        revoked_at=record.revoked_at,
        last_used_at=record.last_used_at,
    )


@router.post(
    "",
    status_code=201,
    response_model=KeyCreated,
    responses={
        201: {
            "description": "The key, shown this once",
            "headers": {
                "Location": {
                    "description": "The new key's resource, /api/v1/keys/{prefix}",
                    "schema": {"type": "string"},
                }
            },
        },
        **ERRORS,
        400: {"model": ErrorBody, "description": "The body is not JSON"},
        413: {"model": ErrorBody, "description": "Body over the request size limit"},
        422: {"model": ErrorBody, "description": "Invalid key request"},
    },
    summary="Create an API key (admins; the key is shown once)",
)
def create(
    body: KeyCreate, request: Request, response: Response, session: SessionDep, principal: Admin
) -> KeyCreated:
    """Create a key with a role and an optional lifetime; answer the key once.

    ``Location`` names the new key's own resource, ``GET /api/v1/keys/{prefix}``.
    """
    expires = utcnow() + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    record, token = create_key(session=session, name=body.name, role=body.role, expires_at=expires)
    record_audit(
        session=session,
        principal=principal,
        action="key_create",
        resource=f"key/{record.prefix}",
        client=client_address(request),
        detail=f"role={record.role}",
    )
    response.headers["Location"] = f"{router.prefix}/{record.prefix}"
    return KeyCreated(**_key_out(record).model_dump(), key=token)


@router.get("", response_model=KeyPage, responses=ERRORS, summary="List API keys (admins)")
def list_all(
    session: SessionDep,
    _principal: Admin,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> KeyPage:
    """Every key, newest first: prefix, name, role and lifecycle dates."""
    records = list_keys(session=session)
    return KeyPage(
        items=[_key_out(r) for r in records[offset : offset + limit]],
        total=len(records),
        limit=limit,
        offset=offset,
    )


@router.get(
    "/{prefix}",
    response_model=KeyOut,
    responses={**ERRORS, **NOT_FOUND},
    summary="Read one API key (admins; never the key itself)",
)
def read(prefix: Prefix, session: SessionDep, _principal: Admin) -> KeyOut:
    """The key with this prefix: name, role and lifecycle dates, as listed."""
    return _key_out(find_key(session=session, prefix=prefix))


@router.post(
    "/{prefix}/revoke",
    response_model=KeyOut,
    responses={**ERRORS, **NOT_FOUND},
    summary="Revoke an API key (admins; effective on the next request)",
)
def revoke(prefix: Prefix, request: Request, session: SessionDep, principal: Admin) -> KeyOut:
    """Revoke the key with this prefix; revoking twice keeps the first revocation time."""
    record = revoke_key(session=session, prefix=prefix)
    record_audit(
        session=session,
        principal=principal,
        action="key_revoke",
        resource=f"key/{record.prefix}",
        client=client_address(request),
    )
    return _key_out(record)
