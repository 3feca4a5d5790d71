"""The worker's main process loads the output path's one-off tables before its pool forks, so a
child (a first one, or one replaced after a crash) builds its first DICOM output without them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workers import celery_app
from workers.warmup import _standard_tables

REPO = Path(__file__).resolve().parents[3]

# A fresh interpreter (cold caches): optionally warm, then fork the way the prefork pool does;
# the child builds a Parametric Map and reports how often highdicom had to load a table.
CHILD = """
import json, os, sys
import numpy as np
from tests.unit.outputs.conftest import make_ct_series
from workers.outputs.dicom_pmap import build_parametric_map
from workers.warmup import _standard_tables, warm_output_path

if sys.argv[1] == "warm":
    warm_output_path()
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    before = [f.cache_info().misses for f in _standard_tables()]
    sources = make_ct_series(n=2)
    maps = np.zeros((2, int(sources[0].Rows), int(sources[0].Columns)), np.float32)
    build_parametric_map(sources, maps, method="cam", value_range=(0.0, 1.0),
                         model_name="m", model_version="1")
    after = [f.cache_info().misses for f in _standard_tables()]
    os.write(write, json.dumps([a - b for a, b in zip(after, before)]).encode())
    os._exit(0)
os.close(write)
os.waitpid(pid, 0)
print(os.read(read, 1000).decode())
"""


def _loads_in_forked_child(mode: str) -> list[int]:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return list(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_the_installed_highdicom_has_the_tables_the_warm_up_preloads():
    # If a highdicom release renames them the warm-up silently does nothing: fail here instead.
    assert len(_standard_tables()) == 3


@pytest.mark.parametrize(("mode", "loads_expected"), [("cold", True), ("warm", False)])
def test_a_forked_child_builds_outputs_without_loading_the_standard_tables_again(
    mode, loads_expected
):
    loads = _loads_in_forked_child(mode)
    assert (sum(loads) > 0) is loads_expected, loads


def test_the_worker_warms_the_output_path_when_it_starts(monkeypatch):
    from celery.signals import worker_init

    assert any(ref() is celery_app._on_worker_start for _key, ref in worker_init.receivers)
    calls: list[str] = []
    monkeypatch.setattr(celery_app, "warm_output_path", lambda: calls.append("warm") or 0.0)
    monkeypatch.setattr(celery_app, "start_sweeper", lambda _settings: calls.append("sweeper"))
    monkeypatch.setattr(celery_app, "configure_logging", lambda *_a: None)
    celery_app._on_worker_start()
    assert calls[0] == "warm"
