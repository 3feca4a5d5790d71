"""Content-addressed blob store: sha256 keys, temp file + fsync + rename, then fsync the folder.

A blob exists under its key only when its bytes are complete and durable, so a row that names a
key (committed after the write) never points at a partial file. Writes of identical bytes are
idempotent.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

from app.errors import InsufficientStorage, NotFound, ServiceUnavailable

_KEY = re.compile(r"^[0-9a-f]{64}$")


def sha256_hex(data: bytes) -> str:
    """The hex sha256 of ``data`` (the blob key)."""
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """Blobs under ``root/ab/cd/<sha256>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"

    def path_for(self, key: str) -> Path:
        """The path of a blob (keys are validated: never a user-chosen path)."""
        if not _KEY.match(key):
            raise NotFound("not_found", f"no blob {key[:80]!r}")
        return self.root / key[:2] / key[2:4] / key

    def exists(self, key: str) -> bool:
        """True if the blob is stored."""
        return self.path_for(key).is_file()

    def put(self, data: bytes) -> str:
        """Store ``data`` durably and return its key."""
        key = sha256_hex(data)
        target = self.path_for(key)
        if target.is_file():
            # Refresh the age of the stored copy: it may be an orphan of a crashed request that a
            # new row is about to name, and the scrubber only removes orphans past a grace period.
            try:
                os.utime(target)
            except FileNotFoundError:  # removed by the scrubber just now: write it again
                return self.put(data)
            except OSError:  # a read-only store: the stored copy is complete all the same
                pass
            return key
        try:
            self._write_durably(target, data)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise InsufficientStorage(
                    "insufficient_storage", "the blob store is full; nothing was stored"
                ) from exc
            raise ServiceUnavailable(detail="the blob store cannot be written") from exc
        return key

    def _write_durably(self, target: Path, data: bytes) -> None:
        self._tmp.mkdir(parents=True, exist_ok=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def get(self, key: str) -> bytes:
        """The bytes of a blob."""
        path = self.path_for(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise NotFound("not_found", f"no blob {key}") from exc

    def delete(self, key: str) -> None:
        """Remove a blob (used by the scrubber for orphans)."""
        self.path_for(key).unlink(missing_ok=True)

    def keys(self) -> Iterator[str]:
        """Every stored key (for the scrubber)."""
        if not self.root.is_dir():
            return
        for path in self.root.glob("??/??/*"):
            if _KEY.match(path.name):
                yield path.name
