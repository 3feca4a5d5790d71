"""Real services for tests: PostgreSQL, Redis, and medcad processes on free loopback ports.

A test that needs a service it cannot reach fails when ``CI=true`` and skips elsewhere.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

PG_ADMIN_URL = os.environ.get(
    "MEDCAD_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("MEDCAD_TEST_REDIS", "redis://127.0.0.1:6379")
ADMIN_KEY = "mc_testadmn_" + "k" * 40


def unavailable(reason: str) -> None:
    """Fail under CI, skip elsewhere."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required service unavailable in CI: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database, dropped afterwards; yields its SQLAlchemy URL."""
    from sqlalchemy import create_engine, text

    name = f"medcad_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = create_engine(
            PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3}
        )
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        unavailable(f"PostgreSQL at 127.0.0.1:5432 unreachable ({type(exc).__name__})")
    try:
        yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
                {"n": name},
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


def redis_db_url(db: int) -> str:
    """A Redis URL on database ``db``, flushed; skips/fails if Redis is unreachable."""
    import redis

    url = f"{REDIS_URL}/{db}"
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2)
        client.flushdb()
    except Exception as exc:
        unavailable(f"Redis at 127.0.0.1:6379 unreachable ({type(exc).__name__})")
    return url


@dataclass
class MedcadProcesses:
    """Processes of one medcad deployment started by a test."""

    url: str
    api_key: str
    data_dir: Path
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    log_dir: Path | None = None

    def client(self, key: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            timeout=60,
            headers={"Authorization": f"Bearer {key or self.api_key}"},
        )

    def start_worker(self, *extra: str) -> subprocess.Popen[bytes]:
        proc = _spawn(["worker", *extra], self.env, self._log(f"worker{len(self.procs)}"))
        self.procs.append(proc)
        return proc

    def _log(self, name: str) -> Path:
        assert self.log_dir is not None
        return self.log_dir / f"{name}.log"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            # each process leads its own group (with any children, e.g. the embedded worker)
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def base_env(data_dir: Path, models_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for a medcad process under test."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCAD_")}
    env.update(
        MEDCAD_DATA_DIR=str(data_dir),
        MEDCAD_MODELS_DIR=str(models_dir),
        MEDCAD_ADMIN_API_KEY=ADMIN_KEY,
        MEDCAD_SWEEPER_INTERVAL_SECONDS="1",
        MEDCAD_QUEUED_RESEND_AFTER_SECONDS="20",
        MEDCAD_ORT_INTRA_OP_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def wait_ready(url: str, procs: list[subprocess.Popen[bytes]], timeout: float = 120) -> None:
    """Wait for ``/readyz`` to answer 200."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"medcad process exited early with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} not ready after {timeout}s")


@contextmanager
def medcad_deployment(
    tmp: Path, models_dir: Path, *, workers: int = 0, embedded: bool = True, **env_extra: str
) -> Iterator[MedcadProcesses]:
    """Start ``medcad serve`` (embedded worker unless ``embedded=False``) plus ``workers``."""
    data_dir = tmp / "data"
    log_dir = tmp / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = base_env(data_dir, models_dir, **env_extra)
    deployment = MedcadProcesses(
        url=f"http://127.0.0.1:{port}",
        api_key=ADMIN_KEY,
        data_dir=data_dir,
        env=env,
        log_dir=log_dir,
    )
    args = ["serve", "--port", str(port)] + ([] if embedded else ["--no-worker"])
    deployment.procs.append(_spawn(args, env, log_dir / "serve.log"))
    try:
        wait_ready(deployment.url, deployment.procs)
        for _ in range(workers):
            deployment.start_worker()
        yield deployment
    finally:
        deployment.stop()


@contextmanager
def make_run(data_dir: Path, log: Path, *, timeout: float = 300) -> Iterator[str]:
    """``make run PORT=…`` exactly as the README says, its data in ``data_dir``; yields the URL.

    ``make`` and everything it starts lead one process group, stopped as a whole at the end.
    """
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDCAD_")}
    env["MEDCAD_DATA_DIR"] = str(data_dir)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["make", "-s", "run", f"PORT={port}"],
            cwd=Path(__file__).resolve().parents[2],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, [proc], timeout=timeout)
        yield url
    finally:
        stop_group(proc)


def stop_group(proc: subprocess.Popen[bytes], grace: float = 30) -> None:
    """SIGTERM the process group ``proc`` leads, SIGKILL whatever is left after ``grace``."""
    with _suppress_gone():
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    with _suppress_gone():
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextmanager
def _suppress_gone() -> Iterator[None]:
    try:
        yield
    except ProcessLookupError:
        pass


def wait_for_jobs(
    client: httpx.Client, job_ids: list[str], timeout: float = 300
) -> dict[str, dict]:
    """Poll until every job is succeeded or failed; returns the final job bodies."""
    deadline = time.monotonic() + timeout
    final: dict[str, dict] = {}
    while time.monotonic() < deadline:
        for job_id in job_ids:
            if job_id in final:
                continue
            body = client.get(f"/api/v1/jobs/{job_id}").json()
            if body.get("status") in ("succeeded", "failed"):
                final[job_id] = body
        if len(final) == len(job_ids):
            return final
        time.sleep(0.5)
    pending = [j for j in job_ids if j not in final]
    raise TimeoutError(f"jobs not finished after {timeout}s: {pending}")
