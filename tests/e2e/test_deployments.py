"""Both deployment shapes end to end, as real processes on loopback.

- embedded: ``medcad serve`` (SQLite, filesystem broker, API + embedded worker processes);
- production: API (``serve --no-worker``) + two ``medcad worker`` processes on PostgreSQL + Redis.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.services import medcad_deployment, postgres_database, redis_db_url, wait_for_jobs

pytestmark = pytest.mark.slow


def _upload_series(client, n_series: int, n_slices: int = 2) -> list[str]:  # type: ignore[no-untyped-def]
    job_ids = []
    for seed in range(n_series):
        blobs, _ = bright_disc_series(n=n_slices, seed=seed)
        files = [("files", (f"{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]
        r = client.post("/api/v1/studies", files=files)
        assert r.status_code == 202, r.text
        job_ids += [j["id"] for j in r.json()["jobs"]]
    return job_ids


def _check_results(client, job_ids: list[str]) -> None:  # type: ignore[no-untyped-def]
    for job_id in job_ids:
        res = client.get(f"/api/v1/jobs/{job_id}/results").json()
        assert {m["model"] for m in res["masks"]} == {"tinyseg"}
        assert {(f["model"], f["level"]) for f in res["findings"]} == {
            ("tinycls", "slice"), ("tinycls", "series"), ("tinyseg", "lesion"),
        }
        assert res["saliency"] and res["dicom"]["seg"]
        assert [sr["model"] for sr in res["dicom"]["sr"]] == ["tinycls+tinyseg"]


def test_embedded_shape(tmp_path: Path, tiny_models_dir: Path) -> None:
    with medcad_deployment(tmp_path, tiny_models_dir) as server, server.client() as client:
        job_ids = _upload_series(client, 2)
        final = wait_for_jobs(client, job_ids, timeout=180)
        assert {j["status"] for j in final.values()} == {"succeeded"}, final
        _check_results(client, job_ids)


def test_production_shape_postgres_redis_two_workers(tmp_path: Path, tiny_models_dir: Path) -> None:
    broker = redis_db_url(11)
    with (
        postgres_database() as db_url,
        medcad_deployment(
            tmp_path,
            tiny_models_dir,
            workers=2,
            embedded=False,
            MEDCAD_DATABASE_URL=db_url,
            MEDCAD_BROKER_URL=broker,
        ) as server,
        server.client() as client,
    ):
        job_ids = _upload_series(client, 4)
        final = wait_for_jobs(client, job_ids, timeout=240)
        assert {j["status"] for j in final.values()} == {"succeeded"}, final
        _check_results(client, job_ids)
        assert client.get("/readyz").json()["checks"]["broker"] == "ok"
