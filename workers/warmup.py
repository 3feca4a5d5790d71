"""One-off loads of the output path, done once in the worker's main process before it forks.

A worker child's first job used to pay for loads that every later job reuses: highdicom reads
its tables of the standard (which attributes belong to which module of which IOD, PS3.3) from
JSON the first time it builds a SEG, SR or Parametric Map, and Pillow imports its image
plugins the first time it writes a PNG. Measured on a 1-slice job with the shipped models, a
fresh process built the outputs in 0.61-0.66 s against 0.22-0.25 s for its later jobs; loading
the standard's tables alone takes 0.32 s, Pillow's plugins 0.08 s.

Celery's prefork pool forks its children from the main process, and a child replaced after a
crash or recycled after ``worker_max_tasks_per_child`` is forked again from it. Loading those
tables once there, before the pool starts, hands them to every child for free. Nothing here
creates an onnxruntime session: its thread pools do not survive a fork (see
:mod:`workers.onnx_sessions`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def _standard_tables() -> list[Callable[[], Any]]:
    """highdicom's cached loaders of its tables of the standard (SOP Class → IOD, IOD →
    modules, module → attributes). They are internal to highdicom: when a release renames
    them there is simply nothing to preload, and the first job pays as before."""
    from highdicom import _standard_utils

    names = ("get_sop_class_iod_map", "get_iod_module_map", "get_module_attribute_map")
    return [f for f in (getattr(_standard_utils, n, None) for n in names) if callable(f)]


def warm_output_path() -> float:
    """Load what building outputs needs once per process; returns the seconds it took."""
    from PIL import Image

    started = time.perf_counter()
    for load in _standard_tables():
        load()
    Image.preinit()  # Pillow's common format plugins (PNG among them), else on the first PNG
    seconds = time.perf_counter() - started
    log.info("output path warmed in %.2f s", seconds)
    return seconds
