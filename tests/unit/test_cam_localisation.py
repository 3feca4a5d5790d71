"""The classifier's CAM scoring when the map is finer than the label grid (pure)."""

from __future__ import annotations

import numpy as np
import pytest

from models.training.evaluate import cam_localisation, on_grid


def test_a_label_grid_mask_is_scored_on_a_twice_finer_cam() -> None:
    nodule = np.zeros((4, 4), bool)
    nodule[1, 2] = True
    fine = on_grid(nodule, (8, 8))
    assert fine.shape == (8, 8) and fine.sum() == 4 and fine[2:4, 4:6].all()
    cam = np.zeros((8, 8), np.float32)
    cam[3, 5] = 1.0  # inside the lesion's 2 x 2 block of the finer grid
    assert cam_localisation(cam, fine) == (True, pytest.approx(16.0))
    cam[3, 5], cam[3, 6] = 0.0, 1.0  # one fine pixel to the right: outside
    assert cam_localisation(cam, fine)[0] is False
    assert on_grid(nodule, (4, 4)) is not nodule and (on_grid(nodule, (4, 4)) == nodule).all()


def test_a_map_that_is_not_a_multiple_of_the_grid_is_refused() -> None:
    with pytest.raises(ValueError, match="multiple"):
        on_grid(np.zeros((4, 4), bool), (6, 6))
