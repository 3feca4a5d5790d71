"""The ``medcad`` command: serve, worker, submit, dicom-listener, keys, models, demo-data, db."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from app.settings import Settings, get_settings


def _prepare(settings: Settings) -> None:
    from app.logging_setup import configure_logging

    configure_logging(settings.log_level, settings.log_json)
    settings.data_dir.mkdir(parents=True, exist_ok=True)


def _migrate(settings: Settings) -> None:
    from app.db.migrate import upgrade

    upgrade(settings.resolved_database_url)


def _first_start_key(settings: Settings) -> str | None:
    """Create and print an admin key when the database has none (like a notebook token)."""
    from sqlalchemy import func, select

    from app.auth.service import create_key
    from app.db.records import ApiKeyRecord, Role
    from app.db.session import session_scope

    if settings.admin_api_key is not None:
        return None
    with session_scope() as session:
        if session.scalar(select(func.count()).select_from(ApiKeyRecord)):
            return None
        _, token = create_key(session=session, name="first-start admin", role=Role.ADMIN)
    key_file = settings.data_dir / "admin.key"
    key_file.write_text(token + "\n")
    key_file.chmod(0o600)
    return token


def die_with_parent(parent_pid: int | None = None) -> None:
    """Linux: this process gets SIGTERM when its parent dies, even by SIGKILL.

    For the processes ``medcad serve`` starts (the embedded worker, the API processes), so
    that none outlives it holding the port or the queue. A parent that died before the request
    took effect would never send the signal, so when ``parent_pid`` is given and is no longer
    the parent, this process ends itself at once.
    """
    import ctypes

    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os.kill(os.getpid(), signal.SIGTERM)


def _spawn_worker() -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "app.cli", "worker", "--no-sweeper"],
        preexec_fn=die_with_parent,
    )


def _supervise(proc_holder: list[subprocess.Popen[bytes]], stop: threading.Event) -> None:
    # The embedded worker is restarted if it dies (e.g. killed by the OS); jobs it held are
    # redelivered or reclaimed by the sweeper.
    while not stop.wait(2.0):
        if proc_holder[0].poll() is not None:
            proc_holder[0] = _spawn_worker()


def cmd_serve(args: argparse.Namespace) -> int:
    """Migrate, start the embedded worker (unless --no-worker) and serve the API."""
    import uvicorn

    from app.main import create_app

    settings = get_settings()
    _prepare(settings)
    _migrate(settings)
    token = _first_start_key(settings)
    if token:
        print(
            f"\n  medcad first start: admin API key (also saved to {settings.data_dir}/admin.key):"
            f"\n    {token}\n  Paste it into the page at http://{args.host}:{args.port}/ to sign in.\n",
            flush=True,
        )
    holder: list[subprocess.Popen[bytes]] = []
    stop = threading.Event()
    if not args.no_worker:
        holder.append(_spawn_worker())
        threading.Thread(target=_supervise, args=(holder, stop), daemon=True).start()
    processes = args.api_processes or settings.api_processes
    options = {
        "host": args.host,
        "port": args.port,
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": 5,
        # slowloris: uvicorn alone never times out a request whose headers do not finish
        "http": "app.http_guard:ConfiguredHeaderDeadlineProtocol",
    }
    try:
        if processes > 1:
            _serve_processes(settings, processes, options)
        else:
            uvicorn.run(create_app(settings, run_sweeper=True), **options)
    finally:
        stop.set()
        for proc in holder:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


def _serve_processes(settings: Settings, processes: int, options: dict[str, Any]) -> None:
    """Serve the API from ``processes`` processes on one listening socket (uvicorn ``options``).

    uvicorn's supervisor starts them, replaces any that dies or stops answering its health
    check, and stops them on SIGTERM/SIGINT. This process runs the sweeper (once, not once per
    API process) and the admin key was seeded before the processes start, so they never race to
    create it. The upload and rejection counters of ``/metrics`` are summed over the processes
    through prometheus_client's multiprocess mode, in a private directory removed on exit.
    """
    import shutil
    import tempfile

    import uvicorn

    from app.jobs.sweeper import start_sweeper
    from app.main import seed_admin_key

    seed_admin_key(settings)
    # Read by each API process at start: its supervisor (see die_with_parent; it also means
    # multiprocess metrics) and prometheus_client's directory for the counters.
    os.environ["MEDCAD_API_SUPERVISOR_PID"] = str(os.getpid())
    metrics_dir = tempfile.mkdtemp(prefix="medcad-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    sweeper = start_sweeper(settings)
    try:
        uvicorn.run("app.main:create_process_app", factory=True, workers=processes, **options)
    finally:
        sweeper.set()
        shutil.rmtree(metrics_dir, ignore_errors=True)


def cmd_worker(args: argparse.Namespace) -> int:
    """Replace this process with a Celery worker (the sweeper runs in its main process).

    The worker is started through ``celery -A workers.celery_app`` so that the API package never
    imports the worker package.
    """
    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    concurrency = args.concurrency or settings.worker_concurrency
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "--loglevel",
        settings.log_level,
        "--pool",
        args.pool,
        "--concurrency",
        str(concurrency),
        "-Q",
        "medcad",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "--hostname",
        f"medcad-{os.getpid()}@%h",
    ]
    if args.no_sweeper:
        os.environ["MEDCAD_WORKER_SWEEPER"] = "false"
    os.execv(sys.executable, argv)  # noqa: S606
    return 0  # pragma: no cover


def cmd_dicom_listener(args: argparse.Namespace) -> int:
    """Replace this process with the DICOM listener (C-STORE SCP + C-ECHO).

    Like ``worker``, it runs as ``python -m workers.listener`` so the API package never imports
    the worker package.
    """
    argv = [sys.executable, "-m", "workers.listener"]
    for flag, value in (
        ("--host", args.host),
        ("--port", args.port),
        ("--ae-title", args.ae_title),
        ("--allowed-callers", args.allowed_callers),
    ):
        if value is not None:
            argv += [flag, str(value)]
    os.execv(sys.executable, argv)  # noqa: S606
    return 0  # pragma: no cover


def cmd_keys(args: argparse.Namespace) -> int:
    """Create, list or revoke API keys."""
    from rich.console import Console
    from rich.table import Table

    from app.auth.service import create_key, list_keys, revoke_key
    from app.db.records import Role
    from app.db.session import session_scope

    settings = get_settings()
    _prepare(settings)
    _migrate(settings)
    console = Console()
    with session_scope() as session:
        if args.action == "create":
            expires = (
                datetime.now(UTC) + timedelta(days=args.expires_days) if args.expires_days else None
            )
            record, token = create_key(
                session=session, name=args.name, role=Role(args.role), expires_at=expires
            )
            print(token)
            print(
                f"key {record.prefix} ({record.role}) created; it is shown only once",
                file=sys.stderr,
            )
            return 0
        if args.action == "revoke":
            record = revoke_key(session=session, prefix=args.prefix)
            print(f"revoked {record.prefix}")
            return 0
        table = Table("prefix", "name", "role", "created", "expires", "revoked")
        for r in list_keys(session=session):
            table.add_row(
                r.prefix,
                r.name,
                r.role,
                str(r.created_at)[:19],
                str(r.expires_at or "")[:19],
                str(r.revoked_at or "")[:19],
            )
        console.print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List registered models, or verify every manifest and ONNX checksum."""
    import json

    from pydantic import ValidationError
    from rich.console import Console
    from rich.table import Table

    from app.registry.manifest import Manifest
    from app.registry.service import load_registry, verify_model

    settings = get_settings()
    console = Console()
    if args.action == "verify":
        problems = 0
        for path in sorted(settings.models_dir.glob("*/*/manifest.json")):
            try:
                Manifest.model_validate(json.loads(path.read_text()))
            except (ValidationError, json.JSONDecodeError) as exc:
                console.print(f"[red]invalid[/red] {path.parent.name}: {exc}")
                problems += 1
        for model in load_registry(settings.models_dir).values():
            problem = verify_model(model)
            if problem:
                console.print(f"[red]bad[/red] {problem}")
                problems += 1
            else:
                console.print(f"[green]ok[/green] {model.manifest.key}")
        return 1 if problems else 0
    table = Table("name", "version", "task", "default", "saliency", "input")
    for model in load_registry(settings.models_dir).values():
        m = model.manifest
        table.add_row(
            m.name,
            m.version,
            m.task.value,
            str(m.default),
            ",".join(s.value for s in m.saliency.methods),
            "x".join(str(v) for v in m.preprocessing.size),
        )
    console.print(table)
    return 0


def cmd_demo_data(args: argparse.Namespace) -> int:
    """Write phantom CT series (with ground-truth masks beside them)."""
    from models.training.phantoms import write_demo_data

    folders = write_demo_data(Path(args.out), n=args.n, seed=args.seed)
    for folder in folders:
        print(folder)
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """Upgrade or downgrade the database schema."""
    from app.db.migrate import downgrade, upgrade

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if args.action == "upgrade":
        upgrade(settings.resolved_database_url, args.revision or "head")
    else:
        downgrade(settings.resolved_database_url, args.revision or "base")
    return 0


def cmd_scrub(args: argparse.Namespace) -> int:
    """Check blobs against rows: orphans (removed with --delete-orphans), missing or corrupt."""
    import json

    from rich.console import Console
    from rich.table import Table

    from app.db.session import session_scope
    from app.jobs.scrubber import scrub
    from app.storage import BlobStore

    settings = get_settings()
    _prepare(settings)
    with session_scope() as session:
        report = scrub(
            session=session,
            store=BlobStore(settings.blob_dir),
            grace_seconds=args.grace_seconds,
            delete_orphans=args.delete_orphans,
            verify=not args.no_verify,
        )
    if args.json:
        body = {
            "referenced": report.referenced,
            "blobs_on_disk": report.blobs_on_disk,
            "blobs_verified": report.blobs_verified,
            "bytes_verified": report.bytes_verified,
            "orphans": report.orphans,
            "young_unreferenced": report.young_unreferenced,
            "stale_temp_files": report.stale_temp_files,
            "deleted": report.deleted,
            "problems": [
                {
                    "key": p.key,
                    "problem": p.problem,
                    "rows": [
                        {"table": r.table, "id": r.row_id, "column": r.column} for r in p.refs
                    ],
                }
                for p in report.problems
            ],
            "seconds": report.seconds,
        }
        print(json.dumps(body, indent=2))
    else:
        console = Console()
        summary = Table("referenced", "on disk", "verified", "orphans", "temp", "deleted", "bad")
        summary.add_row(
            str(report.referenced),
            str(report.blobs_on_disk),
            f"{report.blobs_verified} ({report.bytes_verified / 1e6:.1f} MB)",
            str(len(report.orphans)),
            str(len(report.stale_temp_files)),
            str(report.deleted),
            str(len(report.problems)),
        )
        console.print(summary)
        if report.problems:
            problems = Table("problem", "blob", "rows")
            for p in report.problems:
                rows = ", ".join(f"{r.table}/{r.row_id}.{r.column}" for r in p.refs)
                problems.add_row(p.problem, p.key, rows)
            console.print(problems)
    return 0 if report.healthy else 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``medcad``."""
    parser = argparse.ArgumentParser(prog="medcad", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="API + embedded worker (runs migrations)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--no-worker", action="store_true")
    serve.add_argument(
        "--api-processes",
        type=int,
        default=0,
        metavar="N",
        help="API processes sharing the port (default MEDCAD_API_PROCESSES, 1)",
    )
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="a Celery worker")
    worker.add_argument("--concurrency", type=int, default=0)
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"])
    worker.add_argument("--no-sweeper", action="store_true")
    worker.set_defaults(func=cmd_worker)

    listener = sub.add_parser(
        "dicom-listener", help="DICOM C-STORE SCP and C-ECHO feeding the ingest (DIMSE)"
    )
    listener.add_argument("--host", default=None, help="bind address (MEDCAD_LISTENER_HOST)")
    listener.add_argument("--port", type=int, default=None, help="TCP port (default 11112)")
    listener.add_argument("--ae-title", default=None, help="our AE title (default MEDCAD)")
    listener.add_argument(
        "--allowed-callers", default=None, help="comma list of calling AE titles (default: any)"
    )
    listener.set_defaults(func=cmd_dicom_listener)

    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="action", required=True)
    create = keys_sub.add_parser("create")
    create.add_argument("--role", required=True, choices=["viewer", "uploader", "admin"])
    create.add_argument("--name", default="cli")
    create.add_argument("--expires-days", type=float, default=None)
    keys_sub.add_parser("list")
    revoke = keys_sub.add_parser("revoke")
    revoke.add_argument("prefix")
    keys.set_defaults(func=cmd_keys)

    models = sub.add_parser("models", help="registered models")
    models.add_argument("action", choices=["list", "verify"])
    models.set_defaults(func=cmd_models)

    demo = sub.add_parser("demo-data", help="write phantom CT series with ground truth")
    demo.add_argument("out")
    demo.add_argument("--n", type=int, default=3)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_data)

    db = sub.add_parser("db", help="database migrations")
    db.add_argument("action", choices=["upgrade", "downgrade"])
    db.add_argument("--revision", default=None)
    db.set_defaults(func=cmd_db)

    scrub = sub.add_parser("scrub", help="check blobs against rows: orphans, missing, corrupt")
    scrub.add_argument(
        "--grace-seconds",
        type=float,
        default=3600.0,
        help="leave unreferenced blobs younger than this (an upload may be about to commit)",
    )
    scrub.add_argument("--delete-orphans", action="store_true", help="remove old orphan blobs")
    scrub.add_argument("--no-verify", action="store_true", help="check existence, skip re-hashing")
    scrub.add_argument("--json", action="store_true", help="print the report as JSON")
    scrub.set_defaults(func=cmd_scrub)

    _optional_commands(sub)
    return parser


def _optional_commands(sub: Any) -> None:
    try:
        from app.submit import add_submit_parser
    except ImportError:
        pass
    else:
        add_submit_parser(sub)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``medcad`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
