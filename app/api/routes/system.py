"""Health, readiness, metrics, the caller's identity, models and the audit log."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from app.api.deps import PrincipalDep, RegistryDep, SessionDep, SettingsDep, require
from app.api.schemas import (
    ERRORS,
    AuditEvent,
    AuditPage,
    Me,
    ModelLabel,
    ModelList,
    ModelOut,
)
from app.auth.service import Principal, list_audit
from app.db.records import Role
from app.db.session import session_scope
from app.jobs.service import consumption_stall
from app.metrics import exposition
from app.registry.service import latest_versions

router = APIRouter(tags=["system"])


@router.get(
    "/healthz",
    summary="Liveness",
    responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}},
)
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


_READY = {"database": "ok", "broker": "ok", "models": "ok", "workers": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: database, broker folder/connection, models, queue consumption",
    responses={
        200: {
            "description": "Ready",
            "content": {"application/json": {"example": {"status": "ok", "checks": _READY}}},
        },
        503: {
            "description": "Not ready; the failing checks say why",
            "content": {
                "application/json": {
                    "example": {
                        "status": "unavailable",
                        "checks": {**_READY, "database": "error: OperationalError"},
                    }
                }
            },
        },
    },
)
def readyz(settings: SettingsDep, registry: RegistryDep) -> JSONResponse:
    """200 when the database answers, the broker is reachable, at least one model is valid and
    the workers consume the queue (no job waits longer than ``worker_stall_seconds`` while
    nothing runs: the silent stop after a broker reconnect, celery#8030)."""
    checks: dict[str, str] = {}
    try:
        with session_scope() as session:
            session.execute(text("SELECT 1"))
            stall = consumption_stall(session=session, after_seconds=settings.worker_stall_seconds)
        checks["database"] = "ok"
        checks["workers"] = (
            "ok"
            if stall is None
            else f"error: {stall.waiting} job(s) queued for up to {stall.oldest_seconds:.0f} s "
            "and no worker consuming"
        )
    except Exception as exc:  # readiness reports, never raises
        checks["database"] = f"error: {type(exc).__name__}"
        checks["workers"] = "unknown: no database"
    checks["broker"] = _broker_check(settings)
    checks["models"] = "ok" if registry else "error: no valid model manifest"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503
    )


def _broker_check(settings: SettingsDep) -> str:
    if settings.is_embedded:
        return "ok" if settings.broker_dir.parent.exists() else "error: no broker folder"
    try:
        import redis

        client = redis.Redis.from_url(
            settings.resolved_broker_url, socket_connect_timeout=2, socket_timeout=2
        )
        client.ping()
        return "ok"
    except Exception as exc:  # readiness reports, never raises
        return f"error: {type(exc).__name__}"


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "description": "Prometheus text exposition format",
            "content": {
                "text/plain": {
                    "schema": {"type": "string"},
                    "example": 'medcad_files_total{outcome="stored"} 80.0\n',
                }
            },
        }
    },
)
def metrics() -> Response:
    """Prometheus text format: this process's counters and the jobs' figures."""
    return Response(exposition(), media_type=CONTENT_TYPE_LATEST)


@router.get("/api/v1/me", response_model=Me, responses=ERRORS, summary="Who am I")
def me(principal: PrincipalDep) -> Me:
    """The calling key's name and role (used by the page to sign in)."""
    return Me(name=principal.name, role=principal.role.value, key_prefix=principal.prefix)


@router.get(
    "/api/v1/models", response_model=ModelList, responses=ERRORS, summary="Registered models"
)
def models(registry: RegistryDep, _principal: PrincipalDep) -> ModelList:
    """Every registered model version, newest first per name."""
    latest = {m.manifest.key for m in latest_versions(registry).values()}
    items = []
    for key in sorted(registry, key=lambda k: (k not in latest, k)):
        m = registry[key].manifest
        items.append(
            ModelOut(
                name=m.name,
                version=m.version,
                task=m.task.value,
                description=m.description,
                labels=[
                    ModelLabel(value=lab.value, name=lab.name, color=lab.color) for lab in m.labels
                ],
                default=m.default and key in latest,
                saliency_methods=[s.value for s in m.saliency.methods],
                input_size=m.preprocessing.size,
                metrics=m.metrics,
            )
        )
    return ModelList(items=items)


@router.get(
    "/api/v1/audit", response_model=AuditPage, responses=ERRORS, summary="Audit log (admins)"
)
def audit(
    session: SessionDep,
    _principal: Annotated[Principal, require(Role.ADMIN)],
    action: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,  # SQL integers are 64-bit
) -> AuditPage:
    """Audit events, newest first."""
    rows, total = list_audit(session=session, limit=limit, offset=offset, action=action)
    return AuditPage(
        items=[
            AuditEvent(
                id=r.id,
                at=r.at,
                actor_name=r.actor_name,
                action=r.action,
                resource=r.resource,
                outcome=r.outcome,
                client=r.client,
                study_instance_uid=r.study_instance_uid,
                series_instance_uid=r.series_instance_uid,
            )
            for r in rows
        ],
        total=total,
        limit=limit,
        offset=offset,
    )
