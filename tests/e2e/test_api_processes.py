"""``medcad serve --api-processes 2``: one port, two API processes, one set of figures.

Real processes on loopback: the embedded worker on SQLite and the filesystem broker, with
``MEDCAD_API_PROCESSES=2``. Every request opens a new connection, so the kernel spreads them
over both processes; the checks hold whichever process answers.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.services import ADMIN_KEY, medcad_deployment, wait_for_jobs
from tests.reliability.harness import children, pid_alive

pytestmark = pytest.mark.slow

HEADER_TIMEOUT = 2.0


def _api_processes(serve_pid: int) -> list[int]:
    """uvicorn's API processes: the spawned children of ``medcad serve``."""
    found = []
    for child in children(serve_pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"multiprocessing.spawn" in cmdline:
            found.append(child)
    return found


def _upload(url: str, seed: int) -> httpx.Response:
    blobs, _ = bright_disc_series(n=1, seed=seed)
    with httpx.Client(base_url=url, timeout=60) as fresh:  # a new connection per request
        return fresh.post(
            "/api/v1/studies",
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            files=[("files", ("0.dcm", blobs[0], "application/dicom"))],
        )


def _counting_processes(api_pid: int) -> set[int]:
    """Pids with a counter file in the API processes' shared metrics directory: the processes
    that have counted something (prometheus_client creates a process's file on its first count)."""
    environ = Path(f"/proc/{api_pid}/environ").read_bytes().split(b"\0")
    folder = next(
        v.split(b"=", 1)[1] for v in environ if v.startswith(b"PROMETHEUS_MULTIPROC_DIR=")
    )
    return {int(f.stem.rsplit("_", 1)[1]) for f in Path(folder.decode()).glob("counter_*.db")}


def _uploads_accepted(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    for family in text_string_to_metric_families(text):
        if family.name == "medcad_uploads":
            return sum(
                s.value
                for s in family.samples
                if s.name == "medcad_uploads_total" and s.labels.get("outcome") == "accepted"
            )
    return 0.0


def test_two_api_processes_share_the_port_the_figures_and_survive_a_kill(
    tmp_path: Path, tiny_models_dir: Path
) -> None:
    with (
        medcad_deployment(
            tmp_path,
            tiny_models_dir,
            MEDCAD_API_PROCESSES="2",
            MEDCAD_HTTP_HEADER_TIMEOUT_SECONDS=str(HEADER_TIMEOUT),
        ) as server,
        server.client() as client,
    ):
        serve_pid = server.procs[0].pid
        api = _api_processes(serve_pid)
        assert len(api) == 2, api

        with ThreadPoolExecutor(3) as pool:  # at once, so that both processes get some
            responses = list(pool.map(lambda seed: _upload(server.url, seed), range(6)))
        assert [r.status_code for r in responses] == [202] * 6, [r.text for r in responses]
        assert _counting_processes(api[0]) == set(api)  # both served uploads
        job_ids = [r.json()["jobs"][0]["id"] for r in responses]
        # Each scrape may land on either process; each must count all six uploads.
        assert [_uploads_accepted(server.url) for _ in range(6)] == [6.0] * 6

        # Every process keeps the configured header deadline (slowloris guard).
        host, port = server.url.removeprefix("http://").split(":")
        for _ in range(4):
            with socket.create_connection((host, int(port)), timeout=10) as s:
                s.settimeout(10)
                started = time.monotonic()
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: medcad\r\nX-Slow: ")
                assert s.recv(1024) == b""  # closed by the server, no answer
                assert HEADER_TIMEOUT - 0.5 < time.monotonic() - started < HEADER_TIMEOUT + 3

        os.kill(api[0], signal.SIGKILL)
        more = [_upload(server.url, seed) for seed in range(6, 10)]
        assert [r.status_code for r in more] == [202] * 4, [r.text for r in more]
        job_ids += [r.json()["jobs"][0]["id"] for r in more]

        deadline = time.monotonic() + 30  # uvicorn's supervisor replaces the killed process
        while time.monotonic() < deadline:
            now = _api_processes(serve_pid)
            if len(now) == 2 and api[0] not in now:
                break
            time.sleep(0.5)
        assert len(now) == 2 and api[0] not in now, now
        # The killed process's counts are kept (its file stays in the metrics directory).
        assert _uploads_accepted(server.url) == 10.0

        final = wait_for_jobs(client, job_ids, timeout=180)
        assert {j["status"] for j in final.values()} == {"succeeded"}, final
        # Jobs run once: the sweeper runs in the supervising process, not once per API process.
        assert all(j["attempts"] == 1 for j in final.values()), final

        # No API process outlives a SIGKILLed supervisor (holding the port), not even one the
        # supervisor was still starting: kill a process, then the supervisor as soon as the
        # replacement exists (it is still importing, before it could ask to die with it).
        before = _api_processes(serve_pid)
        os.kill(before[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            starting = [p for p in _api_processes(serve_pid) if p not in before]
            if starting:
                break
            time.sleep(0.02)
        assert starting, "no replacement started"
        os.kill(serve_pid, signal.SIGKILL)
        last = [*before, *starting]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(pid_alive(p) for p in last):
            time.sleep(0.2)
        assert not any(pid_alive(p) for p in last), last
