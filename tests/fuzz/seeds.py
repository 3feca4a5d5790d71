"""The seed corpus of the ingest fuzzer: the generated hostile and odd inputs of
``tests.fixtures.dicom_corpus`` plus the test files pydicom and pydicom-data ship, each small
enough for the fuzzer's ``-max_len``."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

MAX_SEED_BYTES = 32 * 1024


def make_corpus(folder: Path) -> int:
    """Write the seed corpus into ``folder``; returns the number of files."""
    from tests.fixtures import dicom_corpus as corpus

    folder.mkdir(parents=True, exist_ok=True)
    seeds = [case.build() for case in corpus.HOSTILE_CASES]
    seeds += [build() for build in corpus.ACCEPTED_ODDITIES.values()]
    seeds += [p.read_bytes() for p in _shipped_test_files()]
    count = 0
    for data in seeds:
        if 0 < len(data) <= MAX_SEED_BYTES:
            (folder / hashlib.sha256(data).hexdigest()[:16]).write_bytes(data)
            count += 1
    return count


def _shipped_test_files() -> list[Path]:
    """pydicom's and pydicom-data's test files already on disk (never downloads)."""
    import pydicom.data

    roots = [Path(pydicom.data.__file__).parent]
    try:
        import data_store  # the pydicom-data package

        roots.append(Path(data_store.__file__).parent)
    except ImportError:
        pass
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file() and p.suffix != ".py")


if __name__ == "__main__":
    print(make_corpus(Path(sys.argv[1])))
