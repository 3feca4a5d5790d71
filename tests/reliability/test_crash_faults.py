"""Crash points, restarts and races on a production-shaped deployment (bounded versions;
``make proof`` runs them full-size): the API dying at each ingest step, a worker dying mid
result write, concurrent uploads into one study, two quick broker restarts, SIGTERM mid-task, and
Celery's default reject_on_worker_lost under pool-child kills."""

from __future__ import annotations

import pytest

from tests.reliability.crash_scenarios import (
    run_broker_double_restart,
    run_concurrent_study_uploads,
    run_default_reject_flag,
    run_ingest_crash_points,
    run_result_write_crashes,
    run_sigterm_mid_task,
)
from tests.reliability.queue_scenarios import ProdStack

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


def test_q10_worker_consumes_after_two_quick_broker_restarts(healthy: ProdStack) -> None:
    outcome = run_broker_double_restart(healthy, n_jobs=4)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_s1_api_crash_at_each_ingest_step_leaves_no_half_state(healthy: ProdStack) -> None:
    outcome = run_ingest_crash_points(healthy)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_s5_worker_crash_mid_result_write_never_serves_partial(healthy: ProdStack) -> None:
    outcome = run_result_write_crashes(healthy)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_s6_concurrent_uploads_into_one_study_count_exactly(healthy: ProdStack) -> None:
    outcome = run_concurrent_study_uploads(healthy, threads=5, rounds=3, per_thread=1)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_q2_celery_default_would_drop_killed_jobs_the_sweeper_recovers(
    healthy: ProdStack,
) -> None:
    outcome = run_default_reject_flag(healthy, kills=1)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_q11_sigterm_mid_task_finishes_the_job_and_loses_nothing(healthy: ProdStack) -> None:
    outcome = run_sigterm_mid_task(healthy, queued_behind=2)
    print(outcome.summary)
    assert outcome.passed, outcome.report()
