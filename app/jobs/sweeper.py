"""The sweeper: re-sends lost queued jobs and reclaims running jobs whose lease expired.

A queued job counts as lost only when the broker holds fewer messages than there are queued
jobs (``app.jobs.service.sweep_jobs``): a backlog waiting for busy or stopped workers is left
alone instead of being sent again on every sweep.

It runs as a daemon thread in the API process of the embedded shape and in every ``medcad
worker`` process of the production shape; sweeps are idempotent, so several may run at once.
"""

from __future__ import annotations

import logging
import os
import threading

from app import queue
from app.db.session import session_scope
from app.jobs.service import SweepReport, sweep_jobs
from app.settings import Settings

log = logging.getLogger(__name__)


def sweep_once(settings: Settings) -> SweepReport:
    """One sweep: commit the state changes, then ring the doorbell for each job."""
    with session_scope() as session:
        report = sweep_jobs(
            session=session,
            resend_after=settings.queued_resend_after_seconds,
            max_attempts=settings.job_max_attempts,
            messages_waiting=queue.waiting_messages,
        )
    for job_id in report.resent + report.reclaimed:
        queue.send_job(job_id)
    if report.resent or report.reclaimed or report.failed:
        log.info(
            "sweep",
            extra={
                "resent": len(report.resent),
                "reclaimed": len(report.reclaimed),
                "failed": len(report.failed),
            },
        )
    return report


# The worker's main process forks pool children while this thread may be mid-sweep, holding
# locks (a module's import lock, a logging stream, the engine's pool) that a child would inherit
# held forever: children forked during the first sweep hung on their first import. A fork now
# waits for the sweep in progress to end (os.register_at_fork runs in the forking thread).
_SWEEPING = threading.Lock()
os.register_at_fork(
    before=_SWEEPING.acquire,
    after_in_parent=_SWEEPING.release,
    after_in_child=_SWEEPING.release,
)


def _loop(settings: Settings, stop: threading.Event) -> None:
    while not stop.wait(settings.sweeper_interval_seconds):
        try:
            with _SWEEPING:
                sweep_once(settings)
                from app.jobs.webhooks import deliver_due

                deliver_due(settings)
        except Exception as exc:  # the sweeper must survive database/broker outages
            log.warning("sweep failed: %s", type(exc).__name__)


def start_sweeper(settings: Settings) -> threading.Event:
    """Start the sweeper thread; set the returned event to stop it."""
    stop = threading.Event()
    thread = threading.Thread(
        target=_loop, args=(settings, stop), name="medcad-sweeper", daemon=True
    )
    thread.start()
    return stop
