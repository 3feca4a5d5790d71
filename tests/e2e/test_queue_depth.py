"""The queue's configured depth against a live ``medcad serve`` with no worker yet.

While more jobs are queued than ``MEDCAD_MAX_QUEUE_DEPTH`` allows, both upload doors (REST and
STOW-RS) answer 429 with ``Retry-After`` and the one error body, before a byte of the body is
read and with nothing stored; queued jobs show their position; once a worker drains the queue,
uploads are accepted again.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.services import MedcadProcesses, medcad_deployment, wait_for_jobs

pytestmark = pytest.mark.timeout(300)

DEPTH = 2
MODELS = "tinyseg,tinycls"


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_models_dir: Path
) -> Iterator[MedcadProcesses]:
    with medcad_deployment(
        tmp_path_factory.mktemp("queue-depth"),
        tiny_models_dir,
        embedded=False,
        MEDCAD_MAX_QUEUE_DEPTH=str(DEPTH),
    ) as deployment:
        yield deployment


def _upload(client: httpx.Client, blobs: list[bytes]) -> httpx.Response:
    files = [("files", (f"s{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]
    return client.post("/api/v1/studies", files=files, data={"models": MODELS})


def _headers_only(server: MedcadProcesses, path: str, content_type: str) -> tuple[int, str]:
    """Send a request's head declaring a 1 MB body, send no body, and read the answer."""
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST {path} HTTP/1.1\r\nHost: medcad\r\nContent-Type: {content_type}\r\n"
        f"Authorization: Bearer {server.api_key}\r\nContent-Length: {1024 * 1024}\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.settimeout(10)
        s.sendall(head.encode())
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.decode("latin-1")


def _count(client: httpx.Client, status: str) -> int:
    return int(client.get("/api/v1/jobs", params={"status": status, "limit": 1}).json()["total"])


def test_uploads_over_the_queue_depth_get_429_with_retry_after_until_it_drains(
    server: MedcadProcesses,
) -> None:
    with server.client() as client:
        # Fill the queue: no worker runs, so every job stays queued, each with its position.
        job_ids = []
        for seed in range(DEPTH):
            r = _upload(client, bright_disc_series(n=2, seed=seed)[0])
            assert r.status_code == 202, r.text
            job_ids += [j["id"] for j in r.json()["jobs"]]
        positions = [client.get(f"/api/v1/jobs/{j}").json()["queue_position"] for j in job_ids]
        assert positions == list(range(1, DEPTH + 1))

        # Over the depth: 429 + Retry-After + the error body, and nothing stored.
        extra, _ = bright_disc_series(n=2, seed=99)
        r = _upload(client, extra)
        assert r.status_code == 429, r.text
        assert int(r.headers["retry-after"]) > 0
        assert r.json() == {
            "error": "overloaded",
            "detail": f"{DEPTH} jobs are queued (limit {DEPTH}); retry later",
        }
        assert _count(client, "queued") == DEPTH

        # Decided from the headers alone, on both upload doors: no body byte was sent.
        for path, content_type in (
            ("/api/v1/studies", "multipart/form-data; boundary=b"),
            ("/dicomweb/studies", 'multipart/related; type="application/dicom"; boundary=b'),
        ):
            started = time.monotonic()
            status, raw = _headers_only(server, path, content_type)
            assert status == 429, raw[:300]
            assert "retry-after: " in raw.lower()
            body = json.loads(raw.split("\r\n\r\n", 1)[1])
            assert body["error"] == "overloaded", body
            assert time.monotonic() - started < 5

        # A worker drains the queue; the same upload is then accepted.
        server.start_worker()
        finished = wait_for_jobs(client, job_ids, timeout=180)
        assert {j["status"] for j in finished.values()} == {"succeeded"}
        r = _upload(client, extra)
        assert r.status_code == 202, r.text
        assert r.json()["stored"] == len(extra)
