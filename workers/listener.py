"""DIMSE C-STORE SCP and C-ECHO (pynetdicom) feeding the one ingest path.

``medcad dicom-listener`` runs this module. A PACS or modality opens an association and sends
instances with C-STORE (PS3.4 Annex B); each one is checked from its header with the same
validation as every upload, and its bytes are written to a spool folder of the association and
fsynced *before* the success status goes back: a C-STORE success tells the sender it may forget
the instance. When the association ends (release, abort or a dropped connection) its spooled
instances are ingested together, so the instances of one series become one analysis job.

Spool folders left behind by a crash or by a database outage are ingested on start and by a
periodic sweep, so an acknowledged instance is never lost.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from app.api.ingest_guards import ingest_limits
from app.auth.service import record_audit
from app.db.records import InstanceRecord
from app.db.session import session_scope
from app.dicomweb import status as dicom_status
from app.errors import MedcadError
from app.registry.service import current_registry, resolve_models
from app.settings import Settings, get_settings
from app.storage import BlobStore
from app.studies.service import UploadedFile, ingest_files
from app.studies.validation import inspect_instance, supported_transfer_syntaxes

log = logging.getLogger(__name__)

SWEEP_SECONDS = 30.0
ORPHAN_AGE_SECONDS = 120.0  # a spool folder untouched this long has no live association


@dataclass
class _Association:
    """What one association has received so far."""

    folder: Path
    caller: str
    files: dict[str, list[Path]] = field(default_factory=lambda: defaultdict(list))


class StoreSCP:
    """The listener: pynetdicom AE, per-association spools, one ingest per ended association."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.spool_root = (settings.data_dir / "listener-spool").resolve()
        self._associations: dict[int, _Association] = {}
        self._pending: set[Path] = set()  # folders handed to the ingest thread
        self._lock = threading.Lock()
        # One ingest at a time: short transactions, no writer contention on SQLite.
        self._ingest = ThreadPoolExecutor(max_workers=1, thread_name_prefix="listener-ingest")
        self._server: Any = None
        self.ae = self._build_ae()

    def _build_ae(self) -> AE:
        ae = AE(ae_title=self.settings.listener_ae_title)
        syntaxes = sorted(supported_transfer_syntaxes())
        for context in AllStoragePresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, syntaxes)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if self.settings.allowed_callers:
            ae.require_calling_aet = self.settings.allowed_callers
        return ae

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Recover leftover spools, then listen (returns once the socket is bound)."""
        self.spool_root.mkdir(parents=True, exist_ok=True)
        self.sweep(min_age=0.0)
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_CONN_CLOSE, self._on_close),
        ]
        self._server = self.ae.start_server(
            (self.settings.listener_host, self.settings.listener_port),
            block=False,
            evt_handlers=handlers,
        )
        log.info(
            "dicom listener started",
            extra={
                "host": self.settings.listener_host,
                "port": self.settings.listener_port,
                "ae_title": self.settings.listener_ae_title,
                "allowed_callers": ",".join(self.settings.allowed_callers) or "*",
            },
        )

    def stop(self) -> None:
        """Stop listening, end open associations, and finish every pending ingest."""
        self.ae.shutdown()
        self._ingest.shutdown(wait=True)
        log.info("dicom listener stopped")

    def sweep(self, min_age: float = ORPHAN_AGE_SECONDS) -> None:
        """Ingest spool folders that no live association owns (crash or failed ingest)."""
        with self._lock:
            busy = {a.folder for a in self._associations.values()} | self._pending
        now = time.time()
        for folder in sorted(self.spool_root.glob("*")):
            if folder in busy or not folder.is_dir():
                continue
            if now - folder.stat().st_mtime < min_age:
                continue
            files: dict[str, list[Path]] = defaultdict(list)
            for path in sorted(folder.glob("*/*.dcm")):
                files[path.parent.name].append(path)
            caller = (folder / "caller").read_text() if (folder / "caller").exists() else "?"
            self._submit(_Association(folder, caller, files))

    def _submit(self, association: _Association) -> None:
        with self._lock:
            self._pending.add(association.folder)
        self._ingest.submit(self._ingest_spool, association)

    # -- event handlers (association threads) ------------------------------------------

    def _association(self, event: Any) -> _Association:
        key = id(event.assoc)
        with self._lock:
            current = self._associations.get(key)
            if current is None:
                requestor = event.assoc.requestor
                caller = f"{str(requestor.ae_title).strip()}@{requestor.address}"
                folder = self.spool_root / f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex}"
                folder.mkdir(parents=True)
                (folder / "caller").write_text(caller)
                current = _Association(folder, caller)
                self._associations[key] = current
            return current

    def _on_store(self, event: Any) -> int:
        """Validate from the header, spool durably, then answer (PS3.4 B.2.3 statuses)."""
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception:  # an undecodable dataset stream: nothing we could store
            return dicom_status.CANNOT_UNDERSTAND
        try:
            inspected = inspect_instance(data, limits=ingest_limits(self.settings))
        except MedcadError as exc:
            log.info("c-store rejected", extra={"error": exc.code})
            return dicom_status.failure_status(exc.code)
        if self._conflicts(inspected.sop_instance_uid, inspected.normalized_bytes):
            return dicom_status.DUPLICATE_SOP_INSTANCE
        association = self._association(event)
        series_folder = (
            association.folder
            / hashlib.sha1(  # a folder name, not security
                inspected.series_instance_uid.encode(), usedforsecurity=False
            ).hexdigest()[:16]
        )
        series_folder.mkdir(exist_ok=True)
        path = series_folder / f"{len(association.files[series_folder.name]):06d}.dcm"
        try:
            _write_durably(path, data)
        except OSError:
            log.error("spool write failed")
            return dicom_status.OUT_OF_RESOURCES
        association.files[series_folder.name].append(path)
        return dicom_status.SUCCESS

    def _conflicts(self, sop_instance_uid: str, data: bytes) -> bool:
        """Same SOP Instance UID already stored with other bytes (the ingest would refuse it)."""
        try:
            with session_scope() as session:
                stored = session.scalar(
                    select(InstanceRecord.blob_sha256).where(
                        InstanceRecord.sop_instance_uid == sop_instance_uid
                    )
                )
        except Exception:  # database down: spool anyway, the ingest decides later
            return False
        return stored is not None and stored != hashlib.sha256(data).hexdigest()

    def _on_close(self, event: Any) -> None:
        """The association ended however it ended: ingest what it delivered."""
        with self._lock:
            association = self._associations.pop(id(event.assoc), None)
        if association is not None:
            self._submit(association)

    # -- ingest (the single ingest thread) -------------------------------------------------

    def _ingest_spool(self, association: _Association) -> None:
        try:
            if association.files:
                jobs = self._ingest_files(association)
                log.info("association ingested", extra={"jobs": jobs})
            shutil.rmtree(association.folder, ignore_errors=True)
        except Exception as exc:  # keep the spool: the sweep retries it
            log.error(
                "listener ingest failed; spool kept", extra={"error_type": type(exc).__name__}
            )
        finally:
            with self._lock:
                self._pending.discard(association.folder)

    def _ingest_files(self, association: _Association) -> int:
        names = [n.strip() for n in self.settings.listener_models.split(",") if n.strip()]
        models = resolve_models(current_registry(self.settings.models_dir), names or None)
        store = BlobStore(self.settings.blob_dir)
        limits = ingest_limits(self.settings)
        created = 0
        with session_scope() as session:
            # One ingest call per series: the same jobs as one call for the whole association,
            # with only one series' bytes in memory at a time.
            for paths in association.files.values():
                files = [UploadedFile(p.name, p.read_bytes()) for p in paths]
                result = ingest_files(
                    session=session,
                    store=store,
                    files=files,
                    models=models,
                    principal=None,
                    limits=limits,
                )
                for job in result.jobs:
                    record_audit(
                        session=session,
                        principal=None,
                        action="upload",
                        resource=f"job/{job.id}",
                        client=association.caller[:64],
                        series_instance_uid=job.series_instance_uid,
                        detail="C-STORE",
                    )
                created += len(result.jobs)
                for outcome in result.rejected:
                    log.info("spooled instance rejected", extra={"error": outcome.error})
        return created


def _write_durably(path: Path, data: bytes) -> None:
    with path.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="medcad dicom-listener", description="C-STORE SCP feeding medcad's ingest"
    )
    parser.add_argument("--host", default=None, help="bind address (default from settings)")
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--ae-title", default=None)
    parser.add_argument(
        "--allowed-callers", default=None, help="comma list of calling AE titles (default: any)"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the listener until SIGTERM or SIGINT."""
    from app.db.migrate import upgrade
    from app.logging_setup import configure_logging

    args = _parse_args(argv)
    overrides: dict[str, Any] = {
        key: value
        for key, value in {
            "listener_host": args.host,
            "listener_port": args.port,
            "listener_ae_title": args.ae_title,
            "listener_allowed_callers": args.allowed_callers,
        }.items()
        if value is not None
    }
    settings = get_settings().model_copy(update=overrides)
    configure_logging(settings.log_level, settings.log_json)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.resolved_database_url)
    scp = StoreSCP(settings)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    scp.start()
    print(f"medcad dicom-listener ready on {settings.listener_port}", flush=True)
    while not stop.wait(SWEEP_SECONDS):
        scp.sweep()
    scp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
