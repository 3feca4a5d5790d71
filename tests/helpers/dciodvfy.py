"""Validate DICOM objects against their IOD with dciodvfy (Debian package ``dicom3tools``).

``dciodvfy_errors(dataset)`` writes the dataset to a temporary PS3.10 file, runs dciodvfy
on it and returns the lines it reports as errors. Warnings are not returned: the rule for
medcad result objects is zero errors.

Without the binary the calling test is skipped with the reason, except in CI (``CI`` set
to a true value), where a missing validator is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pydicom
import pytest

_TRUE = {"1", "true", "yes", "on"}


def dciodvfy_binary() -> str:
    """Path of dciodvfy, or skip (fail in CI) when it is not installed."""
    path = shutil.which("dciodvfy")
    if path is None:
        message = "dciodvfy not found: install the Debian package dicom3tools"
        if os.environ.get("CI", "").strip().lower() in _TRUE:
            pytest.fail(message)
        pytest.skip(message)
    return path


def dciodvfy_report(dataset: pydicom.Dataset) -> str:
    """Everything dciodvfy prints about ``dataset`` (it reports on stderr)."""
    binary = dciodvfy_binary()
    with tempfile.TemporaryDirectory(prefix="dciodvfy-") as tmp:
        path = Path(tmp) / "object.dcm"
        pydicom.dcmwrite(path, dataset, enforce_file_format=True)
        result = subprocess.run(
            [binary, str(path)], capture_output=True, text=True, timeout=60, check=False
        )
    return result.stdout + result.stderr


def dciodvfy_errors(dataset: pydicom.Dataset) -> list[str]:
    """The ``Error`` lines dciodvfy reports for ``dataset`` (empty when it is valid)."""
    report = dciodvfy_report(dataset)
    return [line for line in report.splitlines() if line.startswith("Error")]
