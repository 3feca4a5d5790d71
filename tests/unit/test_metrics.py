"""The stage-duration summary behind ``medcad_job_stage_seconds``."""

from __future__ import annotations

import pytest

from app.metrics import stage_quantiles


def test_stages_are_split_by_model_and_summarised_over_jobs() -> None:
    jobs = [
        {"decode": 1.0, "infer:unet": 2.0, "infer:classifier": 0.5},
        {"decode": 3.0, "infer:unet": 4.0},
        {},
    ]
    summary = stage_quantiles(jobs, quantiles=(0.5, 1.0))
    assert set(summary) == {("decode", ""), ("infer", "unet"), ("infer", "classifier")}
    n, q = summary[("decode", "")]
    assert n == 2 and q[0.5] == pytest.approx(2.0) and q[1.0] == pytest.approx(3.0)
    assert summary[("infer", "classifier")] == (1, {0.5: 0.5, 1.0: 0.5})


def test_no_jobs_no_stages() -> None:
    assert stage_quantiles([]) == {}
