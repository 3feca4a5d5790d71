"""Lazy, per-process cache of onnxruntime sessions.

Sessions are created on first use inside the process that runs them (after Celery's fork), never
at import time: onnxruntime's thread pools do not survive a fork.
"""

from __future__ import annotations

import os
import threading

import onnxruntime as ort

from app.errors import PipelineError
from app.registry.service import RegisteredModel, file_sha256

_lock = threading.Lock()
_sessions: dict[tuple[str, int], ort.InferenceSession] = {}
_pid = os.getpid()


def _default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def get_session(
    model: RegisteredModel, *, intra_op_threads: int = 0, inter_op_threads: int = 1
) -> ort.InferenceSession:
    """The session for ``model`` in this process, created (and sha256-verified) on first use."""
    global _pid
    with _lock:
        if os.getpid() != _pid:  # forked since the cache was filled: start empty
            _sessions.clear()
            _pid = os.getpid()
        key = (str(model.onnx_path), os.getpid())
        session = _sessions.get(key)
        if session is None:
            session = _create(model, intra_op_threads, inter_op_threads)
            _sessions[key] = session
        return session


def _create(model: RegisteredModel, intra: int, inter: int) -> ort.InferenceSession:
    if not model.onnx_path.is_file():
        raise PipelineError("model_missing", f"{model.manifest.key}: ONNX file is missing")
    if file_sha256(model.onnx_path) != model.manifest.sha256:
        raise PipelineError(
            "model_checksum_mismatch",
            f"{model.manifest.key}: ONNX file does not match the manifest sha256",
        )
    return ort.InferenceSession(
        str(model.onnx_path),
        sess_options=session_options(intra, inter),
        providers=["CPUExecutionProvider"],
    )


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 1) -> ort.SessionOptions:
    """The options of every worker session: the evaluation, export and benchmark tools build
    theirs with this too, so what they time and measure is what the workers run.

    ``intra_op_threads`` 0 means one per core this process may use.
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads or _default_threads()
    options.inter_op_num_threads = max(1, inter_op_threads)
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    configure_spinning(options)
    return options


def configure_spinning(options: ort.SessionOptions) -> None:
    """Let idle intra-op threads sleep instead of spinning when a session has several.

    Every parallel operator ends in a barrier. A spinning thread keeps its core busy while it
    waits there, so on a host whose cores are shared (the embedded API and its worker always
    share them) it takes time from the very thread it waits for: measured with other
    processes running, 8-10 % more wall time and 13 % more CPU per image. On dedicated cores
    sleeping costs 1-4 %. Two such sessions run one after the other (a fp32 and an INT8
    build, a model with and without an output) are worse: on 2 vCPUs each pass of the
    classifier took 15.3 ms with spinning threads against 8.1 ms without.
    """
    if options.intra_op_num_threads > 1:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")


def clear() -> None:
    """Drop every cached session (tests, model reloads)."""
    with _lock:
        _sessions.clear()
