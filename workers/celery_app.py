"""The Celery application of the worker process, with medcad's reliability settings.

Settings come from ``app.queue.make_celery`` (shared with the producer): late acks, reject on
worker loss, prefetch 1, JSON only, no result backend, hard time limit well under the broker's
visibility timeout.
"""

from __future__ import annotations

from typing import Any

from celery.signals import worker_init, worker_process_init

from app.db.session import reset_engine
from app.jobs.sweeper import start_sweeper
from app.logging_setup import configure_logging
from app.queue import make_celery
from app.settings import get_settings

celery_app = make_celery(get_settings())
celery_app.conf.update(
    include=["workers.tasks"],
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    worker_enable_remote_control=False,
    worker_cancel_long_running_tasks_on_connection_loss=True,
)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _after_fork(**_kwargs: Any) -> None:
    # Database connections must not be shared across fork; sessions are created lazily per child.
    reset_engine()


@worker_init.connect  # type: ignore[untyped-decorator]
def _on_worker_start(**_kwargs: Any) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    if settings.worker_sweeper:
        start_sweeper(settings)
