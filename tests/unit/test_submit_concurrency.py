"""``medcad submit`` keeps at most ``--concurrency`` uploads in flight, and reaches that bound.

The peer is a real HTTP server (``http.server`` in threads) that holds every upload for a
moment and counts how many are in flight at once; the files are real DICOM series.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.submit import main as submit_main
from tests.fixtures.dicom_files import bright_disc_series

HOLD_SECONDS = 0.3


class UploadPeer:
    """Answers ``/api/v1/me`` and ``/api/v1/studies`` (every file stored, one job per request)
    and records the most uploads it ever held at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0
        self.uploads = 0
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _reply(self, status: int, payload: object) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                if self.path == "/api/v1/me":
                    self._reply(200, {"name": "ci", "role": "uploader", "key_prefix": "mc_ci"})
                else:
                    self._reply(404, {"error": "not_found", "detail": self.path})

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with peer.lock:
                    peer.in_flight += 1
                    peer.uploads += 1
                    peer.most = max(peer.most, peer.in_flight)
                try:
                    time.sleep(HOLD_SECONDS)
                    names = re.findall(rb'filename="([^"]+)"', body)
                    self._reply(
                        202,
                        {
                            "jobs": [{"id": uuid.uuid4().hex, "status": "queued"}],
                            "stored": len(names),
                            "duplicates": 0,
                            "rejected": [],
                            "files": [{"filename": n.decode(), "outcome": "stored"} for n in names],
                        },
                    )
                finally:
                    with peer.lock:
                        peer.in_flight -= 1

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)


@pytest.fixture
def peer() -> Iterator[UploadPeer]:
    server = UploadPeer()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    server.thread.join(5)


@pytest.mark.parametrize("concurrency", [1, 3])
def test_uploads_in_flight_never_exceed_the_concurrency(
    peer: UploadPeer, tmp_path: Path, concurrency: int
) -> None:
    series = 7
    for index in range(series):
        folder = tmp_path / "data" / f"series{index}"
        folder.mkdir(parents=True)
        blobs, _ = bright_disc_series(n=2, size=32, seed=index)
        for n, blob in enumerate(blobs):
            (folder / f"IM{n}.dcm").write_bytes(blob)

    code = submit_main(
        [
            str(tmp_path / "data"),
            "--server",
            peer.url,
            "--api-key",
            "mc_ci_secret",
            "--concurrency",
            str(concurrency),
            "--state",
            str(tmp_path / "state.json"),
        ]
    )

    assert code == 0
    assert peer.uploads == series  # one request per series
    assert peer.most == concurrency, (peer.most, concurrency)
    state = json.loads((tmp_path / "state.json").read_text())
    assert {r["outcome"] for r in state["files"].values()} == {"stored"}
    assert len(state["files"]) == 2 * series
