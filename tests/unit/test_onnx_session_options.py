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


def test_worker_options_are_sequential_fully_optimised_and_sleep_when_idle() -> None:
    from workers.onnx_sessions import session_options

    options = session_options(2)
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.get_session_config_entry(SPINNING) == "0"
    assert session_options(0).intra_op_num_threads >= 1  # 0: one per usable core


def test_the_evaluation_tools_time_sessions_built_as_the_workers_build_them() -> None:
    """Two 2-thread sessions run in turn with spinning threads steal each other's cores: the
    saliency evaluation once reported the classifier's CAM as 39 % of a pass that way."""
    pytest.importorskip("torch")  # the export tool imports it
    from models.training.evaluate import load_manifest, session
    from models.training.export import ort_session
    from models.training.quantize import session as quantize_session

    manifest, folder = load_manifest("classifier:1.1.0")
    for build in (session, ort_session, quantize_session):
        opened = build(folder / manifest.file, 2)
        assert opened.get_session_options().get_session_config_entry(SPINNING) == "0"
