"""A live ``medcad dicom-listener`` process on a fresh SQLite medcad, shared by the module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.dicomweb.conftest import module_api  # noqa: F401 - the in-process medcad
from tests.helpers.services import free_port

ALLOWED_CALLERS = "STORESCU,ECHOSCU,PYNETDICOM"


@dataclass
class Listener:
    port: int
    ae_title: str
    proc: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="module")
def listener(module_api: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:  # noqa: F811
    """``medcad dicom-listener`` with an AE title allow-list, stopped with SIGTERM afterwards."""
    port = free_port()
    log = tmp_path_factory.mktemp("listener") / "listener.log"
    with log.open("wb") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "dicom-listener", "--port", str(port),
             "--ae-title", "MEDCAD", "--allowed-callers", ALLOWED_CALLERS],
            env=os.environ.copy(),  # the module's MEDCAD_* settings
            stdout=handle,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while b"dicom-listener ready" not in log.read_bytes():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"listener did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        yield Listener(port, "MEDCAD", proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
