"""Fitting the nodule component filter on validation records (pure, on hand-made records)."""

from __future__ import annotations

import numpy as np

from models.training.evaluate import Candidate, SegSeries, fit_component_filter, refilter


def _series(candidates: list[Candidate], diameters: list[float], truth: int = 100) -> SegSeries:
    predicted = sum(c.voxels for c in candidates)
    counts = np.array([90.0, 200.0, 0.0, float(predicted + truth)])
    return SegSeries(counts, diameters, [], [], counts, candidates)


def _records() -> list[SegSeries]:
    """Two series: each has one 8 mm nodule found by a 40 mm³ component, and two tiny (4 mm³)
    but very confident false components; the second also a large, weak false component."""
    hit = Candidate(volume_mm3=40.0, score=0.9, lesions=(0,), voxels=100, true_voxels=80)
    tiny = Candidate(volume_mm3=4.0, score=0.999, lesions=(), voxels=10)
    weak = Candidate(volume_mm3=80.0, score=0.6, lesions=(), voxels=200)
    return [_series([hit, tiny, tiny], [8.0]), _series([hit, tiny, tiny, weak], [8.0])]


def test_refilter_drops_by_volume_and_score_and_recounts_dice() -> None:
    s = _records()[1]
    by_volume = refilter(s, 5.0)
    assert by_volume.fp_scores == [0.6] and by_volume.lesion_score == [0.9]
    both = refilter(s, 5.0, 0.7)
    assert both.fp_scores == [] and both.lesion_score == [0.9]
    assert list(both.counts) == [90.0, 200.0, 80.0, 200.0]  # 100 predicted + 100 truth
    assert refilter(s, 0.0, 0.95).counts[3] == 120.0  # the two tiny ones + the truth
    gone = refilter(s, 50.0)
    assert gone.lesion_score == [0.0]


def test_fit_keeps_the_lesions_and_removes_what_a_volume_rule_can() -> None:
    fit = fit_component_filter(_records())
    table = {row["min_volume_mm3"]: row for row in fit["fitted"]["candidates"]}
    # without a volume rule the tiny false components outscore the nodules (0.999 > 0.9):
    # at <= 1 FP per series the threshold lands above 0.9, and nothing is found
    assert table[0.0]["sensitivity_ge6mm"] == 0.0
    assert table[5.0]["sensitivity_ge6mm"] == 1.0
    assert table[65.0]["sensitivity_ge6mm"] == 0.0  # the 40 mm³ component is gone too
    # 5-30 mm³ tie on sensitivity; Dice decides, and every one of them removes the tiny ones
    assert fit["min_volume_mm3"] in (5.0, 10.0, 15.0, 20.0, 30.0)
    assert fit["min_probability"] == 0.5  # one false component per series is allowed
    chosen = table[fit["min_volume_mm3"]]
    assert chosen["nodule_dice"] == max(r["nodule_dice"] for r in table.values())
    assert fit["fitted"]["series"] == 2 and fit["fitted"]["lesions_ge6mm"] == 2
