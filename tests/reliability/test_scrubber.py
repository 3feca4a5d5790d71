"""S8: the scrubber against a real SQLite database and blob store, and ``medcad scrub``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app.settings import get_settings
from app.storage import BlobStore
from tests.fixtures.dicom_files import bright_disc_series
from tests.reliability.storage_scenarios import make_instances, run_scrub, run_scrubber_detection


def test_s8_scrubber_names_the_flipped_byte_and_the_missing_blob(sqlite_env: Path) -> None:
    settings = get_settings()
    outcome = run_scrubber_detection(settings.resolved_database_url, settings.blob_dir, n_blobs=100)
    print(outcome.summary)
    assert outcome.passed, outcome.report()


def test_put_of_an_old_orphan_makes_it_young_again(sqlite_env: Path) -> None:
    """A blob left by a crashed upload, stored again by a new upload, is not scrubbed away."""
    settings = get_settings()
    store = BlobStore(settings.blob_dir)
    key = store.put(b"bytes of an upload whose commit never happened")
    old = time.time() - 7200
    os.utime(store.path_for(key), (old, old))
    assert run_scrub(settings.resolved_database_url, settings.blob_dir, grace_seconds=3600).orphans
    assert store.put(b"bytes of an upload whose commit never happened") == key
    report = run_scrub(
        settings.resolved_database_url, settings.blob_dir, grace_seconds=3600, delete_orphans=True
    )
    assert report.orphans == [] and report.young_unreferenced == 1 and store.exists(key)


def test_scrub_command_reports_and_deletes(sqlite_env: Path) -> None:
    settings = get_settings()
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.studies.service import UploadedFile, ingest_files
    from app.studies.validation import IngestLimits

    instances = make_instances(3, 64, seed=77)
    store = BlobStore(settings.blob_dir)
    engine = create_engine(settings.resolved_database_url)
    with Session(engine) as session:
        ingest_files(
            session=session,
            store=store,
            files=[UploadedFile("a.dcm", x.data) for x in instances],
            models=[],
            principal=None,
            limits=IngestLimits(),
        )
        session.commit()
    engine.dispose()
    orphan = store.put(b"orphan")
    old = time.time() - 10
    os.utime(store.path_for(orphan), (old, old))

    def scrub(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app.cli", "scrub", "--json", *args],
            capture_output=True,
            text=True,
            env=dict(os.environ),
            timeout=120,
        )

    path = store.path_for(instances[0].sha256)
    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    bad = scrub("--grace-seconds", "5", "--delete-orphans")
    assert bad.returncode == 1, bad.stderr
    body = json.loads(bad.stdout)
    assert body["referenced"] == 3 and body["orphans"] == [orphan] and body["deleted"] == 1
    assert not store.exists(orphan)
    problems = body["problems"]
    assert [(p["key"], p["problem"], p["rows"][0]["table"]) for p in problems] == [
        (instances[0].sha256, "corrupt", "instances")
    ]


@pytest.mark.parametrize("verify", [True, False])
def test_missing_blob_found_with_or_without_rehash(sqlite_env: Path, verify: bool) -> None:
    settings = get_settings()
    outcome = run_scrubber_detection(settings.resolved_database_url, settings.blob_dir, n_blobs=5)
    assert outcome.checks["exactly the deleted blob is missing"]
    report = run_scrub(
        settings.resolved_database_url, settings.blob_dir, grace_seconds=3600, verify=verify
    )
    assert len(report.missing) == 1
    assert len(report.corrupt) == (1 if verify else 0)


def test_every_result_blob_is_referenced(sqlite_env: Path) -> None:
    """After a real job (masks, overlays, saliency maps, colour bars, DICOM outputs), every blob
    on disk is named by a row: a scrub with no grace period would remove nothing."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.helpers.services import ADMIN_KEY
    from workers import runner

    blobs, _ = bright_disc_series(n=2, seed=5)
    files = [("files", (f"{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with TestClient(create_app(), headers=headers) as api:
        r = api.post("/api/v1/studies", files=files)
    assert r.status_code == 202, r.text
    assert runner.run_job(r.json()["jobs"][0]["id"]) == "succeeded"
    settings = get_settings()
    report = run_scrub(settings.resolved_database_url, settings.blob_dir, grace_seconds=0)
    tables = {ref.table for refs in _refs(settings).values() for ref in refs}
    assert {"instances", "masks", "saliency_maps", "artifacts"} <= tables
    assert report.blobs_on_disk > 10
    assert report.orphans == [] and report.young_unreferenced == 0 and report.healthy


def _refs(settings: Any) -> dict[str, Any]:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from app.jobs.scrubber import referenced_blobs

    engine = create_engine(settings.resolved_database_url)
    try:
        with Session(engine) as session:
            return referenced_blobs(session=session)
    finally:
        engine.dispose()
