"""Heart rate from R peaks, checked against an independent detector and across sampling rates."""

import numpy as np
from wfdb import processing

from ecgtwin.data.readers.common import load_12_lead
from ecgtwin.signal import heart_rate


def test_heart_rate_agrees_across_rates_and_with_xqrs_on_real_ptbxl(ptbxl_root):
    same_at_100, agree_with_xqrs, n = 0, 0, 0
    for header in sorted((ptbxl_root / "records500").rglob("*.hea")):
        hi = load_12_lead(header.with_suffix(""))
        lo = load_12_lead(ptbxl_root / "records100" / header.parent.name / header.stem.replace("_hr", "_lr"))
        hr_500, hr_100 = heart_rate(hi.signal, 500), heart_rate(lo.signal, 100)
        xqrs = processing.XQRS(sig=hi.signal[1].astype(float), fs=500)
        xqrs.detect(verbose=False)
        hr_xqrs = 60 * 500 / np.mean(np.diff(xqrs.qrs_inds)) if len(xqrs.qrs_inds) > 2 else np.nan
        n += 1
        same_at_100 += abs(hr_500 - hr_100) < 3
        agree_with_xqrs += abs(hr_500 - hr_xqrs) < 5
    assert n == 53
    assert same_at_100 >= 0.9 * n, f"only {same_at_100}/{n} records agree between the 100 and 500 Hz copies"
    assert agree_with_xqrs >= 0.75 * n, f"only {agree_with_xqrs}/{n} agree with XQRS on lead II"


def test_heart_rate_of_a_constructed_pulse_train_and_of_silence():
    fs = 500.0
    t = np.arange(5000) / fs
    beats = np.zeros((12, t.size))
    for start in np.arange(0.3, 10, 0.75):  # 80 bpm
        beats += 1.2 * np.exp(-((t - start) ** 2) / (2 * 0.012 ** 2))
    beats += np.random.default_rng(0).normal(0, 0.02, beats.shape)
    assert abs(heart_rate(beats, fs) - 80.0) < 2.0
    assert np.isnan(heart_rate(np.zeros((12, 5000)), fs))
