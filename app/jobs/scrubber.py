"""The scrubber: keeps the blob store and the database in step, and re-hashes what is stored.

Ingest writes a blob (fsync, rename) before the row that names it commits, and workers write
result blobs before the result rows commit. A crash in between leaves an *orphan*: a blob no row
names. That is harmless but wastes space, so the scrubber reports orphans and, when asked,
removes the ones older than a grace period (younger ones may belong to a request that is about
to commit). The opposite fault — a row naming a blob that is missing, or whose bytes no longer
hash to its key (bit rot, a damaged disk, a hand edit) — must never happen; the scrubber finds
it and reports the row, like dcm4chee's OBJECT_CHECKSUM verification or Orthanc's MD5 checks.
"""

from __future__ import annotations

import hashlib
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.db.records import ArtifactRecord, InstanceRecord, MaskRecord, SaliencyRecord
from app.storage import BlobStore

_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class BlobRef:
    """One place in the database that names a blob."""

    table: str
    row_id: str
    column: str


@dataclass(frozen=True)
class BlobProblem:
    """A row whose blob is ``missing`` or ``corrupt`` (its bytes do not hash to its key)."""

    key: str
    problem: str
    refs: tuple[BlobRef, ...]


@dataclass
class ScrubReport:
    """What one scrub found (and removed)."""

    referenced: int = 0
    blobs_on_disk: int = 0
    blobs_verified: int = 0
    bytes_verified: int = 0
    orphans: list[str] = field(default_factory=list)
    young_unreferenced: int = 0
    stale_temp_files: list[str] = field(default_factory=list)
    problems: list[BlobProblem] = field(default_factory=list)
    deleted: int = 0
    seconds: float = 0.0

    @property
    def missing(self) -> list[BlobProblem]:
        return [p for p in self.problems if p.problem == "missing"]

    @property
    def corrupt(self) -> list[BlobProblem]:
        return [p for p in self.problems if p.problem == "corrupt"]

    @property
    def healthy(self) -> bool:
        """True when every row's blob exists and hashes to its key."""
        return not self.problems


def referenced_blobs(*, session: Session) -> dict[str, list[BlobRef]]:
    """Every blob key the database names, with the rows that name it."""
    refs: dict[str, list[BlobRef]] = defaultdict(list)
    for row_id, key in session.execute(select(InstanceRecord.id, InstanceRecord.blob_sha256)):
        refs[key].append(BlobRef("instances", row_id, "blob_sha256"))
    for row_id, key in session.execute(select(ArtifactRecord.id, ArtifactRecord.blob_sha256)):
        refs[key].append(BlobRef("artifacts", row_id, "blob_sha256"))
    for row_id, blob, overlay in session.execute(
        select(MaskRecord.id, MaskRecord.blob_sha256, MaskRecord.overlay_sha256)
    ):
        refs[blob].append(BlobRef("masks", row_id, "blob_sha256"))
        refs[overlay].append(BlobRef("masks", row_id, "overlay_sha256"))
    for row_id, blob, overlay, params in session.execute(
        select(
            SaliencyRecord.id,
            SaliencyRecord.blob_sha256,
            SaliencyRecord.overlay_sha256,
            SaliencyRecord.params,
        )
    ):
        refs[blob].append(BlobRef("saliency_maps", row_id, "blob_sha256"))
        refs[overlay].append(BlobRef("saliency_maps", row_id, "overlay_sha256"))
        colorbar = (params or {}).get("colorbar_sha256")
        if isinstance(colorbar, str):
            refs[colorbar].append(BlobRef("saliency_maps", row_id, "params.colorbar_sha256"))
    return dict(refs)


def file_sha256(path: Path) -> tuple[str, int]:
    """The hex sha256 of a file and its size, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def _older_than(path: Path, cutoff: float) -> bool:
    try:
        return path.stat().st_mtime < cutoff
    except FileNotFoundError:
        return False


def scrub(
    *,
    session: Session,
    store: BlobStore,
    grace_seconds: float,
    delete_orphans: bool = False,
    verify: bool = True,
) -> ScrubReport:
    """Compare the blob store with the database; optionally remove orphans past the grace period.

    Parameters
    ----------
    session
        Read-only use: the scrubber never changes rows.
    store
        The blob store to check.
    grace_seconds
        Unreferenced blobs (and temporary files) younger than this are left alone: an upload or
        a job may be between its blob write and its commit. ``BlobStore.put`` refreshes the
        modification time of a blob it finds already stored, so a blob about to be referenced
        again is young again.
    delete_orphans
        Remove orphans and stale temporary files older than the grace period.
    verify
        Re-hash every referenced blob (reads every byte); without it only existence is checked.
    """
    started = time.monotonic()
    cutoff = time.time() - grace_seconds
    refs = referenced_blobs(session=session)
    report = ScrubReport(referenced=len(refs))
    on_disk = set(store.keys())
    report.blobs_on_disk = len(on_disk)
    _check_referenced(report, store, refs, on_disk, verify=verify)
    _collect_orphans(report, store, on_disk - refs.keys(), cutoff, delete=delete_orphans)
    report.seconds = round(time.monotonic() - started, 3)
    return report


def _check_referenced(
    report: ScrubReport,
    store: BlobStore,
    refs: dict[str, list[BlobRef]],
    on_disk: set[str],
    *,
    verify: bool,
) -> None:
    for key in sorted(refs):
        path = store.path_for(key)
        if key not in on_disk and not path.is_file():
            report.problems.append(BlobProblem(key, "missing", tuple(refs[key])))
            continue
        if not verify:
            continue
        try:
            actual, size = file_sha256(path)
        except FileNotFoundError:
            report.problems.append(BlobProblem(key, "missing", tuple(refs[key])))
            continue
        report.blobs_verified += 1
        report.bytes_verified += size
        if actual != key:
            report.problems.append(BlobProblem(key, "corrupt", tuple(refs[key])))


def _collect_orphans(
    report: ScrubReport, store: BlobStore, unreferenced: set[str], cutoff: float, *, delete: bool
) -> None:
    for key in sorted(unreferenced):
        path = store.path_for(key)
        if not _older_than(path, cutoff):
            report.young_unreferenced += 1
            continue
        report.orphans.append(key)
        # Re-check the age right before removing: a concurrent put() of the same bytes touches it.
        if delete and _older_than(path, cutoff):
            store.delete(key)
            report.deleted += 1
    # Temporary files of writes that never reached their rename (a crash mid-write).
    temp_dir = store.root / "tmp"
    if not temp_dir.is_dir():
        return
    for path in sorted(temp_dir.iterdir()):
        if path.is_file() and _older_than(path, cutoff):
            report.stale_temp_files.append(path.name)
            if delete:
                path.unlink(missing_ok=True)
                report.deleted += 1
