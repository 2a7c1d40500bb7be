"""Measurements on ECG signals that the pipeline relies on (R peaks and heart rate).

NeuroKit2's detector is used: on the PTB-XL records here it agrees between the 100 Hz and 500 Hz
copies of a record and between leads, where wfdb's XQRS often doubles or halves the rate at 100 Hz.
Tests compare it against XQRS and against the synthetic consortium's stated rates.
"""

from __future__ import annotations

import warnings

import numpy as np

from ecgtwin.data.record import LEADS

HR_PLAUSIBLE = (20.0, 300.0)  # bpm: a rate outside is a detection failure, or a request to refuse
_HR_LEADS = ("II", "V5", "I")  # lead II first, as on a monitor; the median over leads resists one bad lead


def r_peaks(lead: np.ndarray, fs: float) -> np.ndarray:
    """R-peak sample indices of one lead (NeuroKit2: cleaning filter, then its QRS detector)."""
    import neurokit2 as nk  # imported here: it is slow to import and only some commands need it

    x = np.nan_to_num(np.asarray(lead, dtype=np.float64))
    if np.ptp(x) == 0:
        return np.zeros(0, dtype=int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NeuroKit2 warns on short or odd signals; we judge the result ourselves
        try:
            _, info = nk.ecg_peaks(nk.ecg_clean(x, sampling_rate=fs), sampling_rate=fs, method="neurokit")
        except (ValueError, IndexError, ZeroDivisionError):
            return np.zeros(0, dtype=int)
    return np.asarray(info["ECG_R_Peaks"], dtype=int)


def heart_rate(signal: np.ndarray, fs: float) -> float:
    """Heart rate in bpm of a (12, n) signal: median over leads of 60 / mean RR; NaN when no lead has 3 beats."""
    rates = []
    for lead in _HR_LEADS:
        peaks = r_peaks(signal[LEADS.index(lead)], fs)
        if len(peaks) >= 3:
            rates.append(60.0 * fs / np.mean(np.diff(peaks)))
    return float(np.median(rates)) if rates else float("nan")


def _limb_basis() -> np.ndarray:
    """(6, 2): the six limb leads as combinations of I and II (Einthoven's and Goldberger's laws)."""
    return np.array([[1.0, 0.0],     # I
                     [0.0, 1.0],     # II
                     [-1.0, 1.0],    # III = II - I
                     [-0.5, -0.5],   # aVR = -(I + II) / 2
                     [1.0, -0.5],    # aVL = I - II / 2
                     [-0.5, 1.0]])   # aVF = II - I / 2


def project_limb_leads(signals: np.ndarray) -> np.ndarray:
    """The nearest (least squares) signals whose six limb leads obey II = I + III and Goldberger's laws.

    The limb leads of a real ECG span only two dimensions; a generator's decoder emits six of them
    independently. Projecting onto that plane can only move a twin closer to any physically consistent
    ECG (a projection is non-expansive), and leaves the precordial leads V1-V6 untouched.
    """
    x = np.array(signals, dtype=np.float32, copy=True)
    limb = [LEADS.index(name) for name in ("I", "II", "III", "aVR", "aVL", "aVF")]
    basis = _limb_basis()
    projection = (basis @ np.linalg.pinv(basis)).astype(np.float32)  # (6, 6), symmetric, idempotent
    x[..., limb, :] = np.einsum("ij,...jt->...it", projection, x[..., limb, :])
    return x


def median_beat(signal: np.ndarray, fs: float, before_s: float = 0.25, after_s: float = 0.45) -> np.ndarray | None:
    """The median beat of a (12, n) signal: every lead cut around lead II's R peaks and the median taken over
    beats, (12, W). Aligned on the R peak, so it does not depend on where the recording starts; what is left
    is the person's morphology (axis, amplitudes, intervals). None when fewer than 3 whole beats are found."""
    peaks = r_peaks(signal[LEADS.index("II")], fs)
    lo, hi = int(round(before_s * fs)), int(round(after_s * fs))
    peaks = peaks[(peaks >= lo) & (peaks + hi <= signal.shape[1])]
    if len(peaks) < 3:
        return None
    return np.median(np.stack([signal[:, p - lo:p + hi] for p in peaks]), axis=0)


def beat_distance(a: np.ndarray, b: np.ndarray) -> float:
    """RMS difference (mV) of two median beats."""
    return float(np.sqrt(np.mean((np.asarray(a) - np.asarray(b)) ** 2)))
