"""S11: migrating a populated database down and up keeps every row and every value."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

from app.db.migrate import alembic_config, downgrade, upgrade
from app.settings import get_settings
from tests.fixtures.dicom_files import bright_disc_series
from workers import runner


def _snapshot(url: str) -> dict[str, dict[str, Any]]:
    """Per table: its columns, row count and a digest of every row (sorted)."""
    engine = create_engine(url)
    out: dict[str, dict[str, Any]] = {}
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            if table == "alembic_version":
                continue
            columns = sorted(c["name"] for c in inspect(conn).get_columns(table))
            rows = conn.execute(text(f'SELECT {", ".join(columns)} FROM "{table}"')).all()
            encoded = sorted(json.dumps([_plain(v) for v in row], default=str) for row in rows)
            out[table] = {
                "columns": columns,
                "count": len(rows),
                "rows": {
                    c: sorted(json.dumps(_plain(r[i]), default=str) for r in rows)
                    for i, c in enumerate(columns)
                },
                "digest": hashlib.sha256("\n".join(encoded).encode()).hexdigest(),
            }
    engine.dispose()
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "[{":
        try:  # JSON columns come back as text on SQLite and as objects on PostgreSQL
            return json.loads(value)
        except ValueError:
            return value
    return value


def _restricted(
    snapshot: dict[str, dict[str, Any]], columns: dict[str, list[str]]
) -> dict[str, Any]:
    return {
        table: {"count": snap["count"], **{c: snap["rows"][c] for c in columns[table]}}
        for table, snap in snapshot.items()
        if table in columns
    }


def test_s11_down_and_up_on_a_populated_database(api: Any) -> None:
    url = get_settings().resolved_database_url
    for seed in range(2):
        blobs, _ = bright_disc_series(n=2, seed=seed)
        files = [("files", (f"{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]
        r = api.post("/api/v1/studies", files=files)
        assert r.status_code == 202, r.text
        assert runner.run_job(r.json()["jobs"][0]["id"]) == "succeeded"
    before = _snapshot(url)
    assert before["instances"]["count"] == 4 and before["masks"]["count"] == 4
    assert before["artifacts"]["count"] > 0 and before["audit_events"]["count"] > 0
    script = ScriptDirectory.from_config(alembic_config(url))
    first = script.get_base()
    assert isinstance(first, str)
    downgrade(url, first)  # every migration after the initial schema, undone
    low = _snapshot(url)
    kept = {table: snap["columns"] for table, snap in low.items()}
    assert set(kept) == set(before)
    assert _restricted(low, kept) == _restricted(before, kept)
    upgrade(url)
    after = _snapshot(url)
    assert {t: s["columns"] for t, s in after.items()} == {
        t: s["columns"] for t, s in before.items()
    }
    assert _restricted(after, kept) == _restricted(before, kept)
