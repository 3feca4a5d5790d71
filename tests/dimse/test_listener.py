"""The C-STORE SCP with real DIMSE peers: dcmtk ``echoscu``/``storescu`` and pynetdicom.

Series sent by C-STORE (uncompressed and RLE compressed) become one job per series when the
association ends; the job runs in-process on the real runner, and the SEG, SR and Parametric
Map results are then found with QIDO-RS, fetched with WADO-RS and checked with dciodvfy.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pydicom
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select

from app.db.records import AuditEventRecord, InstanceRecord, JobRecord, SeriesRecord
from app.db.session import session_scope
from tests.dicomweb.support import datasets, value
from tests.dimse.conftest import Listener
from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.dciodvfy import dciodvfy_errors
from tests.helpers.services import unavailable
from workers import runner

RLE = "1.2.840.10008.1.2.5"


def _dcmtk(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        unavailable(f"{tool} not found: install the Debian package dcmtk")
    assert path is not None
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_dcmtk(args[0]), *args[1:]], capture_output=True, text=True, timeout=60, check=False
    )


def _write_series(folder: Path, seed: int, n: int = 3) -> tuple[list[Path], str]:
    files, _ = bright_disc_series(n=n, radius=10, seed=seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate(files):
        path = folder / f"slice{i}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths, str(pydicom.dcmread(io.BytesIO(files[0])).SeriesInstanceUID)


def _job_of(series_uid: str, timeout: float = 30) -> str:
    """The job the listener created for a series (it ingests when the association ends)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with session_scope() as session:
            job = session.scalar(
                select(JobRecord.id)
                .join(SeriesRecord, SeriesRecord.id == JobRecord.series_id)
                .where(SeriesRecord.series_instance_uid == series_uid)
            )
        if job is not None:
            return job
        time.sleep(0.2)
    raise TimeoutError(f"no job for series {series_uid}")


def _store(listener: Listener, paths: list[Path], *options: str, check: bool = True) -> str:
    result = _run(
        "storescu", "-v", "-aet", "STORESCU", "-aec", listener.ae_title, *options,
        "127.0.0.1", str(listener.port), *map(str, paths),
    )  # fmt: skip
    output = result.stdout + result.stderr
    assert result.returncode == 0 or not check, output
    return output


def _check_results_over_dicomweb(api: Any, series_uid: str) -> None:
    (study,) = api.get("/dicomweb/series", params={"SeriesInstanceUID": series_uid}).json()
    study_uid = value(study, "0020000D")
    listed = api.get(f"/dicomweb/studies/{study_uid}/series").json()
    modalities = sorted(value(s, "00080060") for s in listed)
    assert {"CT", "SEG", "SR", "OT"} == set(modalities)
    for item in listed:
        if value(item, "00080060") == "CT":
            continue
        r = api.get(f"/dicomweb/studies/{study_uid}/series/{value(item, '0020000E')}")
        (obj,) = datasets(r.headers["content-type"], r.content)
        assert dciodvfy_errors(obj) == [], value(item, "00080060")


def test_echo_and_calling_ae_title_filtering(listener: Listener) -> None:
    assert (
        _run(
            "echoscu", "-aet", "ECHOSCU", "-aec", "MEDCAD", "127.0.0.1", str(listener.port)
        ).returncode
        == 0
    )
    intruder = _run(
        "echoscu", "-aet", "INTRUDER", "-aec", "MEDCAD", "127.0.0.1", str(listener.port)
    )
    assert intruder.returncode != 0 and "Calling AE Title Not Recognized" in intruder.stderr
    wrong_called = _run(
        "echoscu", "-aet", "ECHOSCU", "-aec", "OTHER", "127.0.0.1", str(listener.port)
    )
    assert wrong_called.returncode != 0 and "Called AE Title Not Recognized" in wrong_called.stderr


def test_storescu_uncompressed_series_is_analysed(
    listener: Listener, module_api: Any, tmp_path: Path
) -> None:
    paths, series = _write_series(tmp_path / "plain", seed=11)
    _store(listener, paths)
    job = _job_of(series)
    assert runner.run_job(job) == "succeeded"
    with session_scope() as session:
        count = session.scalar(select(JobRecord.instance_count).where(JobRecord.id == job))
        audit = session.scalars(
            select(AuditEventRecord).where(AuditEventRecord.resource == f"job/{job}")
        ).one()
    assert count == 3
    assert (audit.action, audit.client, audit.detail) == ("upload", "STORESCU@127.0.0.1", "C-STORE")
    _check_results_over_dicomweb(module_api, series)


def test_storescu_rle_compressed_series_is_stored_as_sent(
    listener: Listener, module_api: Any, tmp_path: Path
) -> None:
    paths, series = _write_series(tmp_path / "plain", seed=12)
    compressed = []
    for path in paths:
        target = tmp_path / f"rle-{path.name}"
        assert _run("dcmcrle", str(path), str(target)).returncode == 0
        compressed.append(target)
    assert pydicom.dcmread(compressed[0]).file_meta.TransferSyntaxUID == RLE
    _store(listener, compressed, "-xr")  # propose RLE Lossless: no transcoding by the sender
    job = _job_of(series)
    with session_scope() as session:
        syntaxes = set(
            session.scalars(
                select(InstanceRecord.transfer_syntax_uid)
                .join(SeriesRecord, SeriesRecord.id == InstanceRecord.series_id)
                .where(SeriesRecord.series_instance_uid == series)
            )
        )
    assert syntaxes == {RLE}
    assert runner.run_job(job) == "succeeded"
    _check_results_over_dicomweb(module_api, series)


def test_non_image_objects_are_refused_with_a_status(listener: Listener, tmp_path: Path) -> None:
    report = Path(get_testdata_file("reportsi.dcm"))
    output = _store(listener, [report], check=False)
    assert "Received Store Response (Refused: SOPClassNotSupported)" in output, output


def test_aborted_association_keeps_acknowledged_instances(
    listener: Listener, tmp_path: Path
) -> None:
    paths, series = _write_series(tmp_path / "abort", seed=13, n=2)
    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(CTImageStorage, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=listener.ae_title)
    assert assoc.is_established
    statuses = [assoc.send_c_store(pydicom.dcmread(p)).Status for p in paths]
    assoc.abort()  # no release: the instances were acknowledged, so they must be kept
    assert statuses == [0, 0]
    job = _job_of(series)
    with session_scope() as session:
        assert session.scalar(select(JobRecord.instance_count).where(JobRecord.id == job)) == 2
