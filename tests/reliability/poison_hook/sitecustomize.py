"""Test-only fault injectors for the fault scenarios; never on a production path.

Put on ``PYTHONPATH`` of a test process only. Two injectors, each off unless its variable is set:

``MEDCAD_TEST_POISON_KEYS`` (Q7, poison message)
    When the process opens a blob whose key is listed in that file, it ends at once with
    ``os._exit(137)`` — what an OOM kill or a segfaulting decoder does to a pool child,
    reproduced for one chosen input without touching medcad's code. A Python audit hook
    (PEP 578) sees the ``open`` of the blob before any byte is decoded.

``MEDCAD_TEST_CELERY_DEFAULT_REJECT`` (Q2, Celery's default)
    The worker's task runs with Celery's default ``reject_on_worker_lost=False`` instead of
    medcad's ``True``, to show what the job table and the sweeper do without it.

``MEDCAD_TEST_CRASH_FILE`` (S1 ingest crash points, S5 result-write crash points)
    The file, when it exists, names one crash point; the first process of this deployment that
    reaches it removes the file (so exactly one process crashes, once) and ends with
    ``os._exit(137)``. Points, each defined by state, not by timing:

    ``blob-temp-open``         a blob's temporary file was just created, not yet written
    ``blob-rename``            a blob's temporary file is written and fsynced, not yet renamed
    ``before-commit:<Record>`` a transaction that inserted a ``<Record>`` row is about to
                               commit (every blob it names is durable)
    ``after-commit:<Record>``  it committed; the after-commit work (sending the job id to the
                               queue) has not run
    ``after-publish:<Record>`` it committed and the after-commit work ran (the job id was sent);
                               the caller got no answer
"""

from __future__ import annotations

import os
import re
import sys
import threading

_KEY = re.compile(r"[0-9a-f]{64}")
_LIST = os.environ.get("MEDCAD_TEST_POISON_KEYS", "")
_CRASH = os.environ.get("MEDCAD_TEST_CRASH_FILE", "")
_cache: dict[str, object] = {"mtime": None, "keys": frozenset()}
_state = {"temp_opened": 0}  # the thread that just created a blob temp file


def _poison_keys() -> frozenset[str]:
    try:
        mtime = os.stat(_LIST).st_mtime_ns
    except OSError:
        return frozenset()
    if mtime != _cache["mtime"]:
        with open(_LIST, encoding="ascii") as handle:
            _cache["keys"] = frozenset(line.strip() for line in handle if line.strip())
        _cache["mtime"] = mtime
    keys = _cache["keys"]
    assert isinstance(keys, frozenset)
    return keys


def _armed() -> str:
    """The crash point named by the crash file ('' when none is armed)."""
    try:
        with open(_CRASH, encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return ""


def _crash_at(point: str) -> None:
    """End the process if ``point`` is armed, at most once per arming (the file is consumed)."""
    if _armed() != point:
        return
    try:
        os.unlink(_CRASH)  # atomic: of several processes reaching the point, one wins
    except FileNotFoundError:
        return
    os._exit(137)


def _blob_temp(path: object) -> bool:
    if not isinstance(path, str):
        return False
    head, name = os.path.split(path)
    return name.startswith("put-") and os.path.basename(head) == "tmp"


def _hook(event: str, args: tuple[object, ...]) -> None:
    if event == "open" and args and isinstance(args[0], str):
        if _LIST:
            name = os.path.basename(args[0])
            if len(name) == 64 and _KEY.fullmatch(name) and name in _poison_keys():
                os._exit(137)
        if _CRASH and _blob_temp(args[0]) and _armed() == "blob-temp-open":
            # audited before the file exists: crash at this thread's next step instead
            _state["temp_opened"] = threading.get_ident()
    elif (
        event == "open"
        and args
        and isinstance(args[0], int)
        and _state["temp_opened"] == threading.get_ident()
    ):
        # the temporary file exists now and is being opened for writing (os.fdopen)
        _state["temp_opened"] = 0
        _crash_at("blob-temp-open")
    elif event == "os.rename" and _CRASH and args and _blob_temp(args[0]):
        _crash_at("blob-rename")


def _install_transaction_points() -> None:
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    inserted = "medcad_test_inserted"
    state = {"late": False}

    def after_flush(session: Session, _context: object) -> None:
        session.info.setdefault(inserted, set()).update(type(o).__name__ for o in session.new)
        if not state["late"] and "app.queue_hooks" in sys.modules:
            # Registered once medcad's own after-commit listener (the one that sends job ids)
            # is in place, so that this one runs after it.
            state["late"] = True
            event.listen(Session, "after_commit", after_publish)

    def names(session: Session) -> set[str]:
        found = session.info.get(inserted, set())
        return found if isinstance(found, set) else set()

    def before_commit(session: Session) -> None:
        # rows added since the last flush are inserted by the commit's own flush
        pending = {type(o).__name__ for o in session.new}
        for name in names(session) | pending:
            _crash_at(f"before-commit:{name}")

    def after_commit(session: Session) -> None:
        for name in names(session):
            _crash_at(f"after-commit:{name}")

    def after_publish(session: Session) -> None:
        for name in names(session):
            _crash_at(f"after-publish:{name}")
        session.info.pop(inserted, None)

    def forget(session: Session) -> None:
        session.info.pop(inserted, None)

    event.listen(Session, "after_flush", after_flush)
    event.listen(Session, "before_commit", before_commit)
    event.listen(Session, "after_commit", after_commit, insert=True)  # before medcad's
    event.listen(Session, "after_rollback", forget)


if _LIST or _CRASH:
    sys.addaudithook(_hook)
if _CRASH:
    _install_transaction_points()
if os.environ.get("MEDCAD_TEST_CELERY_DEFAULT_REJECT"):
    from celery.signals import worker_ready

    def _celery_default(sender: object, **_kwargs: object) -> None:
        app = sender.app  # type: ignore[attr-defined]
        app.conf.task_reject_on_worker_lost = False
        app.tasks["medcad.run_job"].reject_on_worker_lost = False

    worker_ready.connect(_celery_default, weak=False)
