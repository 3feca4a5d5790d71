"""Session options of the worker's onnxruntime sessions."""

from __future__ import annotations

import onnxruntime as ort
import pytest

from workers.onnx_sessions import configure_spinning

SPINNING = "session.intra_op.allow_spinning"


def _options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    configure_spinning(options)
    return options


@pytest.mark.parametrize("threads", [2, 4])
def test_threads_of_a_multi_threaded_session_sleep_instead_of_spinning(threads: int) -> None:
    assert _options(threads).get_session_config_entry(SPINNING) == "0"


def test_a_single_threaded_session_keeps_the_default() -> None:
    with pytest.raises(RuntimeError):  # never set: onnxruntime's default applies
        _options(1).get_session_config_entry(SPINNING)
