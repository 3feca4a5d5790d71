"""The README's first command, as a user runs it: `make run` serves the shipped models, and a CT
file uploaded with curl ends `succeeded` with findings, masks and saliency for every model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.services import free_port, wait_for_jobs, wait_ready

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def test_make_run_then_curl_upload(tmp_path: Path, demo_series_dir: Path) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCAD_")}
    env["MEDCAD_DATA_DIR"] = str(tmp_path / "data")
    log = (tmp_path / "make-run.log").open("wb")
    proc = subprocess.Popen(["make", "-s", "run", f"PORT={port}"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, [proc], timeout=300)
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
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.5)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert {"unet", "segnet", "classifier"} <= models
    assert {m["model"] for m in res["masks"]} == {"unet", "segnet"}
    assert {f["model"] for f in res["findings"]} == {"classifier"}
    assert {s["model"] for s in res["saliency"]} == models
    assert all(f["saliency_id"] for f in res["findings"])
