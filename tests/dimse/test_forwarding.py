"""Forwarding of result objects after a job: C-STORE to dcmtk's ``storescp`` (a real SCP),
and an unreachable STOW-RS destination that must be audited without failing anything."""

from __future__ import annotations

import io
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
import pytest
from sqlalchemy import select

from app.db.records import AuditEventRecord
from app.db.session import session_scope
from app.settings import get_settings
from tests.dicomweb.support import stow_body, stow_content_type
from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.dciodvfy import dciodvfy_errors
from tests.helpers.services import free_port, unavailable
from workers import runner
from workers.forwarding import forward_job_outputs, parse_dimse_peer


def _analysed_job(api: Any, seed: int) -> tuple[str, str]:
    files, _ = bright_disc_series(n=2, radius=10, seed=seed)
    r = api.post(
        "/dicomweb/studies",
        content=stow_body(files, "fw"),
        headers={"Content-Type": stow_content_type("fw")},
    )
    assert r.status_code == 200, r.text
    series = str(pydicom.dcmread(io.BytesIO(files[0])).SeriesInstanceUID)
    (job,) = api.get("/api/v1/jobs", params={"series_instance_uid": series}).json()["items"]
    assert runner.run_job(job["id"]) == "succeeded"
    return job["id"], str(pydicom.dcmread(io.BytesIO(files[0])).StudyInstanceUID)


def _forward_audit(job_id: str) -> list[AuditEventRecord]:
    with session_scope() as session:
        return list(
            session.scalars(
                select(AuditEventRecord).where(
                    AuditEventRecord.action == "forward",
                    AuditEventRecord.resource == f"job/{job_id}",
                )
            )
        )


def test_dimse_peer_syntax() -> None:
    peer = parse_dimse_peer("PACS@10.0.0.5:104")
    assert (peer.ae_title, peer.host, peer.port) == ("PACS", "10.0.0.5", 104)
    for bad in ("PACS", "PACS@host", "@host:104", "A" * 17 + "@h:1", "PACS@host:x"):
        with pytest.raises(ValueError):
            parse_dimse_peer(bad)


def test_results_are_forwarded_with_c_store(module_api: Any, tmp_path: Path) -> None:
    storescp = shutil.which("storescp")
    if storescp is None:
        unavailable("storescp not found: install the Debian package dcmtk")
    assert storescp is not None
    job_id, study = _analysed_job(module_api, seed=21)
    port, received = free_port(), tmp_path / "pacs"
    received.mkdir()
    proc = subprocess.Popen(
        [storescp, "-aet", "PACS", "-od", str(received), "-fe", ".dcm", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)  # storescp binds at once; give it a moment
        settings = get_settings().model_copy(update={"forward_dimse": f"PACS@127.0.0.1:{port}"})
        forward_job_outputs(job_id, settings)
        deadline = time.monotonic() + 10
        while len(list(received.glob("*.dcm"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    objects = [pydicom.dcmread(p) for p in sorted(received.glob("*.dcm"))]
    classes = sorted(str(o.SOPClassUID) for o in objects)
    assert "1.2.840.10008.5.1.4.1.1.66.4" in classes and "1.2.840.10008.5.1.4.1.1.88.34" in classes
    assert "1.2.840.10008.5.1.4.1.1.30" in classes
    for obj in objects:
        assert obj.StudyInstanceUID == study and dciodvfy_errors(obj) == []
    (event,) = _forward_audit(job_id)
    assert event.outcome == "success" and event.client == f"PACS@127.0.0.1:{port}"
    assert event.detail == f"{len(objects)} objects forwarded"


def test_unreachable_destination_is_audited_and_never_raises(module_api: Any) -> None:
    job_id, _ = _analysed_job(module_api, seed=22)
    port = free_port()  # nothing listens there
    settings = get_settings().model_copy(
        update={
            "forward_stow_url": f"http://127.0.0.1:{port}/dicom-web",
            "forward_timeout_seconds": 2.0,
        }
    )
    forward_job_outputs(job_id, settings)
    (event,) = _forward_audit(job_id)
    assert event.outcome == "failed" and "STOW-RS" in (event.detail or "")
