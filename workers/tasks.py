"""Celery tasks: thin guards around the runner. Only job ids cross the queue."""

from __future__ import annotations

import logging

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.exc import OperationalError

from app.queue import RUN_JOB_TASK
from workers import runner
from workers.celery_app import celery_app

log = logging.getLogger(__name__)


@celery_app.task(  # type: ignore[untyped-decorator]
    name=RUN_JOB_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(OperationalError,),
    retry_backoff=5,
    retry_backoff_max=120,
    max_retries=50,
)
def run_job(self: object, job_id: str) -> str:
    """Run job ``job_id`` (idempotent: a finished or foreign job is skipped)."""
    try:
        return runner.run_job(job_id)
    except SoftTimeLimitExceeded:
        runner.fail_on_time_limit(job_id)
        return "failed: time_limit"
