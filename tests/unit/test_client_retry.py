"""``app.client.Client`` against a real HTTP peer (``http.server`` in a thread) that answers
from a script: transient failures (503 + Retry-After, 502, 429, refused connections) are retried
with bounded backoff, other errors are raised at once with the server's error body."""

from __future__ import annotations

import json
import random
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from app.client import Client, ClientError, RetryPolicy, parse_retry_after, retry_delay

FAST = RetryPolicy(attempts=4, backoff=0.02, max_delay=0.1)


@dataclass
class Reply:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, status: int, payload: object, **headers: str) -> Reply:
        return cls(
            status, json.dumps(payload).encode(), {"Content-Type": "application/json", **headers}
        )


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class Peer:
    """A scripted HTTP server: each (method, path) answers its replies in turn, the last one
    repeating; every request is recorded."""

    def __init__(self) -> None:
        self.script: dict[tuple[str, str], list[Reply]] = {}
        self.seen: list[Seen] = []
        peer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?", 1)[0]
                peer.seen.append(Seen(self.command, self.path, dict(self.headers), body))
                replies = peer.script.get((self.command, path)) or [
                    Reply.json(404, {"error": "not_found", "detail": path})
                ]
                reply = replies.pop(0) if len(replies) > 1 else replies[0]
                self.send_response(reply.status)
                for key, value in reply.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.body)))
                self.end_headers()
                self.wfile.write(reply.body)

            do_GET = do_POST = _answer

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def requests_to(self, method: str, path: str) -> list[Seen]:
        return [s for s in self.seen if s.method == method and s.path.split("?")[0] == path]


@pytest.fixture
def peer() -> Iterator[Peer]:
    server = Peer()
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()
    server.thread.join(5)


ME = {"name": "ci", "role": "uploader", "key_prefix": "mcd_ab"}


def test_503_with_retry_after_is_waited_out_then_succeeds(peer: Peer) -> None:
    peer.script[("GET", "/api/v1/me")] = [
        Reply.json(
            503, {"error": "overloaded", "detail": "queue depth 500 > 100"}, **{"Retry-After": "1"}
        ),
        Reply.json(502, {"error": "bad_gateway", "detail": "upstream"}),
        Reply.json(200, ME),
    ]
    with Client(peer.url, "secret-key", retries=FAST) as client:
        started = time.monotonic()
        me = client.me()
        elapsed = time.monotonic() - started

    assert me.role == "uploader" and me.key_prefix == "mcd_ab"
    calls = peer.requests_to("GET", "/api/v1/me")
    assert len(calls) == 3
    assert all(c.headers["Authorization"] == "Bearer secret-key" for c in calls)
    # Retry-After: 1 was honoured (plus at most 10 % jitter), the 502 backoff stayed small.
    assert 1.0 <= elapsed < 1.1 + FAST.max_delay + 1.0


def test_upload_is_retried_with_the_whole_body_and_progress_is_not_double_counted(
    peer: Peer, tmp_path: Path
) -> None:
    files = []
    for i in range(3):
        path = tmp_path / f"IM{i}.dcm"
        path.write_bytes(bytes([i]) * (100_000 + i))
        files.append(path)
    accepted = {
        "jobs": [{"id": "j1", "series_instance_uid": "1.2.3", "status": "queued"}],
        "stored": 3,
        "duplicates": 0,
        "rejected": [],
        "files": [
            {
                "filename": p.name,
                "outcome": "stored",
                "sop_instance_uid": None,
                "series_instance_uid": "1.2.3",
                "error": None,
                "detail": None,
            }
            for p in files
        ],
    }
    peer.script[("POST", "/api/v1/studies")] = [
        Reply.json(503, {"error": "service_unavailable", "detail": "db"}, **{"Retry-After": "0"}),
        Reply.json(202, accepted),
    ]
    progress: list[int] = []

    with Client(peer.url, "k", retries=FAST) as client:
        result = client.upload(files, models=["unet", "classifier"], progress=progress.append)

    assert result.http_status == 202 and result.stored == 3 and result.jobs[0].id == "j1"
    posts = peer.requests_to("POST", "/api/v1/studies")
    assert len(posts) == 2
    for post in posts:  # both attempts carried every file in full, and the model list
        assert post.headers["Content-Type"].startswith("multipart/form-data")
        for path in files:
            assert path.read_bytes() in post.body
        assert b"unet,classifier" in post.body
    total = sum(p.stat().st_size for p in files)
    assert sum(progress) == total
    assert any(n < 0 for n in progress)  # the failed attempt's bytes were taken back


def test_all_rejected_upload_returns_the_outcomes_instead_of_raising(peer: Peer) -> None:
    body = {
        "jobs": [],
        "stored": 0,
        "duplicates": 0,
        "rejected": [{"filename": "a.txt", "error": "not_dicom", "detail": "no DICM"}],
        "files": [
            {
                "filename": "a.txt",
                "outcome": "rejected",
                "sop_instance_uid": None,
                "series_instance_uid": None,
                "error": "not_dicom",
                "detail": "no DICM",
            }
        ],
    }
    peer.script[("POST", "/api/v1/studies")] = [Reply.json(422, body)]

    with Client(peer.url, "k", retries=FAST) as client:
        result = client.upload([("a.txt", b"hello")])

    assert result.http_status == 422
    assert [(f.filename, f.outcome, f.error) for f in result.files] == [
        ("a.txt", "rejected", "not_dicom")
    ]
    assert len(peer.requests_to("POST", "/api/v1/studies")) == 1


@pytest.mark.parametrize("status", [400, 401, 403, 404, 409, 413, 422, 500])
def test_other_errors_are_raised_at_once_with_the_server_body(peer: Peer, status: int) -> None:
    peer.script[("GET", "/api/v1/jobs/abc")] = [
        Reply.json(status, {"error": f"code_{status}", "detail": "job abc: nope"})
    ]

    with Client(peer.url, "k", retries=FAST) as client, pytest.raises(ClientError) as caught:
        client.job("abc")

    assert (caught.value.status, caught.value.code, caught.value.detail) == (
        status,
        f"code_{status}",
        "job abc: nope",
    )
    assert len(peer.requests_to("GET", "/api/v1/jobs/abc")) == 1


def test_retries_are_bounded(peer: Peer) -> None:
    peer.script[("GET", "/api/v1/models")] = [
        Reply.json(429, {"error": "rate_limited", "detail": "slow down"})
    ]

    with Client(peer.url, "k", retries=FAST) as client, pytest.raises(ClientError) as caught:
        client.models()

    assert caught.value.status == 429 and caught.value.code == "rate_limited"
    assert len(peer.requests_to("GET", "/api/v1/models")) == FAST.attempts


def test_a_retry_after_longer_than_allowed_is_not_slept_through(peer: Peer) -> None:
    peer.script[("GET", "/api/v1/me")] = [
        Reply.json(503, {"error": "overloaded", "detail": "later"}, **{"Retry-After": "3600"})
    ]
    policy = RetryPolicy(attempts=4, backoff=0.02, max_retry_after=60)

    with Client(peer.url, "k", retries=policy) as client, pytest.raises(ClientError) as caught:
        started = time.monotonic()
        client.me()

    assert caught.value.status == 503 and time.monotonic() - started < 5
    assert len(peer.requests_to("GET", "/api/v1/me")) == 1


def test_non_json_error_bodies_still_give_a_client_error(peer: Peer) -> None:
    peer.script[("GET", "/api/v1/me")] = [
        Reply(404, b"<html>nginx</html>", {"Content-Type": "text/html"})
    ]

    with Client(peer.url, "k", retries=FAST) as client, pytest.raises(ClientError) as caught:
        client.me()

    assert caught.value.code == "http_404" and "nginx" in caught.value.detail


def test_refused_connections_are_retried_then_reported() -> None:
    with socket.socket() as sock:  # a port nobody listens on any more
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    with (
        Client(f"http://127.0.0.1:{port}", "k", retries=FAST) as client,
        pytest.raises(ClientError) as caught,
    ):
        client.me()

    assert caught.value.status == 0 and caught.value.code == "connection_error"
    assert "ConnectError" in caught.value.detail


def test_download_survives_a_503_and_leaves_no_partial_file(peer: Peer, tmp_path: Path) -> None:
    payload = bytes(range(256)) * 4000
    peer.script[("GET", "/api/v1/artifacts/a1")] = [
        Reply.json(503, {"error": "overloaded", "detail": "x"}, **{"Retry-After": "0"}),
        Reply(200, payload, {"Content-Type": "application/dicom"}),
    ]
    dest = tmp_path / "out" / "seg_unet.dcm"

    with Client(peer.url, "k", retries=FAST) as client:
        assert client.download("/api/v1/artifacts/a1", dest) == dest
        absolute = client.download(f"{peer.url}/api/v1/artifacts/a1", tmp_path / "again.dcm")

    assert dest.read_bytes() == payload and absolute.read_bytes() == payload
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == [
        "again.dcm",
        "seg_unet.dcm",
    ]


def test_download_refuses_another_origin_so_the_key_never_leaves(
    peer: Peer, tmp_path: Path
) -> None:
    with Client(peer.url, "k", retries=FAST) as client, pytest.raises(ClientError) as caught:
        client.download("http://example.invalid/steal.png", tmp_path / "x.png")

    assert caught.value.code == "foreign_url"
    assert peer.seen == [] and not (tmp_path / "x.png").exists()


def test_job_listing_follows_pages_without_repeating_a_job(peer: Peer) -> None:
    def job(i: int) -> dict[str, object]:
        return {"id": f"j{i}", "status": "succeeded", "models": ["unet:1.0.0"]}

    # A new job arrives between the two page requests and shifts j2 onto the second page.
    peer.script[("GET", "/api/v1/jobs")] = [
        Reply.json(200, {"items": [job(3), job(2)], "total": 3, "limit": 2, "offset": 0}),
        Reply.json(200, {"items": [job(2), job(1)], "total": 4, "limit": 2, "offset": 2}),
        Reply.json(200, {"items": [], "total": 4, "limit": 2, "offset": 4}),
    ]

    with Client(peer.url, "k", retries=FAST) as client:
        ids = [j.id for j in client.jobs(page_size=2, series_instance_uid="1.2.3")]

    assert ids == ["j3", "j2", "j1"]
    first = peer.requests_to("GET", "/api/v1/jobs")[0].path
    assert "series_instance_uid=1.2.3" in first and "limit=2" in first


def test_backoff_grows_exponentially_with_jitter_and_is_capped() -> None:
    policy = RetryPolicy(attempts=10, backoff=0.5, max_delay=4.0)
    rng = random.Random(7)
    for retry in range(1, 10):
        ceiling = min(4.0, 0.5 * 2 ** (retry - 1))
        delays = [retry_delay(retry, policy, retry_after=None, rng=rng) for _ in range(200)]
        assert all(d is not None and ceiling / 2 <= d <= ceiling for d in delays)
        assert len({round(d or 0, 6) for d in delays}) > 100  # jittered, not lock-step
    assert retry_delay(10, policy, retry_after=None, rng=rng) is None
    honoured = retry_delay(1, policy, retry_after=20.0, rng=rng)
    assert honoured is not None and 20.0 <= honoured <= 22.0


def test_retry_after_accepts_seconds_and_http_dates() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert parse_retry_after("120") == 120.0
    assert (
        parse_retry_after(format_datetime(now + timedelta(seconds=30), usegmt=True), now=now)
        == 30.0
    )
    assert (
        parse_retry_after(format_datetime(now - timedelta(seconds=30), usegmt=True), now=now) == 0.0
    )
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
