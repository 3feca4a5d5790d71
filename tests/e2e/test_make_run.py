"""The README's first command, as a user runs it: `make run` serves the shipped models, and a CT
file uploaded with curl ends `succeeded` with findings, masks and saliency for every model."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.helpers.services import make_run, wait_for_jobs

pytestmark = pytest.mark.slow


def test_make_run_then_curl_upload(tmp_path: Path, demo_series_dir: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    with make_run(tmp_path / "data", tmp_path / "make-run.log") as url:
        key = (tmp_path / "data" / "admin.key").read_text().strip()
        assert key in (tmp_path / "make-run.log").read_text()  # printed once, like a notebook token
        first_slice = sorted(demo_series_dir.glob("*.dcm"))[len(list(demo_series_dir.glob("*.dcm"))) // 2]
        out = subprocess.run(
            ["curl", "-sS", "-H", f"Authorization: Bearer {key}", "-F", f"files=@{first_slice}",
             "-w", "\n%{http_code}", f"{url}/api/v1/studies"],
            capture_output=True, text=True, check=True,
        ).stdout
        body, status = out.rsplit("\n", 1)
        assert status == "202", out
        job_id = json.loads(body)["jobs"][0]["id"]
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as client:
            final = wait_for_jobs(client, [job_id], timeout=300)[job_id]
            assert final["status"] == "succeeded", final
            models = {m["name"] for m in client.get("/api/v1/models").json()["items"] if m["default"]}
            res = client.get(f"/api/v1/jobs/{job_id}/results").json()
    assert {"unet", "segnet", "classifier"} <= models
    assert {m["model"] for m in res["masks"]} == {"unet", "segnet"}
    assert {f["model"] for f in res["findings"]} == {"classifier"}
    assert {s["model"] for s in res["saliency"]} == models
    assert all(f["saliency_id"] for f in res["findings"])
