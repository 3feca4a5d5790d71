"""Enqueue after commit: job ids collected on a session are sent only once it commits.

Registered once on SQLAlchemy's Session class: ``after_commit`` sends, ``after_rollback`` drops,
so a rolled-back upload never rings the doorbell and a committed one always does (or leaves the
job to the sweeper when the broker is down).
"""

from __future__ import annotations

from sqlalchemy import event
from sqlalchemy.orm import Session

from app import queue

_PENDING = "medcad_pending_jobs"


def enqueue_after_commit(session: Session, job_id: str) -> None:
    """Send ``job_id`` to the queue when ``session`` commits."""
    session.info.setdefault(_PENDING, []).append(job_id)


@event.listens_for(Session, "after_commit")
def _send_pending(session: Session) -> None:
    pending: list[str] = session.info.pop(_PENDING, [])
    for job_id in pending:
        queue.send_job(job_id)


@event.listens_for(Session, "after_rollback")
def _drop_pending(session: Session) -> None:
    session.info.pop(_PENDING, None)
