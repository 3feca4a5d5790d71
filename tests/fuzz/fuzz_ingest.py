"""Coverage-guided fuzzing (atheris / libFuzzer) of the ingest validator.

Target: :func:`app.studies.validation.inspect_instance` (and, for inputs that look like a ZIP
archive, :func:`~app.studies.validation.iter_zip_members`). The only exceptions allowed are
``MedcadError`` subclasses — the rejections the API turns into 4xx answers; anything else
(``IndexError``, ``struct.error``, a pydicom exception, ``MemoryError``...) is a crash: the
API would answer 500 for that upload.

Run by ``tests/fuzz/test_fuzz_ingest.py`` (bounded) or by hand for longer campaigns::

    python tests/fuzz/fuzz_ingest.py CORPUS_DIR -runs=1000000 -max_len=1048576 \
        -rss_limit_mb=2048 -timeout=10

``tests/fuzz/seeds.py`` writes the seed corpus (``python tests/fuzz/seeds.py CORPUS_DIR``).
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=["app.studies.validation"]):
    from app.studies.validation import IngestLimits, inspect_instance, iter_zip_members

from app.errors import MedcadError

# Smaller budgets than production keep each execution in the millisecond range; every check
# still runs, it just trips earlier.
LIMITS = IngestLimits(
    max_decoded_bytes=4 * 1024 * 1024,
    max_frames=64,
    max_rows=2048,
    max_columns=2048,
    max_elements=5_000,
    max_sequence_items=1_024,
    max_inflated_bytes=1024 * 1024,
    inflation_ratio_floor_bytes=256 * 1024,
    codec_ratio_floor_bytes=1024 * 1024,
    max_fragments=1_024,
    max_zip_members=64,
    max_zip_member_bytes=1024 * 1024,
    max_zip_total_bytes=2 * 1024 * 1024,
    zip_ratio_floor_bytes=64 * 1024,
)


def test_one_input(data: bytes) -> None:
    try:
        if data[:4] == b"PK\x03\x04":
            for _name, _member in iter_zip_members(data, limits=LIMITS):
                pass
        else:
            inspect_instance(data, limits=LIMITS)
    except MedcadError:
        pass


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
