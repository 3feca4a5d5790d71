"""``medcad submit``: push folders of DICOM files to a medcad server, resumably.

The run has four steps:

1. **Scan.** Walk every PATH (folders, single files, ``.zip`` files sent as they are), hash each
   file (sha256) and read its DICOM header only (``stop_before_pixels``) to learn its study,
   series and SOP Instance UIDs. Files without the PS3.10 ``DICM`` prefix are reported as
   skipped, as are DICOMDIR files (a directory of the medium, PS3.10 §7.2, not an image).
2. **Plan.** Group the files by series, leave out every file the state file records as already
   stored (same sha256), and split what is left into batches of at most ``--batch-mb``.
3. **Upload.** One request per batch; series run in parallel (``--concurrency`` threads) while the
   batches of one series go one after another, so the job the server creates for the last batch
   covers the whole series. Transient failures are retried by :class:`app.client.Client`.
4. **Wait / download** (``--wait``, ``--out``): poll the jobs, download each result tree as soon
   as its job succeeds, then write ``<out>/summary.csv``.

The state file (JSON, replaced atomically before and after every batch) records per file its
sha256, outcome and how many times it was sent, and per series the job ids. Re-running the
same command after an interruption sends nothing already stored and still waits for, and
downloads, the jobs the first run started.

Only UIDs and file names are ever printed; the header fields read are the UIDs, never the
patient's name or ID.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import sys
import threading
import zipfile
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from app.client import (
    Client,
    ClientError,
    Job,
    JobWaitTimeout,
    Results,
    UploadResult,
    write_atomic,
)

STATE_NAME = ".medcad-submit.json"
STATE_VERSION = 1
#: Outcomes that mean "the server has these bytes": never send the file again.
DONE_OUTCOMES = frozenset({"stored", "duplicate"})
#: Media Storage Directory Storage SOP Class (PS3.4 Annex B.5): a DICOMDIR, not an image.
DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"
UNKNOWN_SERIES = "unknown-series"

_HEADER_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
_HASH_CHUNK = 1 << 20

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------------------------
# Scan
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalFile:
    """One file to send: a DICOM instance, or a zip sent as it is."""

    path: Path  # absolute
    display: str  # name relative to the PATH argument it was found under (for messages)
    size: int
    sha256: str
    kind: str  # "dicom" | "zip"
    study_instance_uid: str | None = None
    series_instance_uid: str | None = None
    sop_instance_uid: str | None = None

    @property
    def key(self) -> str:
        """The file's key in the state file."""
        return str(self.path)


@dataclass(frozen=True)
class SkippedFile:
    display: str
    reason: str


@dataclass
class ScanResult:
    files: list[LocalFile] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


def iter_paths(
    roots: Sequence[Path], *, exclude: Collection[Path] = ()
) -> Iterator[tuple[Path, str]]:
    """Every regular file under ``roots`` as ``(absolute path, display name)``, sorted, once.

    ``exclude`` holds files or folders never to send (the state file, the output folder).
    Symbolic links to folders are not followed, so a link loop cannot make the walk endless.
    """
    excluded = {p.resolve() for p in exclude}
    seen: set[Path] = set()

    def wanted(path: Path) -> bool:
        return (
            path not in seen
            and path not in excluded
            and not any(parent in excluded for parent in path.parents)
            and not path.name.startswith(f"{STATE_NAME}.")
        )  # our own temporary files

    for root in roots:
        top = root.resolve()
        if top.is_file():
            if wanted(top):
                seen.add(top)
                yield top, root.name
            continue
        for folder, dirs, names in os.walk(top):
            dirs.sort()
            for name in sorted(names):
                path = Path(folder, name)
                if path.is_file() and wanted(path):
                    seen.add(path)
                    yield path, str(Path(root.name, path.relative_to(top)))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def scan_file(path: Path, display: str) -> LocalFile | SkippedFile:
    """Classify one file and read the UIDs that group it (no pixel data, no patient fields)."""
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
        size = path.stat().st_size
    except OSError as exc:
        return SkippedFile(display, f"unreadable: {exc.strerror or exc}")
    if head[128:132] != b"DICM":
        if zipfile.is_zipfile(path):
            return LocalFile(path, display, size, sha256_of(path), "zip")
        return SkippedFile(display, "not a DICOM file (no 'DICM' prefix, PS3.10 §7.1)")
    uids: dict[str, str | None] = dict.fromkeys(_HEADER_TAGS)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == DICOMDIR_SOP_CLASS:
            return SkippedFile(display, "DICOMDIR (an index of the medium, not an image)")
        for tag in _HEADER_TAGS:
            value = ds.get(tag)
            uids[tag] = str(value) if value else None
    except (InvalidDicomError, OSError, ValueError, EOFError, KeyError):
        # It claims to be DICOM: send it anyway and let the server give the precise reason.
        pass
    return LocalFile(
        path,
        display,
        size,
        sha256_of(path),
        "dicom",
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
    )


def scan(
    roots: Sequence[Path],
    *,
    exclude: Collection[Path] = (),
    on_file: Callable[[], None] | None = None,
) -> ScanResult:
    result = ScanResult()
    for path, display in iter_paths(roots, exclude=exclude):
        item = scan_file(path, display)
        if isinstance(item, LocalFile):
            result.files.append(item)
        else:
            result.skipped.append(item)
        if on_file:
            on_file()
    return result


# --------------------------------------------------------------------------------------------
# State file
# --------------------------------------------------------------------------------------------


class StateMismatch(ValueError):
    """The state file was written for another server or another choice of models."""


@dataclass
class FileRecord:
    """What is known about one local file. ``outcome``: pending (sent, no answer yet), stored,
    duplicate, rejected (the server refused it) or failed (the request failed)."""

    sha256: str
    size: int
    outcome: str = "new"
    sent: int = 0
    error: str | None = None
    detail: str | None = None
    series_uids: list[str] = field(default_factory=list)
    # zips only: per-series member outcome counts, and the members the server rejected
    member_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    members_rejected: list[dict[str, str]] = field(default_factory=list)


@dataclass
class SeriesRecord:
    """Jobs of one series. ``final_job_ids`` are the jobs covering the whole series (those of
    the last batch that created any); ``needs_lookup`` is set when the last batch created none
    (all duplicates), so the newest job of the series must be found on the server."""

    study_instance_uid: str | None = None
    job_ids: list[str] = field(default_factory=list)
    final_job_ids: list[str] = field(default_factory=list)
    needs_lookup: bool = False


@dataclass
class SubmitState:
    server: str
    models: list[str] | None = None
    files: dict[str, FileRecord] = field(default_factory=dict)
    series: dict[str, SeriesRecord] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SubmitState:
        if data.get("version") != STATE_VERSION:
            raise StateMismatch(
                f"state file version {data.get('version')!r} is not {STATE_VERSION}"
            )
        return cls(
            server=str(data["server"]),
            models=data.get("models"),
            files={k: FileRecord(**v) for k, v in data.get("files", {}).items()},
            series={k: SeriesRecord(**v) for k, v in data.get("series", {}).items()},
        )

    def stored_hashes(self) -> set[str]:
        return {r.sha256 for r in self.files.values() if r.outcome in DONE_OUTCOMES}


def load_state(path: Path, *, server: str, models: list[str] | None) -> SubmitState:
    """The state at ``path`` (a fresh one if absent); refuses a state of another run."""
    if not path.exists():
        return SubmitState(server=server, models=models)
    state = SubmitState.from_json(json.loads(path.read_text()))
    if state.server.rstrip("/") != server.rstrip("/"):
        raise StateMismatch(
            f"{path.name} records uploads to {state.server}, not {server}; "
            "choose another file with --state"
        )
    if sorted(state.models or []) != sorted(models or []):
        raise StateMismatch(
            f"{path.name} records a run with models {state.models or 'default'}"
            f", not {models or 'default'}; choose another file with --state"
        )
    return state


def save_state(path: Path, state: SubmitState) -> None:
    write_atomic(path, json.dumps(state.to_json(), indent=1, sort_keys=True).encode())


# --------------------------------------------------------------------------------------------
# Plan: pure functions of the scan and the state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadGroup:
    """One series (or one zip) and the batches still to send for it, in order."""

    key: str
    study_instance_uid: str | None
    series_instance_uid: str | None
    batches: tuple[tuple[LocalFile, ...], ...]
    done: tuple[LocalFile, ...]


def is_done(item: LocalFile, state: SubmitState, stored: Collection[str]) -> bool:
    """True when the server already holds these exact bytes (recorded under any path)."""
    record = state.files.get(item.key)
    if record is not None and record.sha256 == item.sha256 and record.outcome in DONE_OUTCOMES:
        return True
    return item.sha256 in stored


def split_batches(files: Sequence[LocalFile], max_bytes: int) -> list[list[LocalFile]]:
    """Consecutive batches of at most ``max_bytes`` each; a bigger file travels alone."""
    batches: list[list[LocalFile]] = []
    current: list[LocalFile] = []
    size = 0
    for item in files:
        if current and size + item.size > max_bytes:
            batches.append(current)
            current, size = [], 0
        current.append(item)
        size += item.size
    if current:
        batches.append(current)
    return batches


def group_key(item: LocalFile) -> str:
    if item.kind == "zip":
        return f"zip:{item.key}"
    return item.series_instance_uid or UNKNOWN_SERIES


def plan_uploads(
    files: Sequence[LocalFile], state: SubmitState, *, max_batch_bytes: int
) -> list[UploadGroup]:
    """Group ``files`` by series and batch what the server does not hold yet.

    Groups whose files are all stored are kept (with no batches): their jobs are still to be
    waited for and downloaded. Groups come in first-seen order; files in display order.
    """
    grouped: dict[str, list[LocalFile]] = {}
    for item in files:
        grouped.setdefault(group_key(item), []).append(item)
    stored = state.stored_hashes()
    groups = []
    for key, members in grouped.items():
        members.sort(key=lambda f: f.display)
        todo = [f for f in members if not is_done(f, state, stored)]
        done = tuple(f for f in members if f not in todo)
        first = members[0]
        groups.append(
            UploadGroup(
                key=key,
                study_instance_uid=first.study_instance_uid,
                series_instance_uid=first.series_instance_uid if first.kind == "dicom" else None,
                batches=tuple(tuple(b) for b in split_batches(todo, max_batch_bytes)),
                done=done,
            )
        )
    return groups


def upload_names(batch: Sequence[LocalFile]) -> list[str]:
    """Names the server sees: the base name, made unique within the request so each answer
    can be matched to its file (two folders often both hold ``IM0001``)."""
    names: list[str] = []
    taken: set[str] = set()
    for index, item in enumerate(batch):
        name = item.path.name
        if name in taken:
            name = f"{index + 1}-{name}"
        taken.add(name)
        names.append(name)
    return names


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


@dataclass
class SubmitOptions:
    paths: list[Path]
    server: str
    api_key: str | None
    models: list[str] | None
    concurrency: int
    batch_bytes: int
    wait: bool
    out: Path | None
    state_path: Path
    callback_url: str | None
    timeout: float
    retries: int
    poll: float
    wait_timeout: float | None


@dataclass
class Failure:
    kind: str  # "file" | "series" | "job" | "download"
    name: str  # file name or UID, never patient data
    code: str
    detail: str


@dataclass
class SeriesSummary:
    study_instance_uid: str | None
    series_instance_uid: str
    job_id: str | None
    status: str
    counts: Counter[str]
    results: Results | None = None
    results_dir: Path | None = None
    uncertain: bool | None = None
    error: str = ""


class _AmountColumn(ProgressColumn):
    """``12.3/40.0 MB`` for byte counts, ``3/20`` for everything else."""

    def __init__(self) -> None:
        super().__init__()
        self._bytes, self._count = DownloadColumn(), MofNCompleteColumn()

    def render(self, task: Task) -> Text:
        column = self._bytes if task.fields.get("unit") == "bytes" else self._count
        return column.render(task)


class _SpeedColumn(ProgressColumn):
    def __init__(self) -> None:
        super().__init__()
        self._speed = TransferSpeedColumn()

    def render(self, task: Task) -> Text:
        return self._speed.render(task) if task.fields.get("unit") == "bytes" else Text("")


class _Ui:
    """Progress bars on a terminal; silence otherwise (logs, CI, pipes)."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("{task.description:<10}"),
            BarColumn(),
            _AmountColumn(),
            _SpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            disable=not console.is_terminal,
            transient=False,
        )
        self._tasks: dict[str, TaskID] = {}

    def add(self, name: str, total: float | None, *, unit: str = "") -> None:
        if total == 0:
            return  # nothing to show (e.g. nothing left to upload on a resumed run)
        self._tasks[name] = self.progress.add_task(name, total=total, unit=unit)

    def complete(self, name: str) -> None:
        """Give a task of unknown length its final total (so it shows as done)."""
        if name in self._tasks:
            task = self.progress.tasks[self._tasks[name]]
            self.progress.update(self._tasks[name], total=task.completed)

    def advance(self, name: str, amount: float = 1) -> None:
        if name in self._tasks:
            self.progress.advance(self._tasks[name], amount)


class Submission:
    """One ``medcad submit`` run: upload, then optionally wait and download."""

    def __init__(
        self, options: SubmitOptions, client: Client, state: SubmitState, console: Console
    ) -> None:
        self.options = options
        self.client = client
        self.state = state
        self.console = console
        self.ui = _Ui(console)
        self._lock = threading.Lock()
        self.failures: list[Failure] = []
        self.skipped: list[SkippedFile] = []
        self.files: list[LocalFile] = []

    # -- state bookkeeping (call with the lock held) ---------------------------------------

    def _record(self, item: LocalFile) -> FileRecord:
        record = self.state.files.get(item.key)
        if record is None or record.sha256 != item.sha256:
            record = FileRecord(sha256=item.sha256, size=item.size)
            if item.series_instance_uid:
                record.series_uids = [item.series_instance_uid]
            self.state.files[item.key] = record
        return record

    def _save(self) -> None:
        save_state(self.options.state_path, self.state)

    # -- upload ----------------------------------------------------------------------------

    def upload(self, groups: Sequence[UploadGroup]) -> None:
        with self._lock:
            for group in groups:
                for item in group.done:  # same bytes stored under another path count as sent
                    record = self._record(item)
                    if record.outcome not in DONE_OUTCOMES:
                        record.outcome, record.detail = "duplicate", "identical bytes stored before"
            self._save()
        todo = [b for g in groups for b in g.batches]
        self.ui.add("files", sum(len(b) for b in todo))
        self.ui.add("bytes", sum(f.size for b in todo for f in b), unit="bytes")
        with ThreadPoolExecutor(max_workers=self.options.concurrency) as pool:
            futures = [pool.submit(self._upload_group, g) for g in groups]
            try:
                for future in futures:
                    future.result()
            except BaseException:
                for future in futures:
                    future.cancel()
                raise

    def _upload_group(self, group: UploadGroup) -> None:
        for batch in group.batches:
            self._send(list(batch))
        for uid in self._series_needing_lookup(group):
            self._look_up_job(uid)

    def _series_needing_lookup(self, group: UploadGroup) -> list[str]:
        """Series of ``group`` that the server holds but whose covering job is unknown."""
        with self._lock:
            held: list[str] = []
            for item in (*group.done, *(f for b in group.batches for f in b)):
                record = self.state.files.get(item.key)
                if record is not None and record.outcome in DONE_OUTCOMES:
                    held.extend(record.series_uids)
            lookups = []
            for uid in dict.fromkeys(held):
                series = self.state.series.get(uid)
                if series is None or series.needs_lookup or not series.final_job_ids:
                    lookups.append(uid)
            return lookups

    def _send(self, batch: list[LocalFile]) -> None:
        names = upload_names(batch)
        with self._lock:
            for item in batch:
                record = self._record(item)
                record.outcome, record.error, record.detail = "pending", None, None
                record.sent += 1
            self._save()
        sent = 0

        def progress(n: int) -> None:
            nonlocal sent
            sent += n
            self.ui.advance("bytes", n)

        try:
            result = self.client.upload(
                list(zip(names, (f.path for f in batch), strict=True)),
                models=self.options.models,
                callback_url=self.options.callback_url,
                progress=progress,
            )
        except ClientError as exc:
            if exc.status == 413 and len(batch) > 1:
                # Over the server's upload limit: halve the batch until each part fits.
                self.ui.advance("bytes", -sent)
                half = len(batch) // 2
                self._send(batch[:half])
                self._send(batch[half:])
                return
            outcome = "rejected" if exc.status == 413 else "failed"
            self._mark(batch, outcome, exc.code, exc.detail)
            return
        except OSError as exc:  # a file vanished or became unreadable since the scan
            self._mark(batch, "failed", "unreadable", exc.strerror or str(exc))
            return
        with self._lock:
            self._apply(batch, names, result)
            self._save()
        self.ui.advance("files", len(batch))

    def _mark(self, batch: list[LocalFile], outcome: str, code: str, detail: str) -> None:
        with self._lock:
            for item in batch:
                record = self._record(item)
                record.outcome, record.error, record.detail = outcome, code, detail
            self._save()
        self.ui.advance("files", len(batch))

    def _apply(self, batch: list[LocalFile], names: list[str], result: UploadResult) -> None:
        """Record the server's answer for ``batch`` (lock held)."""
        if len(batch) == 1 and batch[0].kind == "zip":
            self._apply_zip(batch[0], result)
        else:
            by_name = {o.filename: o for o in result.files}
            by_sop = {o.sop_instance_uid: o for o in result.files if o.sop_instance_uid}
            positional = len(result.files) == len(batch)
            for index, (item, name) in enumerate(zip(batch, names, strict=True)):
                outcome = (
                    by_name.get(name)
                    or by_sop.get(item.sop_instance_uid or "")
                    or (result.files[index] if positional else None)
                )
                record = self._record(item)
                if outcome is None:
                    record.outcome, record.error = "failed", "no_outcome"
                    record.detail = "the server's answer did not mention this file"
                    continue
                record.outcome, record.error, record.detail = (
                    outcome.outcome,
                    outcome.error,
                    outcome.detail,
                )
                uid = outcome.series_instance_uid or item.series_instance_uid
                record.series_uids = [uid] if uid else []
        self._apply_jobs(batch, result)

    def _apply_zip(self, item: LocalFile, result: UploadResult) -> None:
        record = self._record(item)
        counts: dict[str, Counter[str]] = {}
        for o in result.files:
            counts.setdefault(o.series_instance_uid or UNKNOWN_SERIES, Counter())[o.outcome] += 1
        record.member_counts = {uid: dict(c) for uid, c in counts.items()}
        record.series_uids = [uid for uid in counts if uid != UNKNOWN_SERIES]
        record.members_rejected = [
            {"filename": o.filename, "error": o.error or "rejected", "detail": o.detail or ""}
            for o in result.files
            if o.outcome == "rejected"
        ]
        outcomes = {o.outcome for o in result.files}
        if record.members_rejected or not outcomes:
            record.outcome = "rejected"
            record.error = "rejected" if outcomes <= {"rejected"} else "partly_rejected"
            record.detail = (
                f"{len(record.members_rejected)} of {len(result.files)} members rejected"
            )
        else:
            record.outcome = "stored" if "stored" in outcomes else "duplicate"
            record.error = record.detail = None

    def _apply_jobs(self, batch: list[LocalFile], result: UploadResult) -> None:
        new_jobs: dict[str, list[str]] = {}
        fallback = batch[0].series_instance_uid
        for job in result.jobs:
            uid = job.series_instance_uid or fallback
            if uid:
                new_jobs.setdefault(uid, []).append(job.id)
        touched: set[str] = set()
        for item in batch:
            record = self.state.files[item.key]
            if record.member_counts:
                touched.update(
                    uid
                    for uid, c in record.member_counts.items()
                    if uid != UNKNOWN_SERIES and (c.get("stored") or c.get("duplicate"))
                )
            elif record.outcome in DONE_OUTCOMES:
                touched.update(record.series_uids)
        for uid in touched | new_jobs.keys():
            series = self.state.series.setdefault(uid, SeriesRecord())
            if series.study_instance_uid is None:
                series.study_instance_uid = next(
                    (f.study_instance_uid for f in batch if f.series_instance_uid == uid), None
                )
            if uid in new_jobs:
                series.job_ids.extend(new_jobs[uid])
                series.final_job_ids = new_jobs[uid]
                series.needs_lookup = False
            else:
                series.needs_lookup = True

    def _look_up_job(self, uid: str) -> None:
        """Adopt the newest job of a series whose last upload created none (all duplicates:
        an earlier run's answer was lost, or the files were sent before by someone else)."""
        wanted = {m.split(":")[0] for m in self.options.models or []}
        found: Job | None = None
        try:
            for job in self.client.jobs(series_instance_uid=uid, page_size=20):
                if wanted <= {m.split(":")[0] for m in job.models}:
                    found = job
                    break
        except ClientError as exc:
            with self._lock:
                self.failures.append(Failure("series", uid, exc.code, exc.detail))
            return
        with self._lock:
            series = self.state.series.setdefault(uid, SeriesRecord())
            if found is not None:
                series.final_job_ids = [found.id]
                if found.id not in series.job_ids:
                    series.job_ids.append(found.id)
                series.needs_lookup = False
                if series.study_instance_uid is None:
                    series.study_instance_uid = found.study_instance_uid
            self._save()

    # -- wait and download -----------------------------------------------------------------

    def series_uids(self) -> list[str]:
        """Series this run is about: from the local headers, and from the server's answers for
        zips and for files whose header had no Series Instance UID."""
        uids: list[str] = []
        for item in self.files:
            record = self.state.files.get(item.key)
            if record is not None and record.sha256 == item.sha256:
                uids.extend(record.series_uids)
            elif item.series_instance_uid:
                uids.append(item.series_instance_uid)
        return list(dict.fromkeys(uids))

    def finish(self) -> list[SeriesSummary]:
        """Wait for the jobs (if asked), download results (if asked); one row per series job
        (a series without a job gets one row saying why)."""
        counts = self._counts()
        rows: list[SeriesSummary] = []
        for uid in self.series_uids():
            record = self.state.series.get(uid) or SeriesRecord()
            held = counts[uid]["stored"] + counts[uid]["duplicate"]
            if not record.final_job_ids:
                status, error = (
                    ("no_job", "the server reported no job for this series")
                    if held
                    else ("not_uploaded", "no file of the series was stored")
                )
                rows.append(
                    SeriesSummary(
                        record.study_instance_uid, uid, None, status, counts[uid], error=error
                    )
                )
                continue
            status = "queued" if self.options.wait else "submitted"
            rows.extend(
                SeriesSummary(record.study_instance_uid, uid, job_id, status, counts[uid])
                for job_id in record.final_job_ids
            )
        if self.options.wait:
            self._apply_final(rows, self._wait_and_download(rows))
        return rows

    @staticmethod
    def _apply_final(rows: list[SeriesSummary], final: dict[str, Job]) -> None:
        for row in rows:
            job = final.get(row.job_id or "")
            if job is None:
                continue
            row.status, row.uncertain = job.status, job.uncertain
            row.study_instance_uid = row.study_instance_uid or job.study_instance_uid
            if job.error is not None:
                row.error = f"{job.error.code}: {job.error.detail}"

    def _counts(self) -> dict[str, Counter[str]]:
        """Per series: how many of this run's files (or zip members) ended how."""
        counts: dict[str, Counter[str]] = {}
        for item in self.files:
            record = self.state.files.get(item.key)
            if record is None:
                continue
            if record.member_counts:
                for uid, member in record.member_counts.items():
                    counts.setdefault(uid, Counter()).update(member)
            else:
                for uid in record.series_uids:
                    counts.setdefault(uid, Counter())[record.outcome] += 1
        return counts

    def _wait_and_download(self, rows: list[SeriesSummary]) -> dict[str, Job]:
        by_job = {r.job_id: r for r in rows if r.job_id}
        self.ui.add("jobs", len(by_job))
        if self.options.out:
            self.ui.add("results", len(by_job))
        downloads: list[Future[None]] = []
        pool = ThreadPoolExecutor(max_workers=self.options.concurrency)

        def changed(job: Job) -> None:
            if not job.done:
                return
            self.ui.advance("jobs")
            if job.status == "succeeded" and self.options.out:
                downloads.append(pool.submit(self._download, by_job[job.id]))
            elif self.options.out:
                self.ui.advance("results")

        final: dict[str, Job] = {}
        try:
            final = self.client.wait(
                list(by_job),
                timeout=self.options.wait_timeout,
                poll=self.options.poll,
                on_change=changed,
            )
        except JobWaitTimeout as exc:
            final = exc.jobs
            for job_id in exc.pending:
                self.failures.append(
                    Failure("job", job_id, "timeout", "still not finished when the wait timed out")
                )
        except ClientError as exc:
            self.failures.append(Failure("job", "-", exc.code, exc.detail))
        finally:
            wait(downloads)
            pool.shutdown()
        return final

    def _download(self, row: SeriesSummary) -> None:
        assert row.job_id is not None and self.options.out is not None
        name = (
            "results.json"
            if len(self.state.series[row.series_instance_uid].final_job_ids) == 1
            else f"results-{row.job_id}.json"
        )
        try:
            tree = self.client.download_results(row.job_id, self.options.out, results_name=name)
        except ClientError as exc:
            with self._lock:
                self.failures.append(
                    Failure("download", row.series_instance_uid, exc.code, exc.detail)
                )
        except OSError as exc:
            with self._lock:
                self.failures.append(
                    Failure("download", row.series_instance_uid, "os_error", str(exc))
                )
        else:
            row.results, row.results_dir = tree.results, tree.root
        finally:
            self.ui.advance("results")

    # -- report ----------------------------------------------------------------------------

    def file_failures(self) -> list[Failure]:
        failures: list[Failure] = []
        for item in self.files:
            record = self.state.files.get(item.key)
            if record is None or record.outcome in DONE_OUTCOMES:
                continue
            if record.members_rejected:
                failures.extend(
                    Failure("file", f"{item.display}:{m['filename']}", m["error"], m["detail"])
                    for m in record.members_rejected
                )
                if record.error == "partly_rejected":
                    continue
            failures.append(
                Failure("file", item.display, record.error or record.outcome, record.detail or "")
            )
        return failures


# --------------------------------------------------------------------------------------------
# Summary outputs
# --------------------------------------------------------------------------------------------

SUMMARY_FIELDS = [
    "study_instance_uid",
    "series_instance_uid",
    "job_id",
    "status",
    "files",
    "stored",
    "duplicates",
    "rejected",
    "max_probability",
    "positive",
    "uncertain",
    "findings",
    "results_dir",
    "error",
]


def findings_summary(results: Results | None) -> dict[str, str]:
    """Series-level findings in one line, the highest probability and whether any is positive
    (slice-level findings are used only when the job produced no series-level one)."""
    if results is None:
        return {"max_probability": "", "positive": "", "findings": ""}
    findings = [f for f in results.findings if f.level == "series"] or results.findings
    probs = [f.probability for f in findings if f.probability is not None]
    text = ";".join(
        f"{f.model}:{f.label}={f.probability:.3f}"
        for f in findings
        if f.probability is not None and f.level == "series"
    )
    positive = [f.positive for f in findings if f.positive is not None]
    return {
        "max_probability": f"{max(probs):.4f}" if probs else "",
        "positive": str(any(positive)).lower() if positive else "",
        "findings": text,
    }


def write_summary_csv(path: Path, rows: Iterable[SeriesSummary], out_dir: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=SUMMARY_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {
                "study_instance_uid": row.study_instance_uid or "",
                "series_instance_uid": row.series_instance_uid,
                "job_id": row.job_id or "",
                "status": row.status,
                "files": sum(row.counts.values()),
                "stored": row.counts["stored"],
                "duplicates": row.counts["duplicate"],
                "rejected": row.counts["rejected"],
                "uncertain": "" if row.uncertain is None else str(row.uncertain).lower(),
                "results_dir": str(row.results_dir.relative_to(out_dir)) if row.results_dir else "",
                "error": row.error,
                **findings_summary(row.results),
            }
        )
    write_atomic(path, buffer.getvalue().encode())


def _print_report(
    console: Console, sub: Submission, rows: list[SeriesSummary], failures: list[Failure]
) -> None:
    counts: Counter[str] = Counter()
    for item in sub.files:
        record = sub.state.files.get(item.key)
        counts[record.outcome if record else "new"] += 1
    files_line = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    job_counts = Counter(r.status for r in rows)
    jobs_line = ", ".join(f"{n} {k}" for k, n in sorted(job_counts.items())) or "none"
    console.print(f"files: {files_line or 'none'}; skipped (not DICOM): {len(sub.skipped)}")
    console.print(f"series: {len(rows)}; jobs: {jobs_line}")
    if sub.options.out:
        console.print(f"results: {sub.options.out} (summary.csv)")
    if not failures:
        return
    table = Table(title=f"{len(failures)} problem(s)", show_lines=False)
    for column in ("what", "file or UID", "code", "detail"):
        table.add_column(column, overflow="fold")
    for failure in failures[:200]:
        table.add_row(failure.kind, failure.name, failure.code, failure.detail)
    if len(failures) > 200:
        table.add_row("…", f"{len(failures) - 200} more", "", "")
    console.print(table)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, got {value}")
    return value


def add_submit_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``medcad submit`` (sets ``func=run_submit`` on the parsed namespace)."""
    parser = subparsers.add_parser(
        "submit",
        help="upload folders of DICOM files to a medcad server (resumable)",
        description="Upload DICOM files, folders and zips to a medcad server, one request per "
        "series, resuming an interrupted run from its state file.",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="DICOM files, folders (walked recursively) or .zip files",
    )
    parser.add_argument("--server", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key", help="API key with the uploader or admin role")
    parser.add_argument(
        "--models", help="comma-separated model names (default: the server's default models)"
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=4,
        help="series uploaded in parallel (default 4)",
    )
    parser.add_argument(
        "--batch-mb",
        type=_positive_float,
        default=64.0,
        help="largest request in MB; bigger series are split (default 64)",
    )
    parser.add_argument("--wait", action="store_true", help="wait until every job has ended")
    parser.add_argument("--out", type=Path, help="download every result here (implies --wait)")
    parser.add_argument(
        "--state", type=Path, help=f"state file (default: <first PATH>/{STATE_NAME})"
    )
    parser.add_argument("--callback-url", help="webhook the server calls when each job ends")
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=120.0,
        help="seconds per network operation (default 120)",
    )
    parser.add_argument(
        "--retries", type=int, default=5, help="retries of a transient failure (default 5)"
    )
    parser.add_argument(
        "--poll",
        type=_positive_float,
        default=2.0,
        help="seconds between job status checks (default 2)",
    )
    parser.add_argument(
        "--wait-timeout",
        type=_positive_float,
        help="give up waiting after this many seconds (default: no limit)",
    )
    parser.set_defaults(func=run_submit)


def options_from_args(args: argparse.Namespace) -> SubmitOptions:
    paths = [Path(p) for p in args.paths]
    first = paths[0]
    state_dir = first if first.is_dir() else first.parent
    models = [m.strip() for m in args.models.split(",") if m.strip()] if args.models else None
    return SubmitOptions(
        paths=paths,
        server=args.server,
        api_key=args.api_key,
        models=models or None,
        concurrency=args.concurrency,
        batch_bytes=int(args.batch_mb * 1024 * 1024),
        wait=args.wait or args.out is not None,
        out=args.out,
        state_path=args.state or state_dir / STATE_NAME,
        callback_url=args.callback_url,
        timeout=args.timeout,
        retries=max(0, args.retries),
        poll=args.poll,
        wait_timeout=args.wait_timeout,
    )


def _check_server(client: Client, options: SubmitOptions, console: Console) -> bool:
    """Fail fast on a wrong key, a read-only key or an unknown model name."""
    me = client.me()
    if me.role not in ("uploader", "admin"):
        console.print(
            f"[red]the API key {me.key_prefix}… has role {me.role!r}; uploading "
            "needs 'uploader' or 'admin'[/red]"
        )
        return False
    if options.models:
        known = {m.name for m in client.models()}
        unknown = sorted({m.split(":")[0] for m in options.models} - known)
        if unknown:
            console.print(
                f"[red]unknown model(s): {', '.join(unknown)}; the server has: "
                f"{', '.join(sorted(known))}[/red]"
            )
            return False
    return True


def run_submit(args: argparse.Namespace) -> int:
    """``medcad submit``; returns the exit code (0 only if everything was stored and, when
    waiting, every job succeeded and every result was downloaded)."""
    options = options_from_args(args)
    console = Console(stderr=True)
    missing = [str(p) for p in options.paths if not p.exists()]
    if missing:
        console.print(f"[red]no such file or folder: {', '.join(missing)}[/red]")
        return EXIT_USAGE
    try:
        state = load_state(options.state_path, server=options.server, models=options.models)
    except (StateMismatch, ValueError, KeyError, TypeError) as exc:
        console.print(f"[red]cannot use state file {options.state_path}: {exc}[/red]")
        return EXIT_USAGE
    with Client(
        options.server,
        options.api_key,
        timeout=options.timeout,
        retries=options.retries,
        max_connections=options.concurrency + 2,
    ) as client:
        try:
            if not _check_server(client, options, console):
                return EXIT_FAILED
            return _run(options, client, state, console)
        except ClientError as exc:
            console.print(f"[red]{options.server}: {exc}[/red]")
            return EXIT_FAILED
        except KeyboardInterrupt:
            console.print(
                f"[yellow]interrupted; run the same command again to resume "
                f"(state: {options.state_path})[/yellow]"
            )
            return EXIT_INTERRUPTED


def _run(options: SubmitOptions, client: Client, state: SubmitState, console: Console) -> int:
    sub = Submission(options, client, state, console)
    try:
        save_state(options.state_path, state)
    except OSError as exc:
        console.print(
            f"[red]cannot write the state file {options.state_path} ({exc.strerror}); "
            "choose a writable place with --state[/red]"
        )
        return EXIT_USAGE
    exclude = [options.state_path] + ([options.out] if options.out else [])
    with sub.ui.progress:
        sub.ui.add("scanning", None)
        found = scan(options.paths, exclude=exclude, on_file=lambda: sub.ui.advance("scanning"))
        sub.ui.complete("scanning")
        sub.files, sub.skipped = found.files, found.skipped
        groups = plan_uploads(found.files, state, max_batch_bytes=options.batch_bytes)
        sub.upload(groups)
        rows = sub.finish()
    failures = sub.file_failures() + sub.failures
    for row in rows:
        if row.status == "no_job" or (
            options.wait and row.status in ("failed", "queued", "running")
        ):
            failures.append(Failure("series", row.series_instance_uid, row.status, row.error))
    if not sub.files:
        failures.append(
            Failure(
                "run",
                ", ".join(str(p) for p in options.paths),
                "no_dicom",
                "no DICOM file or zip found",
            )
        )
    if options.out:
        options.out.mkdir(parents=True, exist_ok=True)
        write_summary_csv(options.out / "summary.csv", rows, options.out)
    _print_report(Console(), sub, rows, failures)
    return EXIT_FAILED if failures else EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m app.submit ...``: the same command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="medcad")
    add_submit_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["submit", *(argv if argv is not None else sys.argv[1:])])
    return run_submit(args)


if __name__ == "__main__":
    raise SystemExit(main())
