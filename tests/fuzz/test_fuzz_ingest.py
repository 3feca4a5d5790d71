"""A bounded atheris run on the ingest validator: 20,000 executions seeded from the generated
corpus and pydicom's test files, 0 crashes, 0 timeouts, bounded memory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS = Path(__file__).with_name("fuzz_ingest.py")
RUNS = 20_000

pytestmark = pytest.mark.timeout(600)


def _fuzz(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, str(HARNESS), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=540,
        check=False,
    )


def test_the_validator_raises_only_rejections_under_fuzzing(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO))
    from tests.fuzz.seeds import make_corpus

    corpus = tmp_path / "corpus"
    seeds = make_corpus(corpus)
    assert seeds >= 100
    result = _fuzz(
        tmp_path,
        str(corpus),
        f"-runs={RUNS}",
        "-seed=1",
        "-max_len=32768",
        "-timeout=10",
        "-rss_limit_mb=2048",
        f"-artifact_prefix={tmp_path}/",
    )
    log = result.stderr
    done = re.search(r"Done (\d+) runs in (\d+) second", log)
    coverage = re.findall(r"cov: (\d+)", log)
    crashes = sorted(p.name for p in tmp_path.glob("crash-*")) + sorted(
        p.name for p in tmp_path.glob("timeout-*")
    )
    print(f"atheris: {done.group(1) if done else '?'} runs in "
          f"{done.group(2) if done else '?'} s from {seeds} seeds, coverage "
          f"{coverage[-1] if coverage else '?'} edges, {len(crashes)} crashes")  # fmt: skip
    assert result.returncode == 0, log[-3000:]
    assert done is not None and int(done.group(1)) >= RUNS, log[-2000:]
    assert not crashes


def test_the_harness_reports_a_crash(tmp_path: Path) -> None:
    """An input that makes the target raise something else than a rejection is a crash."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "seed").write_bytes(b"PK\x03\x04" + b"\0" * 26)
    probe = tmp_path / "crashing.py"
    probe.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from tests.fuzz import fuzz_ingest\n"
        "original = fuzz_ingest.test_one_input\n"
        "def boom(data):\n"
        "    if data[:4] == b'PK\\x03\\x04':\n"
        "        raise IndexError('not a rejection')\n"
        "    original(data)\n"
        "fuzz_ingest.test_one_input = boom\n"
        "fuzz_ingest.main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, str(probe), str(corpus), "-runs=100", f"-artifact_prefix={tmp_path}/"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and "IndexError" in result.stdout + result.stderr
    assert list(tmp_path.glob("crash-*"))


def test_fuzzing_regressions_are_rejections() -> None:
    """Inputs that crashed the validator once; each must now be a plain rejection."""
    import io
    import zipfile

    sys.path.insert(0, str(REPO))
    from app.errors import IngestRejected
    from app.studies.validation import IngestLimits, iter_zip_members

    empty_name = io.BytesIO()  # a member named "": ZipInfo.is_dir() raised IndexError
    with zipfile.ZipFile(empty_name, "w") as archive:
        archive.writestr(zipfile.ZipInfo(""), b"x")
    with pytest.raises(IngestRejected):
        list(iter_zip_members(empty_name.getvalue(), limits=IngestLimits()))
    newer_version = io.BytesIO()  # "version needed" 23.4: zipfile raised NotImplementedError
    with zipfile.ZipFile(newer_version, "w") as archive:
        info = zipfile.ZipInfo("a.dcm")
        archive.writestr(info, b"x")
    data = bytearray(newer_version.getvalue())
    central = data.rindex(b"PK\x01\x02")
    data[central + 6 : central + 8] = (234).to_bytes(2, "little")  # version needed to extract
    with pytest.raises(IngestRejected):
        list(iter_zip_members(bytes(data), limits=IngestLimits()))
