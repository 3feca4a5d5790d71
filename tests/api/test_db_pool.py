"""Concurrent reads on PostgreSQL: the pool's connections are reused, and a burst larger
than the pool waits for them instead of stalling the API.

A PostgreSQL connection costs the server a new backend process. With 10 connections kept and
16 reads in flight, the pool opened and closed connections all the time (about one per 20
reads in the proof's L5 scenario); ``Settings.db_pool_size`` sets how many it keeps. A burst of
more reads than the pool and the thread pool together could serve stalled every one of them
until the pool's 30 s timeout (503s); units of work are now admitted up to the pool's size.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import _configure, reset_caches
from tests.helpers.jobs import new_job
from tests.helpers.services import ADMIN_KEY, PG_ADMIN_URL, postgres_database

POOL = 16


@pytest.fixture(params=[POOL])
def pg_api(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    tiny_models_dir: Path,
) -> Iterator[tuple[Any, str]]:
    from fastapi.testclient import TestClient

    from app.main import create_app

    with postgres_database() as url:
        _configure(monkeypatch, tmp_path, tiny_models_dir, url)
        monkeypatch.setenv("MEDCAD_DB_POOL_SIZE", str(request.param))
        reset_caches()
        with TestClient(create_app(), headers={"Authorization": f"Bearer {ADMIN_KEY}"}) as client:
            yield client, url.rsplit("/", 1)[1]
        reset_caches()


def _sessions(database: str) -> int:
    """Connections ever opened to ``database`` (pg_stat_database.sessions, PostgreSQL 14+)."""
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT pg_stat_clear_snapshot()"))
            query = text("SELECT sessions FROM pg_stat_database WHERE datname = :n")
            return int(conn.execute(query, {"n": database}).scalar_one())
    finally:
        engine.dispose()


def test_a_burst_of_concurrent_reads_opens_no_connection_beyond_the_pool(
    pg_api: tuple[Any, str],
) -> None:
    from app.db.session import get_engine

    client, database = pg_api
    job = new_job(client, 1)
    assert client.get(f"/api/v1/jobs/{job}").status_code == 200
    before = _sessions(database)

    def read(_: int) -> int:
        return int(client.get(f"/api/v1/jobs/{job}").status_code)

    with ThreadPoolExecutor(POOL) as pool:  # as many readers at once as the pool keeps
        answers = list(pool.map(read, range(240)))
    assert answers == [200] * 240
    time.sleep(1.5)  # a closed backend reports its session at exit, just after the close
    opened = _sessions(database) - before
    # at most the pool's own connections, opened once (the burst may open some of them);
    # with 10 kept, 16 readers opened 20
    assert opened <= POOL, f"{opened} connections opened by 240 reads with a pool of {POOL}"
    assert get_engine().pool.size() == POOL and get_engine().pool.checkedout() == 0


@pytest.mark.parametrize("pg_api", [2], indirect=True)
def test_a_burst_beyond_the_pool_and_the_threads_waits_its_turn(
    pg_api: tuple[Any, str],
) -> None:
    """80 reads at once against 2 + 10 connections and 40 threads: before, 127 of 240 got 503
    after 30 s stalls; now every read answers, none waits for the pool's timeout."""
    from app.db.session import get_engine

    client, _ = pg_api
    job = new_job(client, 2)
    statuses: list[int] = []
    slowest = 0.0

    def read(_: int) -> None:
        nonlocal slowest
        t0 = time.monotonic()
        statuses.append(int(client.get(f"/api/v1/jobs/{job}").status_code))
        slowest = max(slowest, time.monotonic() - t0)

    with ThreadPoolExecutor(80) as pool:
        list(pool.map(read, range(240)))
    assert statuses == [200] * 240
    assert slowest < 20.0, f"a read took {slowest:.1f} s: it waited for the pool's timeout"
    assert get_engine().pool.checkedout() == 0
