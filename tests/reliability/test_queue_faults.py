"""Queue faults on a production-shaped deployment (bounded versions; ``make proof`` runs them
full-size): killed workers, a crashed Redis, a dead database, poison input, duplicate delivery."""

from __future__ import annotations

import pytest

from tests.reliability.queue_scenarios import (
    ProdStack,
    run_broker_down_upload,
    run_db_outage,
    run_duplicate_delivery,
    run_poison,
    run_redis_restart,
    run_worker_kills,
)

pytestmark = [pytest.mark.slow, pytest.mark.redis, pytest.mark.postgres]


def test_q1_q3_killed_children_and_workers_lose_nothing(healthy: ProdStack) -> None:
    outcome = run_worker_kills(healthy, n_jobs=10, child_kills=2, worker_kills=1, interval=1.5)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_q8_duplicate_delivery_runs_once(healthy: ProdStack) -> None:
    outcome = run_duplicate_delivery(healthy, copies=5)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_q7_poison_input_three_attempts_then_failed(healthy: ProdStack) -> None:
    outcome = run_poison(healthy, n_normal=2)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_q9_upload_while_broker_down_is_accepted_and_done_later(healthy: ProdStack) -> None:
    outcome = run_broker_down_upload(healthy, n_uploads=1, down_seconds=1)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


@pytest.mark.parametrize("keep_data", [True, False], ids=["q4-aof", "q5-no-data"])
def test_q4_q5_redis_restart_mid_batch(healthy: ProdStack, keep_data: bool) -> None:
    outcome = run_redis_restart(healthy, n_jobs=6, keep_data=keep_data, down_seconds=1)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_q6_database_outage_answers_503_and_fails_no_job(healthy: ProdStack) -> None:
    outcome = run_db_outage(healthy, n_jobs=4, outage_seconds=5)
    print(outcome.summary)
    assert outcome.passed, outcome.report()
