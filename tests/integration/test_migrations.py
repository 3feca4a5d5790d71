"""Alembic migrations upgrade and downgrade cleanly on SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, inspect

from app.db import records  # noqa: F401
from app.db.base import Base
from app.db.migrate import downgrade, upgrade
from tests.helpers.services import postgres_database

TABLES = {
    "studies",
    "series",
    "instances",
    "jobs",
    "findings",
    "masks",
    "saliency_maps",
    "artifacts",
    "api_keys",
    "audit_events",
}


def _roundtrip(url: str) -> None:
    upgrade(url)
    engine = create_engine(url)
    tables = set(inspect(engine).get_table_names())
    assert TABLES <= tables
    # the migrated schema matches the records' columns
    for table in Base.metadata.sorted_tables:
        migrated = {c["name"] for c in inspect(engine).get_columns(table.name)}
        assert migrated == {c.name for c in table.columns}, table.name
    engine.dispose()
    downgrade(url)
    engine = create_engine(url)
    assert not (TABLES & set(inspect(engine).get_table_names()))
    engine.dispose()
    upgrade(url)  # and up again


def test_migrations_sqlite(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'm.sqlite3'}")


def test_migrations_postgres() -> None:
    with postgres_database() as url:
        _roundtrip(url)
