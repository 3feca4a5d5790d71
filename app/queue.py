"""Celery client side: send a job id by task name after the creating transaction commits.

The API never imports ``workers``; it only knows the task name. Redis (or the filesystem broker)
is a doorbell: the job row is the truth, and the sweeper re-sends jobs whose message was lost.
"""

from __future__ import annotations

import logging
from functools import lru_cache

from celery import Celery

from app.settings import Settings, get_settings

RUN_JOB_TASK = "medcad.run_job"
QUEUE_NAME = "medcad"

# How often the embedded worker looks for a message in the filesystem broker's folder. kombu's
# default of 1 s added half a second, on average, to every idle job's time to result; at 20 ms
# the wait is 10 ms on average, and the whole idle embedded deployment (API, worker, pool
# child) uses about 1.1 % of a core (0.8 % at 50 ms; measured over 30 s idle).
FILESYSTEM_POLL_SECONDS = 0.02

log = logging.getLogger(__name__)


def broker_options(settings: Settings) -> dict[str, object]:
    """Transport options shared by the API (producer) and the workers (consumer)."""
    if settings.is_embedded:
        folder = settings.broker_dir
        for sub in ("out", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            # kombu keeps its exchange tables in "control" under the current directory unless
            # told otherwise: everything the embedded broker writes stays in the data folder
            "control_folder": str(folder / "control"),
            "data_folder_in": str(folder / "out"),
            "data_folder_out": str(folder / "out"),
            "processed_folder": str(folder / "processed"),
            "store_processed": False,
            "polling_interval": FILESYSTEM_POLL_SECONDS,
        }
    # Visibility timeout must exceed the hard task time limit by a wide margin (DESIGN §5).
    return {
        "visibility_timeout": max(3600, settings.task_time_limit * 3),
        # kombu scans for unacked messages to restore every interval × throttle seconds (10 × 10
        # by default): throttle 1 makes a dead worker's messages come back at VT + ≤ 10 s.
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 5,
        "socket_timeout": 10,
        "retry_on_timeout": True,
    }


def make_celery(settings: Settings) -> Celery:
    """A Celery app configured for medcad's broker (used by both sides)."""
    app = Celery("medcad", broker=settings.resolved_broker_url)
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=True,
        task_default_queue=QUEUE_NAME,
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_time_limit=settings.task_time_limit,
        task_soft_time_limit=max(1, settings.task_time_limit - 60),
        broker_pool_limit=4,
    )
    return app


@lru_cache(maxsize=1)
def _producer() -> Celery:
    return make_celery(get_settings())


def send_job(job_id: str) -> bool:
    """Ring the doorbell for ``job_id``. Returns False (and logs) if the broker is unreachable.

    A failed send is not an error for the caller: the job row is committed and the sweeper
    re-sends queued jobs whose message never arrived.
    """
    try:
        _producer().send_task(
            RUN_JOB_TASK,
            kwargs={"job_id": job_id},
            queue=QUEUE_NAME,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.1, "interval_step": 0.5},
        )
    except Exception:  # the broker being down must never lose an acknowledged upload
        log.warning("broker unreachable; job left for the sweeper", extra={"job_id": job_id})
        return False
    return True


def waiting_messages() -> int | None:
    """Messages waiting in the job queue, not yet delivered to a worker; None if the broker
    cannot say (unreachable). Messages a worker has reserved but not acknowledged are not
    counted (kombu's ``queue_declare`` message count: Redis list lengths over the priority
    steps, or the filesystem broker's message files)."""
    try:
        with _producer().connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
            declared = conn.default_channel.queue_declare(queue=QUEUE_NAME)
            return int(declared.message_count)
    except Exception:  # an unreachable broker: the sweeper falls back to re-sending
        log.warning("broker queue depth unavailable")
        return None
