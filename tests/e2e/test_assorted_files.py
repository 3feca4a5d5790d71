"""Every DICOM file pydicom and pydicom-data ship, uploaded to a live server: each is either
stored and its job ends succeeded/failed-with-reason, or rejected with a specific 4xx — never a
500, never a hung job."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.data import get_testdata_files

from tests.helpers.services import medcad_deployment, wait_for_jobs

pytestmark = pytest.mark.slow


def _corpus() -> list[Path]:
    files = {Path(p) for p in get_testdata_files("*")}
    try:
        import pydicom_data  # noqa: F401
        from pydicom.data import get_testdata_files as more

        files |= {Path(p) for p in more("**/*")}
    except ImportError:
        pass
    skip_suffixes = {".py", ".txt", ".json", ".gz", ".bz2", ".zip", ".md", ".pyc"}
    return sorted(p for p in files if p.is_file() and p.suffix.lower() not in skip_suffixes
                  and p.stat().st_size < 30 * 1024 * 1024)


def test_every_shipped_file_ends_stored_or_rejected(tmp_path: Path, tiny_models_dir: Path) -> None:
    corpus = _corpus()
    assert len(corpus) > 100
    outcomes: dict[str, str] = {}
    job_ids: list[str] = []
    with medcad_deployment(tmp_path, tiny_models_dir) as server, server.client() as client:
        for path in corpus:
            r = client.post("/api/v1/studies",
                            files=[("files", (path.name, path.read_bytes(), "application/dicom"))])
            assert r.status_code < 500, (path.name, r.status_code, r.text[:300])
            body = r.json()
            if r.status_code >= 400:
                if "files" in body:
                    entry = body["files"][0]
                    assert entry["outcome"] == "rejected" and entry["error"], (path.name, body)
                    outcomes[path.name] = f"rejected:{entry['error']}"
                else:
                    assert body["error"], (path.name, body)
                    outcomes[path.name] = f"rejected:{body['error']}"
                continue
            entry = body["files"][0]
            outcomes[path.name] = entry["outcome"]
            job_ids += [j["id"] for j in body["jobs"]]
        final = wait_for_jobs(client, job_ids, timeout=900)
    failed = {j["id"]: j["error"] for j in final.values() if j["status"] == "failed"}
    for error in failed.values():
        assert error and error["code"] and error["code"] != "internal_error", error
    stored = sum(1 for o in outcomes.values() if o in ("stored", "duplicate"))
    rejected = sum(1 for o in outcomes.values() if o.startswith("rejected"))
    print(f"\n{len(corpus)} files: {stored} stored, {rejected} rejected; "
          f"{len(final) - len(failed)} jobs succeeded, {len(failed)} failed with a reason")
    assert stored > 50
