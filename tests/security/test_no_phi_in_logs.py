"""No patient data in any log line (reliability P7), and a worker that refuses pickled messages
(P13), on a real deployment: ``medcad serve`` with its embedded Celery worker, logging at DEBUG.

Canary patient name, ID and birth date go through every door — REST upload, STOW-RS, QIDO-RS
searches on them, results and downloads — including files whose patient attributes are
invalid for their VR (pydicom and highdicom quote such values in their warnings) and the whole
hostile corpus. Every byte that any process wrote to its stdout/stderr is then searched.
"""

from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path

import pydicom
import pytest

from app.settings import Settings
from tests.fixtures import dicom_corpus as corpus
from tests.fixtures.dicom_files import CANARY_BIRTH, CANARY_ID, CANARY_NAME, bright_disc_series
from tests.helpers.services import medcad_deployment, wait_for_jobs
from tests.security.conftest import stow_body

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# What must never appear: each canary whole, and the distinctive parts of the name.
CANARIES = (CANARY_NAME, CANARY_ID, CANARY_BIRTH, "Zebulon", "CANARY^PHI", "CANARY")


_NUMBER = "11223344556677"  # a valid DS as long as the canary ID: replaced in the bytes


def _odd(data: bytes, placeholder: str | None = None, **values: object) -> bytes:
    """``data`` with ``values`` set, then every ``placeholder`` replaced by the canary ID.

    pydicom refuses to write a non-numeric DS/IS, so numbers are written and patched:
    the file then says e.g. Window Center = "CANARY-ID-7731", as a broken modality might.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(io.BytesIO(data))
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    encoded = out.getvalue()
    if placeholder:
        assert encoded.count(placeholder.encode()) == 1
        encoded = encoded.replace(placeholder.encode(), CANARY_ID.encode()[: len(placeholder)])
    return encoded


def _odd_series() -> list[bytes]:
    """One series whose instances hold canaries where numbers or codes belong, and patient
    attributes that are invalid for their VR (converters and validators quote such values
    in their warnings and exceptions)."""
    base, _ = bright_disc_series(n=8, seed=72)
    return [
        _odd(base[0], _NUMBER, WindowCenter=_NUMBER),
        _odd(base[1], _NUMBER, SliceThickness=_NUMBER),
        _odd(base[2], _NUMBER, RescaleIntercept=_NUMBER),
        _odd(base[3], _NUMBER, PixelSpacing=[_NUMBER, "1"]),
        _odd(base[4], _NUMBER, ImagePositionPatient=[_NUMBER, "0", "8"]),
        _odd(base[5], "998877665544", InstanceNumber="998877665544"),
        _odd(base[6], PatientBirthDate="x" + CANARY_BIRTH, PatientSex=CANARY_ID,
             PatientID=(CANARY_ID + "-") * 6, PatientName=CANARY_NAME + "^a^b^c^d^e"),
        _odd(base[7], PatientAge="0" + CANARY_ID[-3:] + "Y", OtherPatientIDs=CANARY_ID + "\n"),
    ]  # fmt: skip


class _Evil:
    """Unpickling this creates a directory: proof that a worker deserialised pickle."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.path,))


def _upload(client, files: list[tuple[str, bytes]]) -> list[str]:  # type: ignore[no-untyped-def]
    parts = [("files", (name, data, "application/dicom")) for name, data in files]
    r = client.post("/api/v1/studies", files=parts)
    assert r.status_code in (202, 400, 413, 422), r.text[:300]
    return [j["id"] for j in r.json().get("jobs", [])]


def _send_pickled_task(data_dir: Path, marker: Path) -> None:
    from app.queue import QUEUE_NAME, RUN_JOB_TASK, make_celery

    producer = make_celery(Settings(data_dir=data_dir, broker_url=None))
    producer.send_task(RUN_JOB_TASK, kwargs={"job_id": _Evil(str(marker))}, queue=QUEUE_NAME,
                       serializer="pickle")  # fmt: skip


def test_no_canary_reaches_any_log_line(tmp_path: Path, tiny_models_dir: Path) -> None:
    marker = tmp_path / "pickle-was-loaded"
    with (
        medcad_deployment(tmp_path, tiny_models_dir, MEDCAD_LOG_LEVEL="DEBUG") as server,
        server.client() as client,
    ):
        normal, _ = bright_disc_series(n=2, seed=71)
        odd = _odd_series()
        stowed, _ = bright_disc_series(n=1, seed=73)
        job_ids = _upload(client, [(f"n{i}.dcm", b) for i, b in enumerate(normal)])
        job_ids += _upload(client, [(f"o{i}.dcm", b) for i, b in enumerate(odd)])
        # the hostile corpus (every file carries the canaries) in one request, zips included
        hostile = [(f"{c.name}{'.zip' if c.zip else '.dcm'}", c.build())
                   for c in corpus.HOSTILE_CASES if c.limits == corpus.IngestLimits()]  # fmt: skip
        assert _upload(client, hostile) == []
        body, content_type = stow_body(stowed)
        r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": content_type})
        assert r.status_code == 200, r.text[:300]
        # searches whose query strings are patient data
        for query in ({"PatientName": "CANARY*"}, {"PatientID": CANARY_ID},
                      {"PatientBirthDate": CANARY_BIRTH}):  # fmt: skip
            r = client.get("/dicomweb/studies", params=query)
            assert r.status_code == 200 and CANARY_ID in r.text  # PHI reached the store
        _send_pickled_task(server.data_dir, marker)
        jobs = client.get("/api/v1/jobs").json()["items"]
        job_ids = [j["id"] for j in jobs]
        assert len(job_ids) == 3
        final = wait_for_jobs(client, job_ids, timeout=300)
        for job_id, job in final.items():
            if job["status"] == "failed":  # the odd series may fail; its logs count all the same
                assert job["instance_count"] == len(odd), job
                continue
            results = client.get(f"/api/v1/jobs/{job_id}/results").json()
            for link in results["dicom"]["seg"] + results["dicom"]["sr"]:
                assert client.get(link["url"]).status_code == 200
            assert client.get(results["masks"][0]["url"]).status_code == 200
        # every study, the one whose values are invalid for their VRs included
        for study in {job["study_instance_uid"] for job in final.values()}:
            assert client.get(f"/dicomweb/studies/{study}/metadata").status_code == 200
        # wait until the worker has consumed the pickled message (it logs the refusal)
        deadline = time.monotonic() + 60
        log_dir = server.log_dir
        assert log_dir is not None
        while time.monotonic() < deadline and "untrusted content" not in _all_output(log_dir):
            time.sleep(0.5)
    output = _all_output(log_dir)
    lines = output.splitlines()
    # the output is real: the worker ran the jobs and logged them at DEBUG
    assert len(lines) > 100 and all(job_id in output for job_id in job_ids)
    assert "DEBUG" in output
    leaks = [(canary, line[:200]) for line in lines for canary in CANARIES if canary in line]
    print(f"P7 {len(lines)} log lines from API + worker, 3 jobs, {len(hostile)} hostile files, "
          f"{len(leaks)} canary occurrences")  # fmt: skip
    assert not leaks, leaks[:5]
    # P13: the pickled message was refused by the worker, never loaded
    assert "untrusted content" in output
    assert not marker.exists()


def _all_output(log_dir: Path) -> str:
    """Everything every process of the deployment wrote (stdout and stderr)."""
    return "\n".join(
        p.read_text(errors="replace") for p in sorted(log_dir.rglob("*")) if p.is_file()
    )
