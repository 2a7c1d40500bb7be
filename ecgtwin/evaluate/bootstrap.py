"""Patient-level bootstrap intervals for the headline metrics.

Twins of one patient are not independent samples, so the resampling unit is the patient: draw the twin
patients with replacement (each with all of its twins, real targets and real ECGs) and recompute. The
interval says how much a metric would move with another draw of patients of the same kind; it is what
"within 10 points" has to be read against.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np


def patient_bootstrap(compute: Callable[[np.ndarray], dict[str, float]], patients: Sequence, draws: int = 200,
                      level: float = 0.95, seed: int = 0) -> dict[str, list[float]]:
    """[low, high] percentile interval of every metric `compute(sampled_patients)` returns."""
    unique = np.array(sorted(set(np.asarray(patients).tolist())))
    if len(unique) < 2:
        raise ValueError(f"bootstrap: needs at least 2 patients, got {len(unique)}")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    values: dict[str, list[float]] = {}
    for _ in range(draws):
        for key, value in compute(rng.choice(unique, size=len(unique), replace=True)).items():
            values.setdefault(key, []).append(np.nan if value is None else float(value))
    tail = 100 * (1 - level) / 2
    return {key: [float(np.nanpercentile(v, tail)), float(np.nanpercentile(v, 100 - tail))]
            for key, v in values.items() if np.isfinite(v).any()}


def rows_of(sample: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Indices of the rows of every sampled patient, repeated as often as the patient was drawn."""
    return np.concatenate([np.flatnonzero(ids == p) for p in sample])
