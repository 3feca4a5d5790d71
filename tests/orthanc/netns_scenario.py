"""The Orthanc round trip, run *inside* a private network namespace (``unshare -n``).

Orthanc 1.10 cannot bind to loopback only (it listens on 0.0.0.0), so it runs in a namespace
whose only interface is ``lo``; medcad runs in the same namespace so the two can talk. This
module is executed there as ``python -m tests.orthanc.netns_scenario WORKDIR MODELS_DIR``:

1. bring ``lo`` up, start ``medcad serve`` (forwarding to Orthanc's STOW-RS) and Orthanc;
2. upload a CT series to Orthanc, then ask Orthanc to push the study to medcad with its
   DICOMweb client (``POST /dicom-web/servers/medcad/stow``: chunked, unquoted boundary);
3. wait for medcad's job, then for the forwarded SEG/SR/PM to appear in Orthanc;
4. download what Orthanc holds and write ``report.json`` (+ the files) for the test to check.

Everything started here is stopped here; the namespace disappears with this process.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom

from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.services import medcad_deployment, wait_for_jobs

ORTHANC = "http://127.0.0.1:8042"
PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so.1.7",
)


def _orthanc_binary() -> str:
    return shutil.which("Orthanc") or "/usr/sbin/Orthanc"


def _plugin() -> str:
    for candidate in PLUGIN_CANDIDATES:
        if Path(candidate).exists():
            return candidate
    listing = subprocess.run(
        ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
    ).stdout
    return next(line for line in listing.splitlines() if "libOrthancDicomWeb.so" in line)


def _orthanc_config(work: Path, medcad_url: str, api_key: str) -> Path:
    storage = work / "orthanc-db"
    storage.mkdir()
    config = {
        "Name": "medcad-it-orthanc",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "Plugins": [_plugin()],
        "HttpServerEnabled": True,
        "HttpPort": 8042,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "DicomWeb": {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": False,
            "Servers": {
                "medcad": {
                    "Url": f"{medcad_url}/dicomweb/",
                    "HttpHeaders": {"Authorization": f"Bearer {api_key}"},
                }
            },
        },
    }
    path = work / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


def _wait_orthanc(proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Orthanc exited with {proc.returncode}")
        try:
            if httpx.get(f"{ORTHANC}/system", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("Orthanc did not start")


def _wait_results_in_orthanc(orthanc: httpx.Client, study_id: str, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        series: list[dict] = orthanc.get(
            f"/studies/{study_id}/series", params={"expand": ""}
        ).json()
        modalities = {s["MainDicomTags"].get("Modality") for s in series}
        if {"SEG", "SR", "OT"} <= modalities or time.monotonic() > deadline:
            return series
        time.sleep(0.5)


def run(work: Path, models_dir: Path) -> dict[str, Any]:
    """The scenario; returns the report (also written to ``work/report.json``)."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    report: dict[str, Any] = {}
    files, _ = bright_disc_series(n=3, radius=10, seed=31)
    series_uid = str(pydicom.dcmread(io.BytesIO(files[0])).SeriesInstanceUID)
    with medcad_deployment(
        work / "medcad",
        models_dir,
        MEDCAD_FORWARD_STOW_URL=f"{ORTHANC}/dicom-web",
        MEDCAD_FORWARD_TIMEOUT_SECONDS="20",
    ) as medcad:
        config = _orthanc_config(work, medcad.url, medcad.api_key)
        with (work / "orthanc.log").open("wb") as log:
            orthanc_proc = subprocess.Popen(
                [_orthanc_binary(), str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        try:
            _wait_orthanc(orthanc_proc)
            with httpx.Client(base_url=ORTHANC, timeout=60) as orthanc, medcad.client() as api:
                uploaded = [orthanc.post("/instances", content=f).json() for f in files]
                study_id = uploaded[0]["ParentStudy"]
                push = orthanc.post(
                    "/dicom-web/servers/medcad/stow", json={"Resources": [study_id]}
                )
                report["orthanc_stow_status"] = push.status_code
                report["orthanc_stow_body"] = push.text[:2000]
                jobs = api.get("/api/v1/jobs", params={"series_instance_uid": series_uid}).json()
                report["jobs"] = [
                    wait_for_jobs(api, [j["id"]], timeout=120)[j["id"]] for j in jobs["items"]
                ]
                wait = 60 if any(j["status"] == "succeeded" for j in report["jobs"]) else 0
                series = _wait_results_in_orthanc(orthanc, study_id, timeout=wait)
                report["orthanc_series"] = [
                    {
                        "modality": s["MainDicomTags"].get("Modality"),
                        "series_instance_uid": s["MainDicomTags"].get("SeriesInstanceUID"),
                        "description": s["MainDicomTags"].get("SeriesDescription"),
                        "instances": s["Instances"],
                    }
                    for s in series
                ]
                saved = work / "from-orthanc"
                saved.mkdir()
                for entry in report["orthanc_series"]:
                    for n, instance in enumerate(entry["instances"]):
                        data = orthanc.get(f"/instances/{instance}/file").content
                        (saved / f"{entry['modality']}-{instance[:8]}-{n}.dcm").write_bytes(data)
                report["forward_audit"] = _forward_audit(medcad.data_dir)
        finally:
            orthanc_proc.terminate()
            orthanc_proc.wait(timeout=20)
    report["series_instance_uid"] = series_uid
    (work / "report.json").write_text(json.dumps(report, indent=2))
    return report


def _forward_audit(data_dir: Path) -> list[dict[str, str | None]]:
    import sqlite3

    with sqlite3.connect(data_dir / "medcad.sqlite3") as db:
        rows = db.execute(
            "SELECT outcome, client, detail FROM audit_events WHERE action = 'forward'"
        ).fetchall()
    return [{"outcome": r[0], "client": r[1], "detail": r[2]} for r in rows]


if __name__ == "__main__":
    run(Path(sys.argv[1]), Path(sys.argv[2]))
