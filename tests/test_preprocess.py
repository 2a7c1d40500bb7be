import numpy as np
import pytest

from ecgtwin.data.preprocess import PreprocessConfig, check_quality, preprocess, remove_baseline, resample
from ecgtwin.data.record import Record, RecordError


def make_record(signal, fs=500.0):
    return Record(record_id="r", signal=signal, fs=fs, patient_id="p", source="test.hea")


@pytest.mark.parametrize("fs", [100.0, 250.0, 500.0, 1000.0, 257.0])
def test_resampling_keeps_frequency_content_and_length(fs):
    t = np.arange(int(10 * fs)) / fs
    x = np.tile(np.sin(2 * np.pi * 7.0 * t), (12, 1))
    cfg = PreprocessConfig()
    y = resample(x, fs, cfg)
    assert y.shape == (12, 1024)
    spectrum = np.abs(np.fft.rfft(y[0]))
    freqs = np.fft.rfftfreq(1024, d=1 / cfg.fs)
    assert freqs[np.argmax(spectrum)] == pytest.approx(7.0, abs=0.11)
    assert np.max(np.abs(y[0, 50:-50])) == pytest.approx(1.0, abs=0.05)


def test_resampling_to_another_representation():
    cfg = PreprocessConfig(n_samples=2500, duration_s=5.0)
    rng = np.random.default_rng(0)
    out, cropped = preprocess(make_record(rng.normal(size=(12, 5000)), fs=500), cfg)
    assert out.shape == (12, 2500) and out.dtype == np.float32 and cropped


def test_baseline_removal_removes_wander_and_keeps_qrs_sized_spikes():
    fs = 500.0
    t = np.arange(5000) / fs
    wander = 0.8 * np.sin(2 * np.pi * 0.15 * t)
    spikes = np.zeros_like(t)
    spikes[250::500] = 1.0
    spikes = np.convolve(spikes, np.hanning(25), mode="same")  # 50 ms "QRS" every second
    out = remove_baseline(np.tile(wander + spikes, (12, 1)), fs, 0.5)
    inner = slice(500, -500)  # away from the filter's edges
    assert np.abs(out[0, inner] - (spikes - spikes.mean())[inner]).max() < 0.1
    assert out[0].max() > 0.8 * spikes.max()


def test_nan_gaps_within_limit_are_interpolated():
    x = np.random.default_rng(1).normal(size=(12, 5000))
    x[4, 100:120] = np.nan
    out, _ = preprocess(make_record(x), PreprocessConfig(baseline_removal=False))
    assert np.isfinite(out).all()


@pytest.mark.parametrize("damage,reason", [
    (lambda x: x.__setitem__((3, slice(None)), np.nan), "missing_lead"),
    (lambda x: x.__setitem__((3, slice(0, 1000)), np.nan), "nan_fraction"),
    (lambda x: x.__setitem__((5, slice(None)), 0.0), "missing_lead"),
    (lambda x: x.__setitem__((5, slice(None)), 1.5), "flat_lead"),
    (lambda x: x.__setitem__((0, slice(None)), np.clip(x[0], -0.2, 0.2)), "saturation"),
    (lambda x: x.__setitem__((0, 10), 50.0), "saturation"),
])
def test_quality_checks_reject_with_a_reason(damage, reason):
    x = np.random.default_rng(2).normal(scale=0.5, size=(12, 5000))
    damage(x)
    with pytest.raises(RecordError) as info:
        preprocess(make_record(x), PreprocessConfig())
    assert info.value.reason == reason


def test_short_records_are_rejected_and_long_ones_cropped():
    rng = np.random.default_rng(3)
    with pytest.raises(RecordError, match="wrong_duration|long, need") as info:
        preprocess(make_record(rng.normal(size=(12, 4000))), PreprocessConfig())
    assert info.value.reason == "wrong_duration"
    _, cropped = preprocess(make_record(rng.normal(size=(12, 7000))), PreprocessConfig())
    assert cropped
    _, cropped = preprocess(make_record(rng.normal(size=(12, 4980))), PreprocessConfig())  # within tolerance
    assert not cropped


def test_clean_signal_passes_quality_checks():
    check_quality(np.random.default_rng(4).normal(scale=0.3, size=(12, 5000)), PreprocessConfig())
