"""bench.hr_follow's statistics tell a twin that follows the requested rate from one that keeps its person's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed
from bench.hr_follow import follow, rhythm_statement  # noqa: E402


def rates(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    requested = np.repeat([45.0, 60.0, 75.0, 90.0, 110.0, 130.0], 20)
    reference = rng.uniform(50.0, 110.0, requested.size)
    return requested, reference


def test_a_twin_that_follows_the_request_scores_slope_one_and_keeps_nothing():
    requested, reference = rates()
    measured = requested + np.random.default_rng(1).normal(0.0, 2.0, requested.size)
    result = follow(measured, requested, reference)
    assert abs(result["follows_request"] - 1.0) < 0.05 and abs(result["keeps_reference"]) < 0.05
    assert result["hr_mae_bpm"] < 3.0 < result["hr_mae_keep_reference_bpm"]


def test_a_twin_that_keeps_its_reference_rate_scores_slope_zero():
    requested, reference = rates()
    result = follow(reference + 1.0, requested, reference)
    assert abs(result["follows_request"]) < 0.05 and abs(result["keeps_reference"] - 1.0) < 0.05
    assert abs(result["slope"]) < 0.2
    assert abs(result["hr_mae_bpm"] - result["hr_mae_keep_reference_bpm"]) < 1.5


def test_unmeasurable_twins_are_counted_not_scored():
    requested, reference = rates()
    measured = requested.copy()
    measured[::4] = np.nan
    result = follow(measured, requested, reference)
    assert result["measured_share"] == 0.75 and result["hr_mae_bpm"] == 0.0
    assert result["median_measured_by_requested"]["130"] == 130.0


def test_the_rhythm_statement_agrees_with_the_rate():
    assert [rhythm_statement(hr).split(".")[0] for hr in (45.0, 55.0, 75.0, 130.0)] == [
        "Marked sinus bradycardia", "Sinus bradycardia", "Sinus rhythm", "Sinus tachycardia"]
