"""The transparent label overlay served as a mask's ``overlay_url``."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from workers.outputs.overlays import render_label_overlay


def test_label_overlay_is_transparent_outside_labels_and_coloured_inside() -> None:
    labels = np.zeros((32, 32), np.uint8)
    labels[4:20, 4:20] = 1
    labels[10:12, 24:26] = 2
    png = render_label_overlay(labels, {1: (0, 0, 255), 2: (255, 0, 0)}, alpha=0.5)
    rgba = np.asarray(Image.open(io.BytesIO(png)))
    assert rgba.shape == (32, 32, 4)
    assert (rgba[labels == 0, 3] == 0).all()
    assert tuple(rgba[12, 12]) == (0, 0, 255, 128)  # interior: label colour, half opaque
    assert tuple(rgba[4, 4]) == (0, 0, 255, 255)  # border: opaque
    assert (rgba[labels == 2, 0] == 255).all() and (rgba[labels == 2, 3] == 255).all()  # 2x2: all border
