"""Coverage-guided fuzzing (atheris / libFuzzer) of the ingest validator.

Target: :func:`app.studies.validation.inspect_instance` (and, for inputs that look like a ZIP
archive, :func:`~app.studies.validation.iter_zip_members`). The only exceptions allowed are
``MedcadError`` subclasses — the rejections the API turns into 4xx answers; anything else
(``IndexError``, ``struct.error``, a pydicom exception, ``MemoryError``...) is a crash: the
API would answer 500 for that upload.

Run by ``tests/fuzz/test_fuzz_ingest.py`` (bounded) or by hand for longer campaigns::

    python tests/fuzz/fuzz_ingest.py CORPUS_DIR -runs=1000000 -max_len=1048576 \
        -rss_limit_mb=2048 -timeout=10

``make_corpus(DIR)`` writes the seed corpus: the generated hostile and odd inputs of
``tests.fixtures.dicom_corpus`` plus pydicom's own test files that are small enough.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["app.studies.validation"]):
    from app.studies.validation import IngestLimits, inspect_instance, iter_zip_members

from app.errors import MedcadError

# Smaller budgets than production keep each execution in the millisecond range; every check
# still runs, it just trips earlier.
LIMITS = IngestLimits(
    max_decoded_bytes=64 * 1024 * 1024,
    max_elements=20_000,
    max_sequence_items=4_096,
    max_inflated_bytes=32 * 1024 * 1024,
    max_zip_members=256,
    max_zip_member_bytes=16 * 1024 * 1024,
    max_zip_total_bytes=32 * 1024 * 1024,
)
MAX_SEED_BYTES = 256 * 1024


def test_one_input(data: bytes) -> None:
    try:
        if data[:4] == b"PK\x03\x04":
            for _name, _member in iter_zip_members(data, limits=LIMITS):
                pass
        else:
            inspect_instance(data, limits=LIMITS)
    except MedcadError:
        pass


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
        import pydicom_data  # type: ignore[import-not-found]

        roots.append(Path(pydicom_data.__file__).parent)
    except ImportError:
        pass
    return sorted(p for root in roots for p in root.rglob("*") if p.is_file() and p.suffix != ".py")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
