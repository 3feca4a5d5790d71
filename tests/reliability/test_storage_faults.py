"""Storage faults (bounded versions; ``make proof`` runs them full-size): the API killed during
uploads, concurrent identical uploads, a full disk, SQLite with concurrent writers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.reliability.harness import Stack
from tests.reliability.storage_scenarios import (
    embedded_stack,
    run_api_kills,
    run_concurrent_same_file,
    run_conflicting_sop_uid,
    run_disk_full,
    run_ingest_steps,
    run_sqlite_writers,
    run_stow_partial,
)

pytestmark = pytest.mark.slow


def test_s2_every_2xx_survives_api_sigkills(tmp_path: Path, tiny_models_dir: Path) -> None:
    outcome = run_api_kills(tmp_path, tiny_models_dir, n_uploads=100, kill_at=(0.2, 0.55))
    print(outcome.summary)
    assert outcome.passed, outcome.report()


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path) -> Iterator[Stack]:
    """The embedded shape on SQLite: API + its worker + one more worker process."""
    with embedded_stack(tmp_path_factory.mktemp("embedded"), tiny_models_dir) as s:
        yield s


def test_s3_same_file_twenty_times_at_once_one_row_one_blob(embedded: Stack) -> None:
    outcome = run_concurrent_same_file(embedded, copies=20)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_s4_conflicting_sop_uid_is_409_and_keeps_the_stored_bytes(embedded: Stack) -> None:
    outcome = run_conflicting_sop_uid(embedded, concurrent=5)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_s10_stow_partial_success_is_202_with_one_failure(embedded: Stack) -> None:
    outcome = run_stow_partial(embedded, n=10)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_s9_sqlite_api_and_workers_never_surface_locks(embedded: Stack) -> None:
    outcome = run_sqlite_writers(embedded, n_uploads=8, threads=4)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_s7_disk_full_answers_507_and_stores_nothing(tmp_path: Path, tiny_models_dir: Path) -> None:
    outcome = run_disk_full(tmp_path, tiny_models_dir, size_mib=2)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_l1_stepped_ingest_answers_every_step_without_5xx(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    """L1, bounded: two short steps on SQLite served by two API processes (as the proof
    runs it); the byte-renamed uploads are all distinct."""
    outcome = run_ingest_steps(
        tmp_path, tiny_models_dir, rates=(5.0, 10.0), seconds=3.0, senders=6, image_size=256,
        api_processes=2,
    )  # fmt: skip
    assert "--api-processes 2" in outcome.figures["shape"]
    print(outcome.summary)
    assert outcome.passed, outcome.report()
    steps = outcome.figures["steps"]
    assert [st["offered"] for st in steps] == [15, 30]
    # every acknowledged upload was a new instance (the renamer never repeats a UID)
    assert sum(st["acknowledged"] for st in steps) == 45
