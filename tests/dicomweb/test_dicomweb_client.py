"""A real DICOMweb client (dicomweb-client, over requests) against a live ``medcad serve``.

STOW-RS of a CT series, the embedded worker analyses it, QIDO-RS finds the source series and the
SEG, SR and Parametric Map result series, WADO-RS retrieves them, and every result object passes
dciodvfy with zero errors. Raw sockets check that STOW-RS answers before reading the body.
"""

from __future__ import annotations

import io
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient

from tests.dicomweb.support import chunks, stow_body, stow_content_type, value
from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.dciodvfy import dciodvfy_errors
from tests.helpers.services import MedcadProcesses, medcad_deployment, wait_for_jobs

RESULT_CLASSES = {
    "SEG": "1.2.840.10008.5.1.4.1.1.66.4",
    "SR": "1.2.840.10008.5.1.4.1.1.88.34",
    "OT": "1.2.840.10008.5.1.4.1.1.30",
}


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[MedcadProcesses]:
    with medcad_deployment(tmp_path_factory.mktemp("dicomweb-live"), tiny_models_dir) as deployment:
        yield deployment


def _client(server: MedcadProcesses) -> DICOMwebClient:
    return DICOMwebClient(
        url=f"{server.url}/dicomweb", headers={"Authorization": f"Bearer {server.api_key}"}
    )


def _wait_for_series_job(server: MedcadProcesses, series_uid: str) -> dict:
    with server.client() as rest:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            items = rest.get("/api/v1/jobs", params={"series_instance_uid": series_uid}).json()
            if items["items"]:
                job_id = items["items"][0]["id"]
                return wait_for_jobs(rest, [job_id], timeout=120)[job_id]
            time.sleep(0.3)
    raise TimeoutError(f"no job for series {series_uid}")


def test_stow_qido_wado_round_trip_with_dicomweb_client(server: MedcadProcesses) -> None:
    client = _client(server)
    files, _ = bright_disc_series(n=4, radius=10, seed=7)
    sources = [pydicom.dcmread(io.BytesIO(f)) for f in files]
    study, series = sources[0].StudyInstanceUID, sources[0].SeriesInstanceUID
    response = client.store_instances(sources)  # quoted boundary, Content-Length
    assert len(response.ReferencedSOPSequence) == 4 and "FailedSOPSequence" not in response
    job = _wait_for_series_job(server, series)
    assert job["status"] == "succeeded", job

    (found,) = client.search_for_studies(
        search_filters={"PatientID": "CANARY-ID-7731", "StudyInstanceUID": study}
    )
    assert set(found["00080061"]["Value"]) == {"CT", "SEG", "SR", "OT"}
    listed = client.search_for_series(study)
    by_modality: dict[str, list[str]] = {}
    for item in listed:
        by_modality.setdefault(value(item, "00080060"), []).append(value(item, "0020000E"))
    assert by_modality["CT"] == [series]
    assert set(by_modality) == {"CT", *RESULT_CLASSES}

    for modality, sop_class in RESULT_CLASSES.items():
        for result_series in by_modality[modality]:
            (instance,) = client.search_for_instances(study, result_series)
            assert value(instance, "00080016") == sop_class
            objects = client.retrieve_series(study, result_series)
            assert [o.SOPClassUID for o in objects] == [sop_class]
            obj = objects[0]
            assert obj.StudyInstanceUID == study and obj.PatientID == sources[0].PatientID
            assert obj.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
            assert dciodvfy_errors(obj) == [], (modality, dciodvfy_errors(obj))
            metadata = client.retrieve_instance_metadata(study, result_series, obj.SOPInstanceUID)
            assert value(metadata, "00080018") == obj.SOPInstanceUID

    seg_series = by_modality["SEG"][0]
    seg = client.retrieve_series(study, seg_series)[0]
    png = client.retrieve_instance_rendered(
        study, seg_series, seg.SOPInstanceUID, media_types=("image/png",)
    )
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # the source series comes back unchanged
    retrieved = {ds.SOPInstanceUID: ds for ds in client.retrieve_series(study, series)}
    for ds in sources:
        assert retrieved[ds.SOPInstanceUID].PixelData == ds.PixelData


def test_chunked_stow_with_unquoted_boundary_on_the_wire(server: MedcadProcesses) -> None:
    files, _ = bright_disc_series(n=2, seed=8)
    body = stow_body(files, "0f3cf5c0-70e0-41ef")
    with httpx.Client(base_url=server.url, timeout=60) as http:
        r = http.post(
            "/dicomweb/studies",
            content=chunks(body, 1000),  # a generator: Transfer-Encoding: chunked
            headers={
                "Authorization": f"Bearer {server.api_key}",
                "Content-Type": stow_content_type("0f3cf5c0-70e0-41ef", quoted=False),
                "Accept": "application/dicom+json",
            },
        )
    assert r.status_code == 200, r.text
    assert len(r.json()["00081199"]["Value"]) == 2


def _answer_without_body(server: MedcadProcesses, headers: dict[str, str]) -> bytes:
    """Send only the request head (announcing 50 MB) and read what the server answers."""
    host, port = server.url.removeprefix("http://").split(":")
    head = "POST /dicomweb/studies HTTP/1.1\r\n" + "".join(
        f"{k}: {v}\r\n"
        for k, v in {"Host": host, "Content-Length": str(50 * 1024**2), **headers}.items()
    )
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n")
        return sock.recv(4096)


def test_stow_answers_before_reading_the_body(server: MedcadProcesses) -> None:
    content_type = {"Content-Type": stow_content_type("x")}
    assert _answer_without_body(server, content_type).startswith(b"HTTP/1.1 401")
    bad_type = {"Authorization": f"Bearer {server.api_key}", "Content-Type": "application/json"}
    assert _answer_without_body(server, bad_type).startswith(b"HTTP/1.1 415")
