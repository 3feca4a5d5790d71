"""Jobs: status, listing, and the results of a finished job."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import APIRouter, Query, Request
from sqlalchemy.orm import Session

from app.api.deps import SessionDep, client_address, require
from app.api.schemas import ERRORS, NOT_FOUND, Job, JobError, JobPage, JobWarning, Webhook
from app.auth.service import Principal, record_audit
from app.db.records import JobRecord, JobStatus, Role, SeriesRecord, StudyRecord
from app.jobs import service as jobs

router = APIRouter(prefix="/api/v1", tags=["jobs"])
Viewer = Annotated[Principal, require(Role.VIEWER)]


def job_schema(session: Session, job: JobRecord, series: SeriesRecord, study: StudyRecord) -> Job:
    """The API view of a job."""
    position = jobs.queue_position(session=session, job=job)
    webhook = None
    if job.callback_url:
        webhook = Webhook(
            url_host=urlsplit(job.callback_url).hostname or "",
            status=job.webhook_status or "pending",
            attempts=job.webhook_attempts,
        )
    return Job(
        id=job.id,
        status=JobStatus(job.status).value,
        stage=job.stage,
        queue_position=position,
        eta_seconds=jobs.eta_seconds(session=session, job=job, position=position),
        models=list(job.models),
        timings=dict(job.timings or {}),
        error=JobError(code=job.error_code, detail=job.error_detail or "")
        if job.error_code
        else None,
        warnings=[JobWarning(**w) for w in (job.warnings or [])],
        attempts=job.attempts,
        created_at=job.created_at,
        started_at=job.started_at,
        results_at=job.results_at,
        finished_at=job.finished_at,
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        modality=series.modality,
        instance_count=job.instance_count,
        uncertain=job.uncertain,
        webhook=webhook,
    )


@router.get("/jobs", response_model=JobPage, responses=ERRORS, summary="List jobs")
def list_jobs(
    request: Request,
    session: SessionDep,
    principal: Viewer,
    status: Annotated[JobStatus | None, Query(description="Filter by status")] = None,
    study_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    series_instance_uid: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> JobPage:
    """Jobs, newest first, with filters and paging."""
    rows, total = jobs.list_jobs(
        session=session,
        limit=limit,
        offset=offset,
        status=status.value if status else None,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
    )
    record_audit(
        session=session,
        principal=principal,
        action="search",
        resource="jobs",
        client=client_address(request),
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
    )
    return JobPage(
        items=[job_schema(session, j, s, st) for j, s, st in rows],
        total=total,
        limit=limit,
        offset=offset,
    )


@router.get(
    "/jobs/{job_id}", response_model=Job, responses={**ERRORS, **NOT_FOUND}, summary="Job status"
)
def get_job(job_id: str, request: Request, session: SessionDep, principal: Viewer) -> Job:
    """A job's status, queue position, stage, timings and error."""
    job, series, study = jobs.get_job_context(session=session, job_id=job_id)
    record_audit(
        session=session,
        principal=principal,
        action="view",
        resource=f"job/{job.id}",
        client=client_address(request),
        study_instance_uid=study.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
    )
    return job_schema(session, job, series, study)
