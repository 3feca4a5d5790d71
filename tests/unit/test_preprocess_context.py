"""2.5-D inputs: neighbouring frames stacked as channels (workers.pipeline.preprocess)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from app.registry.manifest import Manifest, Preprocessing, Window
from workers.pipeline.preprocess import preprocess_frames, stack_context


def test_channel_k_is_the_frame_and_ends_repeat() -> None:
    frames = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((4, 3, 2), np.float32)
    x = stack_context(frames, 2)
    assert x.shape == (4, 5, 3, 2) and x.dtype == np.float32 and x.flags.c_contiguous
    firsts = x[:, :, 0, 0]
    assert firsts.tolist() == [
        [0, 0, 0, 1, 2],
        [0, 0, 1, 2, 3],
        [0, 1, 2, 3, 3],
        [1, 2, 3, 3, 3],
    ]


def test_no_context_is_one_channel_and_single_frame_repeats_itself() -> None:
    frames = np.random.default_rng(0).random((3, 4, 4), dtype=np.float32)
    assert np.array_equal(stack_context(frames, 0), frames[:, None])
    single = stack_context(frames[:1], 1)
    assert single.shape == (1, 3, 4, 4)
    assert all(np.array_equal(single[0, c], frames[0]) for c in range(3))


def test_preprocess_frames_stacks_after_window_and_resize() -> None:
    hu = np.random.default_rng(1).uniform(-1000, 400, (6, 8, 8)).astype(np.float32)
    flat = Preprocessing(window=Window(center=-400, width=1600), size=(4, 4))
    spec = flat.model_copy(update={"context_slices": 1})
    one = preprocess_frames(hu, flat)
    three = preprocess_frames(hu, spec)
    assert three.shape == (6, 3, 4, 4) and spec.channels == 3
    assert np.array_equal(three[:, 1], one[:, 0])
    assert np.array_equal(three[2, 0], one[1, 0]) and np.array_equal(three[2, 2], one[3, 0])


def _manifest(channels: int, context: int) -> dict[str, Any]:
    return {
        "name": "ctx", "version": "1", "task": "segmentation", "sha256": "0" * 64,
        "inputs": [{"name": "x", "shape": ["N", channels, 64, 64]}],
        "outputs": [{"name": "y", "shape": ["N", 2, 64, 64], "role": "logits"}],
        "preprocessing": {
            "window": {"center": 0, "width": 100}, "size": [64, 64], "context_slices": context,
        },
        "labels": [{"value": 0, "name": "background"}, {"value": 1, "name": "thing"}],
        "saliency": {"methods": []},
    }


def test_manifest_input_channels_must_match_the_context() -> None:
    assert Manifest.model_validate(_manifest(5, 2)).preprocessing.channels == 5
    with pytest.raises(ValidationError, match="5 channels but preprocessing gives 1"):
        Manifest.model_validate(_manifest(5, 0))
    with pytest.raises(ValidationError, match="context_slices"):
        Manifest.model_validate(_manifest(19, 9))
