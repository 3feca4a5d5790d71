"""Jobs: the status machine, leases, queue position and the sweeper.

States: queued → running → succeeded | failed. A running job whose lease expired (its worker
died) goes back to queued, unless it has already been attempted ``max_attempts`` times, in which
case it ends failed with code ``worker_lost`` — never an infinite loop.
"""

from __future__ import annotations

import os
import socket
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.orm import Session

from app.db.records import JobRecord, JobStatus, SeriesRecord, StudyRecord, utcnow
from app.errors import NotFound

TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED)


def _aware(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=utcnow().tzinfo)


def lease_owner() -> str:
    """Identity of this process, for leases: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_dead_here(owner: str | None) -> bool:
    """True if ``owner`` is a process on this host that no longer exists."""
    if not owner or ":" not in owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def get_job(*, session: Session, job_id: str) -> JobRecord:
    """The job, or ``NotFound``."""
    job = session.get(JobRecord, job_id)
    if job is None:
        raise _no_job(job_id)
    return job


def _no_job(job_id: str) -> NotFound:
    return NotFound(detail=f"no job {job_id[:64]!r}")


def get_job_context(
    *, session: Session, job_id: str
) -> tuple[JobRecord, SeriesRecord, StudyRecord]:
    """The job with its series and study (one query), or ``NotFound``."""
    row = session.execute(
        select(JobRecord, SeriesRecord, StudyRecord)
        .join(SeriesRecord, SeriesRecord.id == JobRecord.series_id)
        .join(StudyRecord, StudyRecord.id == SeriesRecord.study_id)
        .where(JobRecord.id == job_id)
    ).first()
    if row is None:
        raise _no_job(job_id)
    return row[0], row[1], row[2]


def list_jobs(
    *,
    session: Session,
    limit: int,
    offset: int,
    status: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
) -> tuple[list[tuple[JobRecord, SeriesRecord, StudyRecord]], int]:
    """Jobs newest first, with filters, and the total count."""
    query = (
        select(JobRecord, SeriesRecord, StudyRecord)
        .join(SeriesRecord, SeriesRecord.id == JobRecord.series_id)
        .join(StudyRecord, StudyRecord.id == SeriesRecord.study_id)
    )
    if status:
        query = query.where(JobRecord.status == status)
    if study_instance_uid:
        query = query.where(StudyRecord.study_instance_uid == study_instance_uid)
    if series_instance_uid:
        query = query.where(SeriesRecord.series_instance_uid == series_instance_uid)
    total = session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = session.execute(
        query.order_by(JobRecord.created_at.desc(), JobRecord.id).limit(limit).offset(offset)
    ).tuples()
    return list(rows), total


def queue_depth(*, session: Session) -> int:
    """Number of queued jobs."""
    return int(
        session.scalar(
            select(func.count()).select_from(JobRecord).where(JobRecord.status == JobStatus.QUEUED)
        )
        or 0
    )


def queue_position(*, session: Session, job: JobRecord) -> int | None:
    """1-based position among queued jobs (oldest first), None unless queued."""
    if job.status != JobStatus.QUEUED:
        return None
    ahead = session.scalar(
        select(func.count())
        .select_from(JobRecord)
        .where(JobRecord.status == JobStatus.QUEUED, JobRecord.created_at < job.created_at)
    )
    return int(ahead or 0) + 1


@dataclass(frozen=True)
class Stall:
    """Jobs wait and no worker consumes: what ``consumption_stall`` found."""

    waiting: int
    oldest_seconds: float


def consumption_stall(*, session: Session, after_seconds: float) -> Stall | None:
    """Whether the workers have stopped consuming the queue.

    Stalled means: a job created more than ``after_seconds`` ago is still queued, while no
    job holds a live lease and none started or finished within that time. A busy worker (a
    running job) or a slow one (recent starts) is not stalled; an idle worker whose consumer
    silently stopped after a broker reconnect (celery#8030) is, as soon as work waits for it.
    No waiting work: never stalled.
    """
    now = utcnow()
    horizon = now - timedelta(seconds=after_seconds)
    # created_at, not enqueued_at: the sweeper refreshes enqueued_at when it re-sends a job
    waiting, oldest = session.execute(
        select(func.count(), func.min(JobRecord.created_at)).where(
            JobRecord.status == JobStatus.QUEUED, JobRecord.created_at < horizon
        )
    ).one()
    if not waiting:
        return None
    active = session.scalar(
        select(func.count())
        .select_from(JobRecord)
        .where(
            or_(
                and_(JobRecord.status == JobStatus.RUNNING, JobRecord.lease_expires_at > now),
                JobRecord.started_at > horizon,
                JobRecord.finished_at > horizon,
            )
        )
    )
    if active:
        return None
    oldest_at = _aware(oldest)
    age = (now - oldest_at).total_seconds() if oldest_at is not None else after_seconds
    return Stall(waiting=int(waiting), oldest_seconds=round(age, 1))


def recent_duration(*, session: Session, sample: int = 20) -> float | None:
    """Median wall time of the last ``sample`` succeeded jobs (seconds)."""
    rows = session.execute(
        select(JobRecord.started_at, JobRecord.finished_at)
        .where(JobRecord.status == JobStatus.SUCCEEDED, JobRecord.finished_at.is_not(None))
        .order_by(JobRecord.finished_at.desc())
        .limit(sample)
    ).tuples()
    durations = [(f - s).total_seconds() for s, f in rows if s is not None and f is not None]
    return statistics.median(durations) if durations else None


def eta_seconds(*, session: Session, job: JobRecord, position: int | None) -> float | None:
    """A rough ETA: position × recent median duration (queued), remaining share (running)."""
    typical = recent_duration(session=session)
    if typical is None:
        return None
    if position is not None:
        return round(position * typical, 1)
    started = _aware(job.started_at)
    if job.status == JobStatus.RUNNING and started is not None:
        return round(max(0.0, typical - (utcnow() - started).total_seconds()), 1)
    return None


@dataclass(frozen=True)
class Claim:
    """The outcome of trying to claim a job."""

    claimed: bool
    reason: str
    attempts: int = 0


def claim_job(
    *, session: Session, job_id: str, owner: str, lease_seconds: int, max_attempts: int
) -> Claim:
    """Atomically move a job to running under a lease, counting the attempt.

    Claimable: queued, or running with an expired lease, or running under a dead process of this
    host (a killed pool child whose message was re-delivered). A job already attempted
    ``max_attempts`` times that comes back is failed instead of run again.
    """
    job = session.get(JobRecord, job_id)
    if job is None:
        return Claim(False, "missing")
    now = utcnow()
    lease = _aware(job.lease_expires_at)
    stale = job.status == JobStatus.RUNNING and (
        (lease is not None and lease <= now) or _owner_is_dead_here(job.lease_owner)
    )
    if job.status != JobStatus.QUEUED and not stale:
        return Claim(False, f"status {job.status}", job.attempts)
    if job.attempts >= max_attempts:
        fail_job(
            session=session,
            job=job,
            code="worker_lost",
            detail=f"the job ended its worker {job.attempts} times; giving up",
        )
        return Claim(False, "attempts exhausted", job.attempts)
    result = session.execute(
        update(JobRecord)
        .where(
            JobRecord.id == job_id,
            JobRecord.attempts == job.attempts,
            JobRecord.status == job.status,
        )
        .values(
            status=JobStatus.RUNNING,
            attempts=job.attempts + 1,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
            stage="claimed",
            error_code=None,
            error_detail=None,
        )
        .execution_options(synchronize_session=False)
    )
    if getattr(result, "rowcount", 0) != 1:
        return Claim(False, "claimed elsewhere", job.attempts)
    session.refresh(job)
    return Claim(True, "claimed", job.attempts)


def renew_lease(
    *,
    session: Session,
    job_id: str,
    owner: str,
    lease_seconds: int,
    stage: str,
    timings: dict[str, float] | None = None,
) -> bool:
    """Extend the lease and record the stage; False if this process no longer owns the job."""
    values: dict[str, Any] = {
        "lease_expires_at": utcnow() + timedelta(seconds=lease_seconds),
        "stage": stage,
    }
    if timings is not None:
        values["timings"] = timings
    result = session.execute(
        update(JobRecord)
        .where(
            JobRecord.id == job_id,
            JobRecord.lease_owner == owner,
            JobRecord.status == JobStatus.RUNNING,
        )
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


def release_job(*, session: Session, job_id: str, owner: str) -> bool:
    """Give back a running job ``owner`` holds: queued again, its current attempt not counted.

    For interruptions that are not the job's doing (the database went away mid-run): only jobs
    that kill their worker should move towards ``max_attempts``. False if ``owner`` no longer
    holds the job (its lease was reclaimed, or it finished).
    """
    result = session.execute(
        update(JobRecord)
        .where(
            JobRecord.id == job_id,
            JobRecord.lease_owner == owner,
            JobRecord.status == JobStatus.RUNNING,
        )
        .values(
            status=JobStatus.QUEUED,
            attempts=JobRecord.attempts - 1,  # ≥ 1 while running: the claim counted it
            lease_owner=None,
            lease_expires_at=None,
            stage=None,
            enqueued_at=utcnow(),
        )
        .execution_options(synchronize_session=False)
    )
    return getattr(result, "rowcount", 0) == 1


def fail_job(*, session: Session, job: JobRecord, code: str, detail: str) -> None:
    """Mark a job failed with a reason."""
    job.status = JobStatus.FAILED
    job.results_at = None  # a failed job serves no results, even rows an attempt committed
    job.error_code = code
    job.error_detail = detail[:2000]
    job.finished_at = utcnow()
    job.lease_expires_at = None
    job.stage = None
    if job.callback_url:
        job.webhook_status = "pending"
        job.webhook_next_at = utcnow()


def publish_results(
    *, session: Session, job: JobRecord, timings: dict[str, float], uncertain: bool | None
) -> None:
    """Make a running job's result rows readable (called in the same transaction as the rows).

    The job stays running under its lease while its DICOM objects are built; ``succeed_job``
    follows in a second transaction.
    """
    job.results_at = utcnow()
    job.timings = timings
    job.uncertain = uncertain
    job.stage = "dicom"


def results_readable(job: JobRecord) -> bool:
    """Whether ``job``'s result rows may be served.

    A succeeded job's, and a job's whose rows are committed while it builds its DICOM objects
    (running), or was handed back to the queue after that (queued, to run again: the rows of
    the earlier attempt stay readable until the new attempt replaces them as a whole).
    """
    if job.status == JobStatus.SUCCEEDED:
        return True
    return job.results_at is not None and job.status in (JobStatus.RUNNING, JobStatus.QUEUED)


def succeed_job(
    *, session: Session, job: JobRecord, timings: dict[str, float], uncertain: bool | None
) -> None:
    """Mark a job succeeded (called in the same transaction as its results)."""
    job.status = JobStatus.SUCCEEDED
    job.timings = timings
    job.uncertain = uncertain
    job.finished_at = utcnow()
    job.lease_expires_at = None
    job.stage = None
    if job.callback_url:
        job.webhook_status = "pending"
        job.webhook_next_at = utcnow()


@dataclass(frozen=True)
class SweepReport:
    """What one sweep did."""

    resent: list[str]
    reclaimed: list[str]
    failed: list[str]


def sweep_jobs(
    *,
    session: Session,
    resend_after: float,
    max_attempts: int,
    messages_waiting: Callable[[], int | None] | None = None,
) -> SweepReport:
    """Find lost work: queued jobs never picked up, running jobs whose lease expired.

    Returns the ids to (re-)send; the caller sends them after committing.

    ``messages_waiting`` counts the messages the broker still holds for the job queue (None
    when it cannot say). A queued job whose message is merely waiting behind a backlog (or
    for stopped workers) is not lost, and re-sending every job that has waited longer than
    ``resend_after`` on every sweep multiplied the broker's messages by the backlog's age.
    So only as many stale jobs as the broker is short of messages (queued jobs minus waiting
    messages, counted in that order) are re-sent, those sent longest ago first; the rest wait
    for the next sweep. Without a count, every stale job is re-sent.
    """
    now = utcnow()
    resend_before = now - timedelta(seconds=resend_after)
    stale = (
        select(JobRecord)
        .where(
            JobRecord.status == JobStatus.QUEUED,
            or_(JobRecord.enqueued_at.is_(None), JobRecord.enqueued_at < resend_before),
        )
        .order_by(JobRecord.enqueued_at)
    )
    if messages_waiting is not None:
        queued = session.scalar(
            select(func.count()).select_from(JobRecord).where(JobRecord.status == JobStatus.QUEUED)
        )
        waiting = messages_waiting()
        if waiting is not None:
            stale = stale.limit(max(0, int(queued or 0) - waiting))
    stale_queued = list(session.scalars(stale))
    expired = list(
        session.scalars(
            select(JobRecord).where(
                and_(JobRecord.status == JobStatus.RUNNING, JobRecord.lease_expires_at < now)
            )
        )
    )
    resent, reclaimed, failed = [], [], []
    for job in stale_queued:
        job.enqueued_at = now
        resent.append(job.id)
    for job in expired:
        if job.attempts >= max_attempts:
            fail_job(
                session=session,
                job=job,
                code="worker_lost",
                detail=f"the job's worker stopped responding {job.attempts} times; giving up",
            )
            failed.append(job.id)
        else:
            job.status = JobStatus.QUEUED
            job.stage = None
            job.lease_owner = None
            job.lease_expires_at = None
            job.enqueued_at = now
            reclaimed.append(job.id)
    return SweepReport(resent=resent, reclaimed=reclaimed, failed=failed)
