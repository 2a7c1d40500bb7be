"""The synthetic consortium, checked from the outside.

Every physiological claim is measured on the written WFDB files with tools that know nothing of
the simulator: wfdb's XQRS detector, scipy filters, and a plain delineation of the median beat
(spatial velocity thresholds), never with the simulator's own parameters.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb
from scipy import signal as sps
from scipy import stats
from wfdb import processing

from ecgtwin.data.record import LEADS
from ecgtwin.data.synthetic import check_conditions, synthesize_consortium
from ecgtwin.errors import UserError

FS = 500.0
SEED = 11
INDEPENDENT = [LEADS.index(name) for name in ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")]
META_COLUMNS = ["record", "patient_id", "site", "conditions", "report", "hr", "age", "sex"]


# --- Measurement (independent of the simulator) -------------------------------------------------


def bandpass(x: np.ndarray, low_hz: float, high_hz: float) -> np.ndarray:
    b, a = sps.butter(2, [low_hz / (FS / 2), high_hz / (FS / 2)], btype="band")
    return sps.filtfilt(b, a, x, axis=-1)


def xqrs_peaks(lead: np.ndarray) -> np.ndarray:
    detector = processing.XQRS(sig=lead, fs=FS)
    detector.detect(verbose=False)
    return np.asarray(detector.qrs_inds, dtype=int)


def detection_signal(signal: np.ndarray) -> np.ndarray:
    """What XQRS runs on, the same for every record: the heart vector's magnitude over the eight
    independent leads (1-40 Hz). Any single lead fails for the patients whose axis is perpendicular
    to it (XQRS then finds nothing: II in some LBBB, V2 in some normal hearts), as in real data."""
    return np.sqrt(np.sum(bandpass(signal[INDEPENDENT], 1.0, 40.0) ** 2, axis=0))


def spatial_velocity(beat: np.ndarray) -> np.ndarray:
    """Speed of the heart vector (mV/s) over the eight independent leads."""
    return np.sqrt(np.sum(np.gradient(beat[INDEPENDENT], axis=1) ** 2, axis=0)) * FS


@dataclasses.dataclass
class Beats:
    """Beats cut around detected peaks and aligned to each other by cross-correlation of the QRS."""

    bands: dict[str, np.ndarray]  # band name -> (beats, 12, samples), all cut at the same aligned starts
    typical: np.ndarray  # bool per beat: QRS correlates > 0.9 with the record's median QRS
    rr_before_s: np.ndarray  # RR interval before each beat (nan for the first detected one)
    rr_after_s: np.ndarray  # RR interval after each beat (nan for the last detected one)
    fiducial: int  # sample index of the detected peak within a segment


def cut_beats(bands: dict[str, np.ndarray], peaks: np.ndarray, before_s: float = 0.6, after_s: float = 0.6) -> Beats:
    """Cut every band at the same starts, aligned on the first band."""
    signal = next(iter(bands.values()))
    before, after, search = int(before_s * FS), int(after_s * FS), int(0.1 * FS)
    rr = np.diff(peaks) / FS
    rr_before, rr_after = np.concatenate([[np.nan], rr]), np.concatenate([rr, [np.nan]])
    keep = (peaks - before - search >= 0) & (peaks + after + search < signal.shape[1])
    peaks, rr_before, rr_after = peaks[keep], rr_before[keep], rr_after[keep]
    first = np.stack([signal[:, p - before : p + after] for p in peaks])
    qrs = slice(before - int(0.1 * FS), before + int(0.1 * FS))
    # Align every beat to one real beat, the one most like the others (a median-similarity medoid,
    # so PVCs are never chosen): a median template of misaligned beats could hold a doubled QRS.
    similarity = np.corrcoef(first[:, :, qrs].reshape(len(peaks), -1))
    reference = first[int(np.argmax(np.median(similarity, axis=1))), :, qrs]
    starts = []
    for p in peaks:
        shifts = range(-search, search + 1)
        scores = [np.sum(signal[:, p - before + d : p + after + d][:, qrs] * reference) for d in shifts]
        starts.append(p - before + shifts[int(np.argmax(scores))])
    cut = {name: np.stack([x[:, s : s + before + after] for s in starts]) for name, x in bands.items()}
    aligned = next(iter(cut.values()))
    template = np.median(aligned[:, :, qrs], axis=0)
    corr = np.array([np.corrcoef(s[:, qrs].ravel(), template.ravel())[0, 1] for s in aligned])
    return Beats(cut, corr > 0.9, rr_before, rr_after, before)


def quiet_from(low: np.ndarray, start: int, step: int, run: int, limit: int) -> int | None:
    """First index walking from `start` by `step` after which `low` holds for `run` samples."""
    for i in range(start, limit, step):
        window = low[i - run : i] if step < 0 else low[i : i + run]
        if window.size == run and np.all(window):
            return i
    return None


def qrs_bounds(beat: np.ndarray, fiducial: int, fraction: float = 0.08) -> tuple[int, int]:
    """QRS onset and offset: where the spatial velocity falls below `fraction` of its QRS peak for 25 ms
    (searched 200 ms before and 300 ms after the peak; failing that, the slowest point there)."""
    sv = spatial_velocity(beat)
    reach = int(0.1 * FS)
    peak = fiducial - reach + int(np.argmax(sv[fiducial - reach : fiducial + reach]))
    low = sv < fraction * sv[peak]
    run = int(0.025 * FS)
    first, last = peak - int(0.2 * FS), peak + int(0.3 * FS)
    onset = quiet_from(low, peak, -1, run, first)
    offset = quiet_from(low, peak, 1, run, last)
    if onset is None:
        onset = first + int(np.argmin(sv[first:peak]))
    if offset is None:
        offset = peak + int(np.argmin(sv[peak:last]))
    return onset, offset


def p_onset(beat_low: np.ndarray, qrs_onset: int, fraction: float = 0.2) -> int | None:
    """P onset: the steepest slope 320-50 ms before QRS onset is the P wave's; walk back until the
    slope stays below `fraction` of it for 10 ms (None if not within 400 ms of QRS onset)."""
    sv = spatial_velocity(beat_low)
    lo, hi = qrs_onset - int(0.32 * FS), qrs_onset - int(0.05 * FS)
    if lo < 0:
        return None
    steepest = lo + int(np.argmax(sv[lo:hi]))
    return quiet_from(sv < fraction * sv[steepest], steepest, -1, int(0.01 * FS), qrs_onset - int(0.4 * FS))


def p_deflection(lead_low: np.ndarray, qrs_onset: int) -> float:
    """Peak-to-peak of a lead 200-40 ms before QRS onset, its linear trend removed (mV)."""
    window = lead_low[qrs_onset - int(0.2 * FS) : qrs_onset - int(0.04 * FS)]
    return float(np.ptp(window - np.linspace(window[0], window[-1], window.size)))


def st_deviation(beat: np.ndarray, onset: int, offset: int, hr_bpm: float) -> np.ndarray:
    """ST level per lead at J+60 ms (J+40 ms above 100 bpm, as usual), relative to the PR segment (mV)."""
    after_j = 0.04 if hr_bpm > 100.0 else 0.06
    return beat[:, offset + int(after_j * FS)] - beat[:, onset - int(0.005 * FS)]


def qrs_voltages(beat: np.ndarray, onset: int, offset: int) -> tuple[float, float]:
    """Sokolow-Lyon index (S in V1 + the larger R in V5/V6) and the 12-lead sum of QRS peak-to-peak (mV)."""
    qrs = beat[:, onset:offset] - beat[:, onset - int(0.005 * FS), None]
    lead = {name: qrs[i] for i, name in enumerate(LEADS)}
    sokolow = -lead["V1"].min() + max(lead["V5"].max(), lead["V6"].max())
    return float(sokolow), float(np.ptp(qrs, axis=1).sum())


def early_wide_beats(beats: Beats, wide_ms: float = 120.0) -> list[tuple[float, float, float]]:
    """Atypical beats that come early (RR < 85% of the normal RR), as (RR before, RR after, normal RR) in s,
    keeping those with a QRS wider than `wide_ms` (measured on that single beat, 0.5-25 Hz)."""
    normal_pairs = beats.typical[1:] & beats.typical[:-1]
    if not normal_pairs.any():
        return []
    normal_rr = float(np.nanmedian(beats.rr_before_s[1:][normal_pairs]))
    found = []
    for i in np.flatnonzero(~beats.typical):
        before, after = beats.rr_before_s[i], beats.rr_after_s[i]
        if np.isfinite(before) and np.isfinite(after) and before < 0.85 * normal_rr:
            onset, offset = qrs_bounds(beats.bands["smooth"][i], beats.fiducial)
            if (offset - onset) / FS * 1000.0 > wide_ms:
                found.append((float(before), float(after), normal_rr))
    return found


@dataclasses.dataclass
class Measurement:
    record: str
    patient_id: str
    codes: set[str]
    hr_meta: float
    hr: float
    rr_cv: float
    qrs_ms: float
    pr_ms: float | None
    p_deflection_mv: float | None  # None if fewer than 3 beats leave the P window clear of the last T
    sokolow_mv: float
    voltage_sum_mv: float
    st_mv: np.ndarray = dataclasses.field(repr=False)  # per lead, at J+60 ms (J+40 above 100 bpm), from the PR level
    early_wide: list[tuple[float, float, float]] = dataclasses.field(repr=False)
    median_beat: np.ndarray = dataclasses.field(repr=False)  # 0.5-40 Hz, (12, samples)
    qrs_onset: int = dataclasses.field(repr=False)


def measure(signal: np.ndarray) -> dict:
    peaks = xqrs_peaks(detection_signal(signal))
    rr = np.diff(peaks) / FS
    bands = {name: bandpass(signal, 0.5, high) for name, high in (("wide", 40.0), ("smooth", 25.0), ("low", 15.0))}
    beats = cut_beats(bands, peaks)
    typical = beats.typical if beats.typical.sum() >= 3 else np.ones_like(beats.typical)
    median = np.median(beats.bands["wide"][typical], axis=0)
    median_low = np.median(beats.bands["low"][typical], axis=0)
    onset, offset = qrs_bounds(median, beats.fiducial)
    p_start = p_onset(median_low, onset)
    # A short RR puts the previous T wave into the P window; judge P waves on beats after >= 650 ms.
    clear = typical & (np.nan_to_num(beats.rr_before_s) >= 0.65)
    deflection = None
    if clear.sum() >= 3:
        deflection = p_deflection(np.median(beats.bands["low"][clear], axis=0)[LEADS.index("II")], onset)
    sokolow, voltage_sum = qrs_voltages(median, onset, offset)
    return dict(
        hr=float(60.0 / rr.mean()),
        rr_cv=float(rr.std() / rr.mean()),
        qrs_ms=(offset - onset) / FS * 1000.0,
        pr_ms=None if p_start is None else (onset - p_start) / FS * 1000.0,
        p_deflection_mv=deflection,
        sokolow_mv=sokolow,
        voltage_sum_mv=voltage_sum,
        st_mv=st_deviation(median, onset, offset, 60.0 / rr.mean()),
        early_wide=early_wide_beats(beats),
        median_beat=median,
        qrs_onset=onset,
    )


# --- Fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def consortium(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("consortium")
    summary = synthesize_consortium(out, sites=3, patients_per_site=20, records_per_patient=3, seed=SEED)
    return out, summary


@pytest.fixture(scope="module")
def metadata(consortium: tuple[Path, dict]) -> pd.DataFrame:
    out, summary = consortium
    types = {"patient_id": str, "record": str}
    frames = [pd.read_csv(out / site / "metadata.csv", dtype=types) for site in summary["sites"]]
    return pd.concat(frames, ignore_index=True)


@pytest.fixture(scope="module")
def measurements(consortium: tuple[Path, dict], metadata: pd.DataFrame) -> list[Measurement]:
    out, _ = consortium
    results = []
    for row in metadata.itertuples():
        signal = wfdb.rdrecord(str(out / row.site / row.record)).p_signal.T
        results.append(
            Measurement(
                record=row.record,
                patient_id=row.patient_id,
                codes=set(row.conditions.split(";")),
                hr_meta=float(row.hr),
                **measure(signal),
            )
        )
    return results


def having(measurements: list[Measurement], *codes: str, without: tuple[str, ...] = ()) -> list[Measurement]:
    return [m for m in measurements if set(codes) <= m.codes and not (set(without) & m.codes)]


# --- Files and metadata -------------------------------------------------------------------------


def test_records_read_back_as_12_lead_wfdb(consortium: tuple[Path, dict], metadata: pd.DataFrame) -> None:
    out, summary = consortium
    assert summary["sites"] == ["site_a", "site_b", "site_c"]
    assert summary["records"] == len(metadata) == 3 * 20 * 3
    for site in summary["sites"]:
        columns = list(pd.read_csv(out / site / "metadata.csv", nrows=0).columns)
        assert columns[:8] == META_COLUMNS and "recording_time" in columns
    for row in metadata.itertuples():
        record = wfdb.rdrecord(str(out / row.site / row.record))
        assert record.sig_name == list(LEADS)
        assert record.fs == FS and record.sig_len == 5000
        assert all(unit == "mV" for unit in record.units)
        fields = dict(line.split(": ", 1) for line in record.comments)
        assert fields["Age"] == str(row.age) and fields["Sex"] == row.sex
        assert fields["Conditions"] == row.conditions and fields["Report"] == row.report
        assert float(fields["HR"]) == pytest.approx(row.hr)


def test_metadata_is_consistent(consortium: tuple[Path, dict], metadata: pd.DataFrame) -> None:
    _, summary = consortium
    assert metadata["record"].is_unique
    assert metadata.groupby("patient_id")["site"].nunique().max() == 1, "a patient id is shared between sites"
    assert set(metadata["sex"]) <= {"F", "M"}
    assert metadata["age"].between(18, 110).all()
    for _, visits in metadata.groupby("patient_id"):
        times = pd.to_datetime(visits["recording_time"], format="ISO8601").tolist()
        assert times == sorted(times) and len(set(times)) == len(times)
        assert visits["sex"].nunique() == 1 and visits["age"].is_monotonic_increasing
    rhythms = {"NSR", "SB", "ST", "AF"}
    for row in metadata.itertuples():
        codes = row.conditions.split(";")
        assert len(rhythms.intersection(codes)) == 1, row.conditions
        assert not {"LBBB", "RBBB"} <= set(codes) and not {"AF", "1AVB"} <= set(codes)
        if "SB" in codes:
            assert row.hr < 60
        if "ST" in codes:
            assert row.hr > 100
        if "NSR" in codes:
            assert 60 <= row.hr <= 100
    exploded = metadata.assign(code=metadata["conditions"].str.split(";")).explode("code")
    counted = exploded.groupby(["site", "code"]).size()
    assert summary["condition_counts"] == {site: counted[site].to_dict() for site in summary["sites"]}


def test_condition_rules_reject_impossible_sets() -> None:
    check_conditions(["AF", "LBBB", "LVH"])
    check_conditions(["SB", "1AVB", "RBBB", "PVC"])
    for impossible in (["NSR", "SB"], ["AF", "1AVB"], ["NSR", "LBBB", "RBBB"], ["LVH"], ["NSR", "XYZ"]):
        with pytest.raises(ValueError):
            check_conditions(impossible)


def test_einthoven_and_goldberger_hold(consortium: tuple[Path, dict], metadata: pd.DataFrame) -> None:
    out, _ = consortium
    quantum = 0.0015 + 1e-9  # three leads each rounded to 1 uV
    for row in metadata.head(20).itertuples():
        s = dict(zip(LEADS, wfdb.rdrecord(str(out / row.site / row.record)).p_signal.T))
        assert np.max(np.abs(s["II"] - (s["I"] + s["III"]))) <= quantum
        assert np.max(np.abs(s["aVR"] + s["aVL"] + s["aVF"])) <= quantum
        assert np.max(np.abs(s["aVF"] - (s["II"] + s["III"]) / 2)) <= quantum + 0.0005


def test_same_seed_same_files_other_seed_other_files(tmp_path: Path) -> None:
    def digest(directory: Path) -> dict[str, str]:
        files = sorted(p for p in directory.rglob("*") if p.is_file())
        return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}

    kwargs = dict(sites=2, patients_per_site=2, records_per_patient=2)
    synthesize_consortium(tmp_path / "one", seed=3, **kwargs)
    synthesize_consortium(tmp_path / "two", seed=3, **kwargs)
    synthesize_consortium(tmp_path / "three", seed=4, **kwargs)
    one, two, three = digest(tmp_path / "one"), digest(tmp_path / "two"), digest(tmp_path / "three")
    assert one == two
    assert one.keys() == three.keys()
    assert all(one[name] != three[name] for name in one if name.endswith(".dat"))


def test_a_consortium_grows_by_more_sites_without_changing_the_first(tmp_path: Path) -> None:
    """bench.privacy_utility --sites 10 grows sites d-j beside a-c: a site's files must not depend on
    which other sites were written with it."""
    def digest(directory: Path) -> dict[str, str]:
        return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(directory.rglob("*")) if p.is_file()}

    kwargs = dict(patients_per_site=2, records_per_patient=2, seed=5)
    whole = synthesize_consortium(tmp_path / "whole", sites=4, **kwargs)
    synthesize_consortium(tmp_path / "first", sites=2, **kwargs)
    grown = synthesize_consortium(tmp_path / "grown", sites=2, first_site=2, **kwargs)
    assert grown["sites"] == whole["sites"][2:] == ["site_c", "site_d"]
    assert grown["site_kinds"] == {s: whole["site_kinds"][s] for s in grown["sites"]}
    assert {**digest(tmp_path / "first"), **digest(tmp_path / "grown")} == digest(tmp_path / "whole")
    with pytest.raises(UserError, match="first_site"):
        synthesize_consortium(tmp_path / "bad", sites=1, first_site=-1, **kwargs)


# --- Physiology, measured -----------------------------------------------------------------------


def test_heart_rate_matches_xqrs(measurements: list[Measurement]) -> None:
    regular = having(measurements, without=("AF", "PVC"))
    failures = [
        f"{m.record} {sorted(m.codes)}: metadata {m.hr_meta:.1f}, XQRS {m.hr:.1f}"
        for m in regular
        if abs(m.hr - m.hr_meta) > 5.0
    ]
    assert len(regular) >= 60
    assert len(failures) <= 0.05 * len(regular), "\n".join(failures)


def test_atrial_fibrillation_is_irregular_without_p_waves(measurements: list[Measurement]) -> None:
    fibrillation = having(measurements, "AF")
    assert len(fibrillation) >= 5
    # RR CV in AF is about 0.2-0.3; ten intervals can sample a little lower now and then.
    irregular = [m.rr_cv > 0.1 for m in fibrillation]
    assert np.mean(irregular) >= 0.9, [(m.record, round(m.rr_cv, 3)) for m in fibrillation]
    assert np.median([m.rr_cv for m in fibrillation]) > 0.15
    sinus_records = having(measurements, "NSR", without=("1AVB", "PVC"))
    sinus = [m.p_deflection_mv for m in sinus_records if m.p_deflection_mv is not None]
    af = [m.p_deflection_mv for m in fibrillation if m.p_deflection_mv is not None]
    assert len(af) >= 4 and len(sinus) >= 30
    assert np.median(af) < 0.5 * np.median(sinus), (np.median(af), np.median(sinus))
    low_sinus = np.percentile(sinus, 10)
    assert np.mean(np.array(af) < low_sinus) >= 0.9, (sorted(af), low_sinus)
    regular = [m.rr_cv for m in having(measurements, "NSR", without=("PVC",))]
    assert np.median(regular) < 0.05


def test_bundle_branch_blocks_widen_qrs(measurements: list[Measurement]) -> None:
    blocks = having(measurements, "LBBB", without=("PVC",)) + having(measurements, "RBBB", without=("PVC",))
    assert len(having(measurements, "LBBB")) >= 2 and len(having(measurements, "RBBB")) >= 2 and len(blocks) >= 3
    narrow = [m for m in having(measurements, without=("LBBB", "RBBB", "PVC", "STE"))]
    wide_failures = [(m.record, m.qrs_ms) for m in blocks if m.qrs_ms <= 120.0]
    narrow_failures = [(m.record, m.qrs_ms) for m in narrow if m.qrs_ms >= 120.0]
    assert not wide_failures, wide_failures
    assert len(narrow_failures) <= 0.02 * len(narrow), narrow_failures


def test_first_degree_block_prolongs_pr(measurements: list[Measurement]) -> None:
    """PR > 200 ms with 1AVB, < 200 ms without (allowing a few delineation failures either way)."""
    blocked = having(measurements, "1AVB")
    normal = [m for m in having(measurements, without=("1AVB", "AF", "PVC")) if m.hr <= 85.0]
    assert len(blocked) >= 2
    long_pr = [m.pr_ms is not None and m.pr_ms > 200.0 for m in blocked]
    short_pr = [m.pr_ms is not None and m.pr_ms < 200.0 for m in normal]
    assert np.mean(long_pr) >= 0.8, [(m.record, m.pr_ms) for m in blocked]
    assert np.mean(short_pr) >= 0.9, [(m.record, m.pr_ms) for m, ok in zip(normal, short_pr) if not ok]
    assert np.median([m.pr_ms for m in blocked if m.pr_ms]) > 230.0
    assert np.median([m.pr_ms for m in normal if m.pr_ms]) < 190.0


def test_hypertrophy_raises_qrs_voltage(measurements: list[Measurement]) -> None:
    """The 12-lead QRS voltage sum is clearly larger with LVH, and more LVH records meet Sokolow-Lyon
    (> 3.5 mV; it depends on the axis, so it misses some vertical or posterior hearts, as in life)."""
    lvh = having(measurements, "LVH", without=("LBBB", "RBBB"))
    other = having(measurements, without=("LVH", "LBBB", "RBBB"))
    assert len(lvh) >= 5
    ratio = np.median([m.voltage_sum_mv for m in lvh]) / np.median([m.voltage_sum_mv for m in other])
    assert ratio > 1.5, ratio
    meets_sokolow = [np.mean([m.sokolow_mv > 3.5 for m in group]) for group in (lvh, other)]
    assert meets_sokolow[0] > max(0.3, 2.0 * meets_sokolow[1]), meets_sokolow


def test_st_elevation_is_visible(measurements: list[Measurement]) -> None:
    """STE: the ST segment stands >= 0.2 mV above the PR level in >= 2 leads."""

    def elevated(m: Measurement) -> bool:
        return int(np.sum(m.st_mv >= 0.2)) >= 2

    injured = having(measurements, "STE", without=("LBBB",))
    plain = having(measurements, without=("STE", "LBBB", "RBBB", "LVH", "PVC"))
    assert len(injured) >= 5
    missed = [(m.record, np.round(m.st_mv, 2)) for m in injured if not elevated(m)]
    assert len(missed) <= 0.1 * len(injured), missed
    assert np.mean([elevated(m) for m in plain]) <= 0.15


def test_pvcs_are_early_wide_with_compensatory_pause(measurements: list[Measurement]) -> None:
    def compensated(m: Measurement) -> bool:
        return any(abs(before + after - 2.0 * normal) < 0.15 * normal for before, after, normal in m.early_wide)

    ectopic = having(measurements, "PVC")
    sinus = having(measurements, without=("PVC", "AF"))
    assert len(ectopic) >= 5
    assert np.mean([compensated(m) for m in ectopic]) >= 0.75, [m.record for m in ectopic if not compensated(m)]
    assert np.mean([bool(m.early_wide) for m in sinus]) <= 0.05, [m.record for m in sinus if m.early_wide]


def test_patients_are_recognisable_across_recordings(measurements: list[Measurement]) -> None:
    """The amplitude-normalised 12-lead median beat is nearer to the same patient's other recordings."""
    features = []
    for m in measurements:
        window = m.median_beat[:, m.qrs_onset - int(0.15 * FS) : m.qrs_onset + int(0.45 * FS)]
        window = window - np.median(window, axis=1, keepdims=True)
        features.append((window / np.linalg.norm(window)).ravel())
    x = np.stack(features)
    patients = np.array([m.patient_id for m in measurements])
    squared = np.sum(x**2, axis=1)
    distance = np.sqrt(np.maximum(squared[:, None] + squared[None, :] - 2.0 * x @ x.T, 0.0))
    np.fill_diagonal(distance, np.inf)
    nearest_is_same = patients[np.argmin(distance, axis=1)] == patients
    mostly_nearest, closer_within = [], []
    for patient in np.unique(patients):
        mine = patients == patient
        mostly_nearest.append(nearest_is_same[mine].mean() >= 0.5)
        within = distance[np.ix_(mine, mine)][np.isfinite(distance[np.ix_(mine, mine)])].mean()
        closer_within.append(within < distance[np.ix_(mine, ~mine)].mean())
    # Conditions change the beat on purpose (a bundle branch block acquired at a later visit, AF), so
    # not every recording's nearest neighbour can be its own patient; most must be.
    assert np.mean(mostly_nearest) > 0.8, np.mean(mostly_nearest)
    assert np.mean(closer_within) > 0.9, np.mean(closer_within)
    assert nearest_is_same.mean() > 0.7, nearest_is_same.mean()


# --- Sites and reports --------------------------------------------------------------------------


def test_sites_are_not_iid(metadata: pd.DataFrame) -> None:
    exploded = metadata.assign(code=metadata["conditions"].str.split(";")).explode("code")
    table = pd.crosstab(exploded["site"], exploded["code"])
    _, p_value, _, _ = stats.chi2_contingency(table.to_numpy())
    assert p_value < 1e-3, table
    shares = table.div(table.sum(axis=1), axis=0)
    sites = list(shares.index)
    for i, a in enumerate(sites):
        for b in sites[i + 1 :]:
            assert 0.5 * np.abs(shares.loc[a] - shares.loc[b]).sum() > 0.15, (a, b)
    ages = metadata.groupby("site")["age"].mean()
    assert ages["site_b"] - ages["site_a"] > 10, ages


def test_reports_read_like_machine_statements(metadata: pd.DataFrame) -> None:
    for row in metadata.itertuples():
        statements = row.report.rstrip(".").split(". ")
        codes = row.conditions.split(";")
        assert row.report.endswith(".") and all(statements)
        assert ("Normal ECG" in statements) == (codes == ["NSR"]), row.report
        if "AF" in codes:
            assert statements[0].startswith("Atrial fibrillation")
        if "SB" in codes:
            assert statements[0].startswith("Marked sinus bradycardia" if row.hr < 50 else "Sinus bradycardia")
        if "LBBB" in codes:
            assert "Left bundle branch block" in statements
    normal_reports = set(metadata.loc[metadata["conditions"] == "NSR", "report"])
    assert len(normal_reports) >= 2, "phrasing never varies"
