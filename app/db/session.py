"""Engine and session factory; the edge (API dependency, worker step) owns the unit of work."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.settings import get_settings

# Schema migrations on SQLite rebuild tables (copy, drop the old one, rename): with foreign keys on,
# dropping the old table cascades and deletes every child row (a populated-database migration test
# lost all results that way). SQLite's procedure for schema changes turns them off meanwhile.
_migrating: ContextVar[bool] = ContextVar("medcad_migrating", default=False)


@contextmanager
def foreign_keys_off_for_migrations() -> Iterator[None]:
    """New SQLite connections opened inside this block do not enforce foreign keys."""
    token = _migrating.set(True)
    try:
        yield
    finally:
        _migrating.reset(token)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the API read while the worker writes; busy_timeout waits instead of failing on locks.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=OFF" if _migrating.get() else "PRAGMA foreign_keys=ON")
    # FULL: a commit is on disk before it returns, so a 2xx survives a power loss (in WAL mode
    # NORMAL may roll back the last commits; sqlite.org "PRAGMA synchronous").
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


# Connections a pool may open beyond ``pool_size`` at a peak; each is closed again when it comes
# back to a full pool.
POOL_OVERFLOW = 10


def make_engine(url: str, pool_size: int = 20) -> Engine:
    """Create an engine with the right options for SQLite (embedded) or PostgreSQL.

    The pool keeps up to ``pool_size`` connections open (``Settings.db_pool_size``) and opens
    at most ``POOL_OVERFLOW`` more at a peak; the API admits as many units of work at once as
    the pool keeps (``app.api.deps``), so the overflow serves the rest. A check-out finding
    every connection busy waits for one (30 s, then 503). On PostgreSQL each new connection
    costs a backend process: with 10 kept and 16 reads in flight per API process (the proof's
    L5), the pool opened about one connection per 20 reads, and the API and PostgreSQL spent
    about 10 % more CPU per read than with 40 kept.
    """
    if url.startswith("sqlite"):
        engine = create_engine(
            url,
            pool_size=pool_size,
            max_overflow=POOL_OVERFLOW,
            connect_args={"timeout": 30, "check_same_thread": False},
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(
        url,
        pool_pre_ping=True,
        pool_size=pool_size,
        max_overflow=POOL_OVERFLOW,
        connect_args={"connect_timeout": 5},
    )


@lru_cache(maxsize=1)
def get_engine() -> Engine:
    """The process-wide engine (created lazily, after any fork)."""
    settings = get_settings()
    return make_engine(settings.resolved_database_url, settings.db_pool_size)


@lru_cache(maxsize=1)
def get_sessionmaker() -> sessionmaker[Session]:
    """The process-wide session factory."""
    return sessionmaker(bind=get_engine(), expire_on_commit=False)


@contextmanager
def session_scope() -> Iterator[Session]:
    """One unit of work: commit on success, roll back on error."""
    session = get_sessionmaker()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


T = TypeVar("T")


# PostgreSQL's answers to a transaction that lost a race with another writer: running it again
# is the documented remedy (serialization failure, deadlock detected).
_RACE_SQLSTATES = frozenset({"40001", "40P01"})


def _lost_a_race(exc: Exception) -> bool:
    if isinstance(exc, IntegrityError):
        return True
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in _RACE_SQLSTATES


def run_in_transaction(work: Callable[[Session], T], *, attempts: int = 8) -> T:
    """Run ``work`` in one unit of work; run it again if a concurrent writer won a race.

    Two uploads of the same file (or of one series) at the same moment both find no row, both
    insert, and the later commit violates a unique constraint. Running the work again sees the
    winner's committed rows, so the loser answers "already stored" instead of an error. With
    more than two writers of overlapping sets (several clients sending parts of one series) a
    loser can lose again to the next one, and inserts in different orders can deadlock; every
    round commits at least one of them, so a few rounds settle any realistic burst. The short
    random pause keeps the losers from colliding again in lockstep.
    """
    for attempt in range(1, attempts + 1):
        try:
            with session_scope() as session:
                return work(session)
        except (IntegrityError, OperationalError) as exc:
            if attempt == attempts or not _lost_a_race(exc):
                raise
            time.sleep(random.uniform(0, 0.02 * attempt))  # jitter only
    raise AssertionError("unreachable")  # pragma: no cover


def reset_engine() -> None:
    """Forget the cached engine (after fork, or when settings change in tests)."""
    if get_engine.cache_info().currsize:
        get_engine().dispose(close=False)
    get_engine.cache_clear()
    get_sessionmaker.cache_clear()
