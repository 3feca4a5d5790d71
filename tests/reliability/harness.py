"""Fault-injection building blocks: our own Redis and PostgreSQL servers, medcad processes we can
kill and restart, and direct SQL views of the job table.

Everything runs on 127.0.0.1 on free ports, in temporary folders, and is stopped by the code that
started it. Shared services (Redis on 6379, PostgreSQL on 5432) are only ever used as a client:
faults are injected into servers these helpers start themselves.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import Engine, create_engine, text

from tests.fixtures.dicom_files import bright_disc_series
from tests.helpers.services import ADMIN_KEY, base_env, free_port, unavailable, wait_ready


def wait_until(predicate: Any, timeout: float, interval: float = 0.1, what: str = "") -> float:
    """Poll ``predicate`` until true; returns the seconds waited, raises TimeoutError otherwise."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        time.sleep(interval)
    raise TimeoutError(f"not true after {timeout}s: {what or predicate}")


def children(pid: int) -> list[int]:
    """Direct child pids of ``pid`` (Linux ``/proc``)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(p) for p in path.read_text().split()]
    except OSError:
        return []


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def percentile(values: list[float], q: float) -> float:
    """The ``q`` percentile (0–100, nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# ---------------------------------------------------------------------------------------------
# Redis


class RedisServer:
    """A redis-server of our own (so we may kill it), with or without an append-only file."""

    def __init__(self, workdir: Path, *, persistent: bool) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            unavailable("redis-server is not installed")
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.persistent = persistent
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.binary is not None
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "everysec"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        log = (self.dir / "redis.log").open("ab")
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--bind",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--maxmemory-policy",
                "noeviction",
                *persistence,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        wait_until(self.ping, 10, 0.05, "redis-server answers PING")

    def ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis.from_url(self.url, socket_connect_timeout=0.5).ping())
        except Exception:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save, like a crash or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def wipe(self) -> None:
        """Delete the persisted data: the next start is what a Redis without persistence sees."""
        assert self.proc is None or self.proc.poll() is not None, "wipe a stopped server only"
        shutil.rmtree(self.dir / "appendonlydir", ignore_errors=True)
        for name in ("dump.rdb", "appendonly.aof"):
            (self.dir / name).unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def queue_length(self, queue: str = "medcad") -> int:
        import redis

        return int(redis.Redis.from_url(self.url, socket_connect_timeout=1).llen(queue))


@contextmanager
def redis_server(workdir: Path, *, persistent: bool) -> Iterator[RedisServer]:
    server = RedisServer(workdir, persistent=persistent)
    server.start()
    try:
        yield server
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def _pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return candidates[-1] if candidates else None


class PostgresCluster:
    """A throwaway PostgreSQL cluster (initdb + pg_ctl) on a free port, that we may stop."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = _pg_bin("initdb"), _pg_bin("pg_ctl")
        if self.initdb is None or self.pg_ctl is None:
            unavailable("PostgreSQL server binaries (initdb, pg_ctl) are not installed")
        self.root = Path(tempfile.mkdtemp(prefix="medcad-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        # PostgreSQL refuses to run as root: run its tools as the postgres user then.
        self._as: list[str] = []
        if os.geteuid() == 0:
            runuser = shutil.which("runuser")
            if runuser is None:
                unavailable("running as root without runuser: cannot start a PostgreSQL cluster")
            self._as = [runuser, "-u", "postgres", "--"]
            shutil.chown(self.root, "postgres")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> None:
        subprocess.run([*self._as, *args], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        assert self.initdb is not None
        self._run(
            self.initdb,
            "-D",
            str(self.data),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
            "-E",
            "UTF8",
        )

    def start(self) -> None:
        assert self.pg_ctl is not None
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
            "-c max_connections=200 -c shared_buffers=32MB"
        )
        self._run(
            self.pg_ctl,
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "pg.log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        """Stop the server; ``immediate`` is a crash stop (no checkpoint, recovery on start)."""
        assert self.pg_ctl is not None
        with suppress(subprocess.CalledProcessError):
            self._run(self.pg_ctl, "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str) -> str:
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.init()
        cluster.start()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        cluster.remove()
        unavailable(f"cannot start a PostgreSQL cluster ({type(exc).__name__})")
    try:
        yield cluster
    finally:
        cluster.stop("immediate")
        cluster.remove()


# ---------------------------------------------------------------------------------------------
# medcad processes


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    handle = log.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", *args],
        env=env,
        stdout=handle,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _terminate(proc: subprocess.Popen[bytes], grace: float = 5) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass
    # each process leads its own group (with its pool children, or the embedded worker)
    with suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@dataclass
class Stack:
    """A medcad deployment whose processes a test kills and restarts at will."""

    root: Path
    models_dir: Path
    env: dict[str, str]
    port: int = field(default_factory=free_port)
    api: subprocess.Popen[bytes] | None = None
    workers: list[subprocess.Popen[bytes]] = field(default_factory=list)
    starts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return Path(self.env["MEDCAD_DATA_DIR"])

    @property
    def database_url(self) -> str:
        return self.env.get("MEDCAD_DATABASE_URL") or (
            f"sqlite:///{(self.data_dir / 'medcad.sqlite3').resolve()}"
        )

    def _log(self, name: str) -> Path:
        folder = self.root / "logs"
        folder.mkdir(parents=True, exist_ok=True)
        self.starts += 1
        return folder / f"{name}-{self.starts}.log"

    def start_api(self, *, embedded_worker: bool = False, wait: bool = True) -> None:
        args = ["serve", "--port", str(self.port)] + ([] if embedded_worker else ["--no-worker"])
        self.api = _spawn(args, self.env, self._log("api"))
        if wait:
            wait_ready(self.url, [self.api], timeout=120)

    def wait_api(self, timeout: float = 60) -> None:
        """Wait until the API answers ``/healthz`` (readiness may be red during a fault)."""
        assert self.api is not None

        def up() -> bool:
            assert self.api is not None
            if self.api.poll() is not None:
                raise RuntimeError(f"API exited with {self.api.returncode}")
            try:
                return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(up, timeout, 0.05, "API answers /healthz")

    def kill_api(self) -> None:
        """SIGKILL the API process group (no graceful shutdown)."""
        if self.api is not None:
            with suppress(ProcessLookupError):
                os.killpg(self.api.pid, signal.SIGKILL)
            self.api.wait()

    def start_worker(
        self, concurrency: int = 2, *extra: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = _spawn(
            ["worker", "--concurrency", str(concurrency), *extra],
            {**self.env, **(env or {})},
            self._log("worker"),
        )
        self.workers.append(proc)
        return proc

    def wait_worker_pool(
        self, proc: subprocess.Popen[bytes], size: int, timeout: float = 90
    ) -> None:
        """Wait until a worker has forked its pool children."""
        wait_until(lambda: len(children(proc.pid)) >= size, timeout, 0.1, "worker pool started")

    def kill_worker(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a whole worker: main process and pool children."""
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def client(self, timeout: float = 60) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, timeout=timeout, headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )

    def stop(self) -> None:
        procs = [p for p in [*self.workers, self.api] if p is not None]
        for proc in procs:  # SIGTERM everything first: the graceful shutdowns overlap
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            _terminate(proc)

    def logs(self, tail: int | None = None) -> str:
        """All process logs (each cut to its last ``tail`` characters when given)."""
        out = []
        for path in sorted((self.root / "logs").glob("*.log")):
            text = path.read_text(errors="replace")
            out.append(f"== {path.name}\n{text[-tail:] if tail else text}")
        return "\n".join(out)


@contextmanager
def stack(root: Path, models_dir: Path, **env: str) -> Iterator[Stack]:
    """A ``Stack`` with sensible fault-test defaults; stopped on exit."""
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    defaults = {
        "MEDCAD_JOB_LEASE_SECONDS": "6",
        "MEDCAD_SWEEPER_INTERVAL_SECONDS": "1",
        "MEDCAD_QUEUED_RESEND_AFTER_SECONDS": "5",
        "MEDCAD_LOG_LEVEL": "WARNING",
    }
    defaults.update(env)
    s = Stack(root=root, models_dir=models_dir, env=base_env(data_dir, models_dir, **defaults))
    try:
        yield s
    finally:
        s.stop()


# ---------------------------------------------------------------------------------------------
# uploads and the job table


def series_files(n_slices: int, size: int, seed: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    """A fresh series (new UIDs) as multipart ``files`` parts."""
    blobs, _ = bright_disc_series(n=n_slices, size=size, seed=seed, radius=size / 8)
    return [("files", (f"{i}.dcm", b, "application/dicom")) for i, b in enumerate(blobs)]


def upload_series(client: httpx.Client, n_slices: int, size: int, seed: int) -> str:
    """Upload one new series; returns its job id (asserts 202)."""
    r = client.post("/api/v1/studies", files=series_files(n_slices, size, seed))
    if r.status_code != 202:
        raise AssertionError(f"upload answered {r.status_code}: {r.text[:300]}")
    return str(r.json()["jobs"][0]["id"])


@dataclass(frozen=True)
class JobRow:
    id: str
    status: str
    attempts: int
    error_code: str | None
    started_at: Any
    finished_at: Any
    lease_owner: str | None
    results_at: Any = None


class Database:
    """Read-only SQL views the tests assert on (independent of the API)."""

    def __init__(self, url: str) -> None:
        self.engine: Engine = create_engine(url, pool_pre_ping=True)

    def jobs(self, ids: list[str] | None = None) -> dict[str, JobRow]:
        sql = (
            "SELECT id, status, attempts, error_code, started_at, finished_at, lease_owner, "
            "results_at FROM jobs"
        )
        with self.engine.connect() as conn:
            rows = conn.execute(text(sql)).all()
        out = {r[0]: JobRow(*r) for r in rows}
        return {k: v for k, v in out.items() if ids is None or k in ids}

    def scalar(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).scalar()

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(text(sql), params).all())

    def result_counts(self, job_id: str) -> dict[str, int]:
        """How many result rows of each kind a job has."""
        counts = {}
        for table in ("masks", "findings", "saliency_maps", "artifacts"):
            counts[table] = int(
                self.scalar(f"SELECT count(*) FROM {table} WHERE job_id = :j", j=job_id)
            )
        for level in ("slice", "series", "lesion"):
            counts[f"{level}_findings"] = int(
                self.scalar(
                    "SELECT count(*) FROM findings WHERE job_id = :j AND level = :l",
                    j=job_id,
                    l=level,
                )
            )
        return counts

    def dispose(self) -> None:
        self.engine.dispose()


def wait_terminal(db: Database, ids: list[str], timeout: float) -> dict[str, JobRow]:
    """Poll the job table until every job in ``ids`` is succeeded or failed."""
    deadline = time.monotonic() + timeout
    rows: dict[str, JobRow] = {}
    while time.monotonic() < deadline:
        try:
            rows = db.jobs(ids)
        except Exception:  # the database may be down in an outage test
            time.sleep(0.5)
            continue
        if all(r.status in ("succeeded", "failed") for r in rows.values()) and len(rows) == len(
            ids
        ):
            return rows
        time.sleep(0.25)
    return rows
