"""The Celery application of the worker process, with medcad's reliability settings.

Settings come from ``app.queue.make_celery`` (shared with the producer): late acks, reject on
worker loss, prefetch 1, JSON only, no result backend, hard time limit well under the broker's
visibility timeout.
"""

from __future__ import annotations

from typing import Any

from celery import bootsteps
from celery.signals import worker_init, worker_process_init

from app.db.session import reset_engine
from app.jobs.sweeper import start_sweeper
from app.logging_setup import configure_logging
from app.queue import make_celery
from app.settings import get_settings
from workers.warmup import warm_output_path

celery_app = make_celery(get_settings())
celery_app.conf.update(
    include=["workers.tasks"],
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    worker_enable_remote_control=False,
    worker_cancel_long_running_tasks_on_connection_loss=True,
)

# How often the consumer asks the Redis broker for its run id (one INFO command).
BROKER_CHECK_SECONDS = 5.0


class BrokerRestartWatch(bootsteps.StartStopStep):  # type: ignore[misc]
    """Reconnect the consumer when the Redis broker restarted under it.

    If Redis dies while every prefetch slot is busy, no BRPOP is in flight: the loss shows only as
    a swallowed ack error, and once Redis is back the consumer never polls again — the worker
    looks alive and consumes nothing (celery/celery#8030, #9054; reproduced by the Q4/Q5 fault
    tests). Every few seconds this step reads the broker's run id; an unreachable broker or a new
    run id raises a connection error inside the event loop, which is Celery's own signal to
    reconnect the consumer and poll again.

    The run id is read over a connection of its own. Sending INFO through the consumer channel's
    client shares that channel's sockets with the event loop's BRPOP and, now and then, reads one
    reply in place of the other: a spurious "connection lost" that made Celery terminate the
    running tasks (``worker_cancel_long_running_tasks_on_connection_loss``) and cost healthy jobs
    an attempt (seen in the Q6 database-outage test).
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self.tref: Any = None
        self.run_id: str | None = None
        self.client: Any = None

    def start(self, parent: Any) -> None:
        connection = parent.connection
        if connection is None or connection.transport.driver_type != "redis":
            return  # the filesystem broker of the embedded shape cannot restart under us
        import redis

        self.client = redis.Redis.from_url(
            connection.as_uri(include_password=True),
            socket_connect_timeout=BROKER_CHECK_SECONDS / 2,
            socket_timeout=BROKER_CHECK_SECONDS / 2,
        )
        self.run_id = self._run_id()
        self.tref = parent.timer.call_repeatedly(BROKER_CHECK_SECONDS, self._check, (parent,))

    def stop(self, parent: Any) -> None:
        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if self.client is not None:
            self.client.close()
            self.client = None

    shutdown = stop

    def _run_id(self) -> str:
        return str(self.client.info("server")["run_id"])

    def _check(self, parent: Any) -> None:
        import redis

        if parent.connection is None or self.client is None:
            return  # the consumer is reconnecting already
        try:
            run_id = self._run_id()
        except redis.exceptions.RedisError as exc:
            raise redis.exceptions.ConnectionError("the Redis broker is unreachable") from exc
        if run_id != self.run_id:
            raise redis.exceptions.ConnectionError("the Redis broker restarted; reconnecting")


celery_app.steps["consumer"].add(BrokerRestartWatch)


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _after_fork(**_kwargs: Any) -> None:
    # Database connections must not be shared across fork; sessions are created lazily per child.
    reset_engine()


@worker_init.connect  # type: ignore[untyped-decorator]
def _on_worker_start(**_kwargs: Any) -> None:
    settings = get_settings()
    configure_logging(settings.log_level, settings.log_json)
    warm_output_path()  # before the pool forks: every child, and every replacement, inherits it
    if settings.worker_sweeper:
        start_sweeper(settings)
