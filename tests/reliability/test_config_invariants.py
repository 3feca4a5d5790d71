"""Q12: the queue settings that make "nothing lost, nothing run twice" hold, for any settings."""

from __future__ import annotations

import pytest

from app.queue import broker_options, make_celery
from app.settings import Settings


@pytest.mark.parametrize("time_limit", [60, 1200, 5000])
def test_q12_producer_and_worker_settings(time_limit: int) -> None:
    settings = Settings(broker_url="redis://127.0.0.1:1/0", task_time_limit=time_limit)
    conf = make_celery(settings).conf
    transport = broker_options(settings)
    # late acks + requeue when a child dies: a killed child's job is redelivered, not dropped
    assert conf.task_acks_late is True
    assert conf.task_reject_on_worker_lost is True
    # reserve one task per child: a killed worker strands at most its running tasks
    assert conf.worker_prefetch_multiplier == 1
    # only job ids cross the queue, as JSON; no pickle
    assert conf.task_serializer == "json" and list(conf.accept_content) == ["json"]
    assert not conf.result_backend
    # a running task must never outlive the visibility timeout (it would be delivered again)
    visibility = transport["visibility_timeout"]
    assert isinstance(visibility, int) and visibility >= 2 * conf.task_time_limit
    assert conf.task_soft_time_limit < conf.task_time_limit
    # a dead worker's unacked messages come back after VT + one 10 s scan, not VT + 100 s
    assert transport["unacked_restore_throttle"] == 1
    # a publish to a dead broker gives up quickly (the sweeper re-sends the job)
    assert transport["socket_connect_timeout"] <= 5 and transport["socket_timeout"] <= 10


def test_q12_task_options_and_worker_only_settings() -> None:
    from workers.celery_app import BrokerRestartWatch, celery_app
    from workers.tasks import run_job

    conf = celery_app.conf
    assert run_job.acks_late is True and run_job.reject_on_worker_lost is True
    # retries (database outages) back off well inside the visibility timeout: no ETA loops
    visibility = broker_options(Settings(broker_url="redis://x"))["visibility_timeout"]
    assert isinstance(visibility, int)
    assert run_job.retry_backoff_max < visibility / 2
    assert conf.worker_cancel_long_running_tasks_on_connection_loss is True
    assert BrokerRestartWatch in celery_app.steps["consumer"]


def test_q12_job_leases_and_attempts() -> None:
    settings = Settings()
    assert settings.job_max_attempts == 3  # a job that kills its worker 3 times is failed
    # the lease is renewed every third of its length, so a live job never loses it
    assert settings.job_lease_seconds >= 30
    # the sweeper looks often enough to reclaim an expired lease within a fraction of it
    assert settings.sweeper_interval_seconds <= settings.job_lease_seconds / 10
    # a queued job is re-sent only after it had a fair chance to be picked up
    assert settings.queued_resend_after_seconds >= settings.sweeper_interval_seconds
