"""Heart rate from R peaks, checked against an independent detector and across sampling rates."""

import numpy as np
from wfdb import processing

from ecgtwin.data.readers.common import load_12_lead
from ecgtwin.data.signal import heart_rate


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


def _consistent_limb_leads(rng: np.random.Generator, n: int = 3, length: int = 512) -> np.ndarray:
    """Random signals whose limb leads obey Einthoven's and Goldberger's laws exactly."""
    from ecgtwin.data.record import LEADS

    x = rng.normal(0, 0.5, (n, 12, length)).astype(np.float32)
    lead_i, lead_ii = x[:, LEADS.index("I")], x[:, LEADS.index("II")]
    for name, value in (("III", lead_ii - lead_i), ("aVR", -(lead_i + lead_ii) / 2),
                        ("aVL", lead_i - lead_ii / 2), ("aVF", lead_ii - lead_i / 2)):
        x[:, LEADS.index(name)] = value
    return x


def test_limb_lead_projection_keeps_consistent_ecgs_and_moves_noisy_ones_closer():
    from ecgtwin.data.record import LEADS
    from ecgtwin.data.signal import project_limb_leads

    rng = np.random.default_rng(3)
    truth = _consistent_limb_leads(rng)
    np.testing.assert_allclose(project_limb_leads(truth), truth, atol=1e-5)  # nothing to correct
    noisy = truth + rng.normal(0, 0.2, truth.shape).astype(np.float32)
    projected = project_limb_leads(noisy)
    lead = {name: projected[:, LEADS.index(name)] for name in LEADS}
    np.testing.assert_allclose(lead["II"], lead["I"] + lead["III"], atol=1e-5)
    np.testing.assert_allclose(lead["aVR"] + lead["aVL"] + lead["aVF"], 0, atol=1e-5)
    np.testing.assert_array_equal(projected[:, 6:], noisy[:, 6:])  # V1-V6 untouched
    limb = slice(0, 6)
    # six noisy limb leads onto a 2-D plane: about 2/6 of the noise energy should remain
    ratio = np.sum((projected[:, limb] - truth[:, limb]) ** 2) / np.sum((noisy[:, limb] - truth[:, limb]) ** 2)
    assert 0.25 < ratio < 0.42, ratio
    np.testing.assert_allclose(project_limb_leads(projected), projected, atol=1e-5)  # a projection
