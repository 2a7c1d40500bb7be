"""From a reader's Record to the model representation: crop, NaN repair, quality checks,
optional baseline removal, and resampling to `n_samples` over `duration_s` (1024 over 10 s in both papers).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np
from scipy import signal as sps

from ecgtwin.data.record import LEADS, Record, RecordError


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    n_samples: int = 1024
    duration_s: float = 10.0
    baseline_removal: bool = True
    baseline_cutoff_hz: float = 0.5
    duration_tolerance_s: float = 0.1  # shorter records than this are rejected as wrong_duration
    max_nan_fraction: float = 0.05  # per lead; fewer NaNs are interpolated
    flat_std_mv: float = 0.005  # a lead this still is disconnected
    saturation_fraction: float = 0.02  # share of samples stuck at the lead's extreme value
    max_abs_mv: float = 20.0  # beyond any physiological ECG amplitude

    @property
    def fs(self) -> float:
        return self.n_samples / self.duration_s


def preprocess(record: Record, config: PreprocessConfig) -> tuple[np.ndarray, bool]:
    """Return the (12, n_samples) float32 model input and whether the record was cropped.

    Raises RecordError with the reason a quality check failed.
    """
    signal = np.asarray(record.signal, dtype=np.float64)
    if signal.shape[0] != len(LEADS):
        raise RecordError("wrong_lead_count", f"{signal.shape[0]} leads, expected {len(LEADS)}")
    signal, cropped = _crop(signal, record.fs, config)
    signal = _repair_nans(signal, config)
    check_quality(signal, config)
    if config.baseline_removal:
        signal = remove_baseline(signal, record.fs, config.baseline_cutoff_hz)
    return resample(signal, record.fs, config).astype(np.float32), cropped


def _crop(signal: np.ndarray, fs: float, config: PreprocessConfig) -> tuple[np.ndarray, bool]:
    wanted = int(round(config.duration_s * fs))
    have = signal.shape[1]
    if have < wanted - config.duration_tolerance_s * fs:
        raise RecordError("wrong_duration", f"{have / fs:.2f} s long, need {config.duration_s:g} s")
    if have < wanted:  # within tolerance: pad by repeating the edge sample
        signal = np.pad(signal, ((0, 0), (0, wanted - have)), mode="edge")
    return signal[:, :wanted], have > wanted + config.duration_tolerance_s * fs


def _repair_nans(signal: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    missing = np.isnan(signal)
    if not missing.any():
        return signal
    fractions = missing.mean(axis=1)
    for lead, fraction in zip(LEADS, fractions):
        if fraction == 1.0:
            raise RecordError("missing_lead", f"lead {lead} holds no samples (all NaN)")
        if fraction > config.max_nan_fraction:
            raise RecordError("nan_fraction", f"lead {lead} is {fraction:.0%} NaN (limit {config.max_nan_fraction:.0%})")
    t = np.arange(signal.shape[1])
    repaired = signal.copy()
    for i in np.flatnonzero(fractions):
        ok = ~missing[i]
        repaired[i, ~ok] = np.interp(t[~ok], t[ok], signal[i, ok])
    return repaired


def check_quality(signal: np.ndarray, config: PreprocessConfig) -> None:
    """Reject missing (all-zero), flat, saturated or out-of-range leads, naming the first offending lead."""
    for lead, x in zip(LEADS, signal):
        if not np.any(x):
            raise RecordError("missing_lead", f"lead {lead} is all zeros")
        if np.std(x) < config.flat_std_mv:
            raise RecordError("flat_lead", f"lead {lead} is flat (std {np.std(x) * 1000:.1f} uV)")
        peak = np.max(np.abs(x))
        if peak > config.max_abs_mv:
            raise RecordError("saturation", f"lead {lead} reaches {peak:.1f} mV (limit {config.max_abs_mv:g})")
        at_rail = max(np.mean(x == x.max()), np.mean(x == x.min()))
        if at_rail > config.saturation_fraction:
            raise RecordError("saturation", f"lead {lead} sits at its extreme value for {at_rail:.0%} of samples (clipped)")


def remove_baseline(signal: np.ndarray, fs: float, cutoff_hz: float) -> np.ndarray:
    """Zero-phase high-pass filter against baseline wander (does not shift ST segments in time)."""
    sos = sps.butter(2, cutoff_hz, btype="highpass", fs=fs, output="sos")
    return sps.sosfiltfilt(sos, signal, axis=1)


def resample(signal: np.ndarray, fs: float, config: PreprocessConfig) -> np.ndarray:
    """Polyphase resampling (with its anti-alias filter) to exactly n_samples."""
    ratio = Fraction(config.n_samples, signal.shape[1]).limit_denominator(10_000)
    out = sps.resample_poly(signal, ratio.numerator, ratio.denominator, axis=1, padtype="line")
    if out.shape[1] != config.n_samples:  # rounding of the limited ratio: fix the last sample or two
        out = out[:, : config.n_samples] if out.shape[1] > config.n_samples else np.pad(
            out, ((0, 0), (0, config.n_samples - out.shape[1])), mode="edge")
    return out
