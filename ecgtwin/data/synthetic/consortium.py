"""A synthetic consortium of hospitals: patients, their recordings over time, WFDB files on disk.

Sites are named site_a, site_b, ... and differ on purpose (non-IID), cycling through four kinds:

    site_a  general practice      younger (44 +- 15 y), mostly normal, some slow hearts
    site_b  cardiology ward       older (68 +- 11 y), bundle branch blocks, LVH, AV block, AF
    site_c  emergency department  mixed ages (57 +- 19 y), tachycardia, AF, ST elevation, PVCs
    site_d  district hospital     middle-aged (58 +- 16 y), a bit of everything

(site_e is a general practice again, and so on.) The sites also differ in their equipment: noise,
mains frequency and baseline wander.

PUBLIC_PROFILE is the population a public foundation model is pretrained on (`ecgtwin pretrain --source
synthetic`): another mix than any site, 60 Hz mains, and never a left bundle branch block, so that what a
site's private fine-tuning adds can be seen.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import string
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ecgtwin.data.synthetic.conditions import (
    ST_TERRITORIES,
    ConditionPlan,
    beat_train,
    beat_waves,
    check_conditions,
    fibrillatory_waves,
    machine_report,
)
from ecgtwin.data.synthetic.heart import (
    Acquisition,
    Breathing,
    HeartTraits,
    breathe,
    draw_acquisition,
    draw_breathing,
    draw_heart_traits,
    record_leads,
    render_dipole,
)
from ecgtwin.data.wfdb_io import write_wfdb
from ecgtwin.errors import UserError

METADATA_COLUMNS: tuple[str, ...] = (
    "record", "patient_id", "site", "conditions", "report", "hr", "age", "sex", "recording_time"
)


@dataclasses.dataclass(frozen=True)
class SiteProfile:
    """Who comes to a site, what they have, and what the site's electrocardiographs add."""

    kind: str
    age_mean: float
    age_sd: float
    female_fraction: float
    # Chronic findings: a patient has them from some recording on (probability per patient).
    chronic: dict[str, float]
    paroxysmal_af: float  # per patient; such a patient is in AF in about half of the recordings
    pvc_prone: float  # per patient
    slow_heart: float  # per patient: resting rate 44-58 (athletes, beta blockers, conduction disease)
    # Acute states (probability per recording).
    tachycardia: float
    st_elevation: float
    sporadic_pvc: float
    af_rate_bpm: tuple[float, float]  # ventricular rate in AF
    # Equipment.
    white_noise_mv: float
    mains_hz: float
    mains_mv: float
    wander_mv: float
    days_between_visits: float


SITE_PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile(
        kind="general practice", age_mean=44.0, age_sd=15.0, female_fraction=0.56,
        chronic={"LBBB": 0.02, "RBBB": 0.03, "LVH": 0.06, "1AVB": 0.06},
        paroxysmal_af=0.03, pvc_prone=0.06, slow_heart=0.18,
        tachycardia=0.05, st_elevation=0.0, sporadic_pvc=0.03, af_rate_bpm=(65.0, 110.0),
        white_noise_mv=0.008, mains_hz=50.0, mains_mv=0.01, wander_mv=0.05, days_between_visits=300.0,
    ),
    SiteProfile(
        kind="cardiology ward", age_mean=68.0, age_sd=11.0, female_fraction=0.4,
        chronic={"LBBB": 0.22, "RBBB": 0.18, "LVH": 0.35, "1AVB": 0.22},
        paroxysmal_af=0.22, pvc_prone=0.2, slow_heart=0.22,
        tachycardia=0.04, st_elevation=0.03, sporadic_pvc=0.05, af_rate_bpm=(60.0, 105.0),
        white_noise_mv=0.01, mains_hz=50.0, mains_mv=0.015, wander_mv=0.08, days_between_visits=120.0,
    ),
    SiteProfile(
        kind="emergency department", age_mean=57.0, age_sd=19.0, female_fraction=0.47,
        chronic={"LBBB": 0.05, "RBBB": 0.06, "LVH": 0.1, "1AVB": 0.06},
        paroxysmal_af=0.35, pvc_prone=0.15, slow_heart=0.08,
        tachycardia=0.35, st_elevation=0.22, sporadic_pvc=0.08, af_rate_bpm=(80.0, 140.0),
        white_noise_mv=0.018, mains_hz=50.0, mains_mv=0.02, wander_mv=0.15, days_between_visits=60.0,
    ),
    SiteProfile(
        kind="district hospital", age_mean=58.0, age_sd=16.0, female_fraction=0.5,
        chronic={"LBBB": 0.08, "RBBB": 0.08, "LVH": 0.15, "1AVB": 0.1},
        paroxysmal_af=0.12, pvc_prone=0.1, slow_heart=0.12,
        tachycardia=0.12, st_elevation=0.06, sporadic_pvc=0.05, af_rate_bpm=(65.0, 125.0),
        white_noise_mv=0.012, mains_hz=60.0, mains_mv=0.015, wander_mv=0.1, days_between_visits=200.0,
    ),
)


# The public corpus: no LBBB at all, fewer of the ward's chronic findings, more of the emergency's acute ones.
PUBLIC_PROFILE = SiteProfile(
    kind="public corpus", age_mean=52.0, age_sd=17.0, female_fraction=0.5,
    chronic={"RBBB": 0.08, "LVH": 0.12, "1AVB": 0.08},
    paroxysmal_af=0.18, pvc_prone=0.1, slow_heart=0.15,
    tachycardia=0.18, st_elevation=0.08, sporadic_pvc=0.05, af_rate_bpm=(60.0, 140.0),
    white_noise_mv=0.012, mains_hz=60.0, mains_mv=0.012, wander_mv=0.1, days_between_visits=150.0,
)


def site_name(index: int) -> str:
    """0 -> 'site_a', 25 -> 'site_z', 26 -> 'site_aa', ..."""
    return f"site_{_letters(index)}"


def _letters(index: int) -> str:
    letters = ""
    index += 1
    while index:
        index, rest = divmod(index - 1, 26)
        letters = string.ascii_lowercase[rest] + letters
    return letters


# --- Patients ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticPatient:
    """A person and the course of their findings over their recordings."""

    patient_id: str
    site: str
    sex: str
    age_years: float  # at the first recording
    heart: HeartTraits
    chronic_onset: dict[str, int]  # chronic code -> index of the first recording that shows it
    paroxysmal_af: bool
    pvc_prone: bool
    lvh_strain: bool  # whether this person's hypertrophy, if any, comes with repolarisation change
    visit_times: list[dt.datetime]


def draw_patient(
    rng: np.random.Generator, profile: SiteProfile, patient_id: str, site: str, n_records: int
) -> SyntheticPatient:
    """A new patient of a site: demographics, a heart, and which findings they have or will acquire."""
    sex = "F" if rng.random() < profile.female_fraction else "M"
    age = float(np.clip(rng.normal(profile.age_mean, profile.age_sd), 18.0, 95.0))
    heart = draw_heart_traits(rng, age, sex)
    if rng.random() < profile.slow_heart:
        heart = dataclasses.replace(heart, resting_hr_bpm=rng.uniform(44.0, 58.0))
    chronic_onset = {}
    for code, probability in profile.chronic.items():
        if rng.random() < probability:
            # Most arrive with the finding; some acquire it during follow-up.
            chronic_onset[code] = 0 if rng.random() < 0.6 or n_records == 1 else int(rng.integers(1, n_records))
    if "LBBB" in chronic_onset and "RBBB" in chronic_onset:
        del chronic_onset[str(rng.choice(["LBBB", "RBBB"]))]
    return SyntheticPatient(
        patient_id=patient_id,
        site=site,
        sex=sex,
        age_years=age,
        heart=heart,
        chronic_onset=chronic_onset,
        paroxysmal_af=bool(rng.random() < profile.paroxysmal_af),
        pvc_prone=bool(rng.random() < profile.pvc_prone),
        lvh_strain=bool(rng.random() < 0.5),
        visit_times=_visit_times(rng, n_records, profile.days_between_visits),
    )


def _visit_times(rng: np.random.Generator, n: int, mean_gap_days: float) -> list[dt.datetime]:
    first = dt.datetime(2012, 1, 1) + dt.timedelta(days=int(rng.integers(0, 11 * 365)))
    gaps = np.concatenate([[0.0], 1.0 + rng.exponential(mean_gap_days, size=n - 1)])
    days = np.cumsum(gaps)
    minutes = rng.integers(7 * 60, 22 * 60, size=n)
    return [first + dt.timedelta(days=float(d), minutes=int(m)) for d, m in zip(days, minutes)]


def plan_recording(
    patient: SyntheticPatient, index: int, profile: SiteProfile, rng: np.random.Generator
) -> ConditionPlan:
    """The conditions of the patient's `index`-th recording: chronic findings persist, acute ones come and go."""
    chronic = {code for code, onset in patient.chronic_onset.items() if onset <= index}
    af = patient.paroxysmal_af and rng.random() < 0.5
    tachycardia = not af and rng.random() < profile.tachycardia
    if af:
        rate = rng.uniform(*profile.af_rate_bpm)
    elif tachycardia:
        rate = rng.uniform(104.0, 150.0)
    else:
        rate = patient.heart.resting_hr_bpm * rng.lognormal(0.0, 0.05)
    bundle = next((code for code in ("LBBB", "RBBB") if code in chronic), None)
    st_elevation = bundle != "LBBB" and rng.random() < profile.st_elevation
    pvc = not af and rng.random() < (0.6 if patient.pvc_prone else profile.sporadic_pvc)
    return ConditionPlan(
        atrial_fibrillation=af,
        rate_bpm=rate,
        first_degree_block="1AVB" in chronic and not af and rate < 80.0,
        bundle_branch_block=bundle,
        hypertrophy="LVH" in chronic,
        strain="LVH" in chronic and patient.lvh_strain,
        st_territory=str(rng.choice(ST_TERRITORIES)) if st_elevation else None,
        pvc_count=int(rng.integers(1, 3)) if pvc else 0,
    )


# --- One recording ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class SyntheticECG:
    """A simulated 12-lead recording with its ground truth."""

    signal: np.ndarray  # (12, n) mV, LEADS order
    fs: float
    hr_bpm: float  # 60 / mean RR of the beats inside the strip
    codes: list[str]
    report: str
    r_peaks_s: np.ndarray  # true R-peak times inside the strip
    pr_s: float  # true PR interval (nan in AF)
    qrs_s: float  # true QRS duration of the conducted beats


def simulate_ecg(
    heart: HeartTraits,
    plan: ConditionPlan,
    rng: np.random.Generator,
    acquisition: Acquisition,
    fs: float = 500.0,
    duration_s: float = 10.0,
    breathing: Breathing | None = None,
) -> SyntheticECG:
    """Simulate one recording of `heart` under `plan` (usable on its own, e.g. for ground-truth twins)."""
    breathing = breathing or draw_breathing(rng)
    n_samples = int(round(duration_s * fs))
    t = np.arange(n_samples) / fs
    waves = beat_waves(plan, heart, rng)
    train = beat_train(plan, rng, duration_s, breathing)
    dipole = render_dipole(n_samples, fs, train, waves.atrial, waves.conducted, waves.ectopic, heart.orientation)
    if plan.atrial_fibrillation:
        dipole += heart.orientation @ fibrillatory_waves(rng, t)
    signal = record_leads(rng, breathe(dipole, t, breathing), t, acquisition, breathing)
    hr = round(train.mean_hr_bpm(duration_s), 1)  # the value written, so that labels agree with it
    # Label what the strip shows: PVCs only if one falls inside it.
    ectopic_inside = (train.ectopic_times >= 0.0) & (train.ectopic_times < duration_s)
    plan = dataclasses.replace(plan, pvc_count=int(ectopic_inside.sum()))
    codes = plan.codes(hr)
    check_conditions(codes)
    r_peaks = train.r_times()
    return SyntheticECG(
        signal=signal,
        fs=fs,
        hr_bpm=hr,
        codes=codes,
        report=machine_report(codes, hr, plan, rng),
        r_peaks_s=r_peaks[(r_peaks >= 0.0) & (r_peaks < duration_s)],
        pr_s=float("nan") if plan.atrial_fibrillation else waves.pr_s,
        qrs_s=waves.qrs_s,
    )


# --- The consortium ---------------------------------------------------------------------------


def synthesize_consortium(
    out: Path,
    sites: int = 3,
    patients_per_site: int = 20,
    records_per_patient: int = 3,
    seed: int = 0,
    fs: float = 500.0,
    duration_s: float = 10.0,
    progress: bool = False,
    profiles: tuple[SiteProfile, ...] = SITE_PROFILES,
    first_site: int = 0,
) -> dict:
    """Write a synthetic consortium as WFDB records: out/<site>/<record>.hea/.dat + out/<site>/metadata.csv.

    Deterministic given `seed` (every patient and recording has its own seeded generator). Returns
    a summary: site names, counts, condition counts per site, and the time it took. Site i follows
    `profiles[i % len(profiles)]`. `first_site`: the sites' indices start there, so a consortium grows by
    more sites (the same seed gives every site the same patients, whatever the others).
    """
    if sites < 1 or patients_per_site < 1 or records_per_patient < 1 or first_site < 0:
        raise UserError("sites, patients_per_site and records_per_patient must all be at least 1, "
                        "first_site at least 0")
    if fs < 50.0 or duration_s < 1.0:
        raise UserError(f"need fs >= 50 Hz and duration_s >= 1 s, got fs={fs}, duration_s={duration_s}")
    out = Path(out)
    start = time.perf_counter()
    indices = range(first_site, first_site + sites)
    names = [site_name(i) for i in indices]
    counts: dict[str, dict[str, int]] = {}
    with tqdm(total=sites * patients_per_site * records_per_patient, disable=not progress, unit="rec") as bar:
        for site_index, site in zip(indices, names):
            rows = _write_site(
                out / site, profiles[site_index % len(profiles)], site_index, site, patients_per_site,
                records_per_patient, seed, fs, duration_s, bar,
            )
            counts[site] = _condition_counts(rows)
    seconds = time.perf_counter() - start
    n_records = sites * patients_per_site * records_per_patient
    return {
        "out": str(out),
        "sites": names,
        "site_kinds": {site: profiles[i % len(profiles)].kind for i, site in zip(indices, names)},
        "patients": sites * patients_per_site,
        "records": n_records,
        "condition_counts": counts,
        "seconds": seconds,
        "records_per_s": n_records / seconds if seconds > 0 else float("inf"),
    }


def _write_site(
    directory: Path,
    profile: SiteProfile,
    site_index: int,
    site: str,
    n_patients: int,
    n_records: int,
    seed: int,
    fs: float,
    duration_s: float,
    bar: tqdm,
) -> list[dict[str, str]]:
    prefix = _letters(site_index)
    rows = []
    for patient_index in range(n_patients):
        patient_rng = np.random.default_rng([seed, site_index, patient_index])
        patient = draw_patient(patient_rng, profile, f"{prefix}{patient_index + 1:04d}", site, n_records)
        for k in range(n_records):
            rng = np.random.default_rng([seed, site_index, patient_index, k + 1])
            rows.append(_write_record(directory, patient, k, profile, rng, fs, duration_s))
            bar.update(1)
    _write_metadata(directory / "metadata.csv", rows)
    return rows


def _write_record(
    directory: Path,
    patient: SyntheticPatient,
    index: int,
    profile: SiteProfile,
    rng: np.random.Generator,
    fs: float,
    duration_s: float,
) -> dict[str, str]:
    plan = plan_recording(patient, index, profile, rng)
    acquisition = draw_acquisition(rng, profile.white_noise_mv, profile.mains_hz, profile.mains_mv, profile.wander_mv)
    ecg = simulate_ecg(patient.heart, plan, rng, acquisition, fs, duration_s)
    when = patient.visit_times[index]
    age = int(patient.age_years + (when - patient.visit_times[0]).days / 365.25)
    row = {
        "record": f"{patient.patient_id}_{index + 1:02d}",
        "patient_id": patient.patient_id,
        "site": patient.site,
        "conditions": ";".join(ecg.codes),
        "report": ecg.report,
        "hr": f"{ecg.hr_bpm:.1f}",
        "age": str(age),
        "sex": patient.sex,
        "recording_time": when.isoformat(timespec="seconds"),
    }
    comments = [
        f"Age: {row['age']}",
        f"Sex: {row['sex']}",
        f"HR: {row['hr']}",
        f"Conditions: {row['conditions']}",
        f"Report: {row['report']}",
        f"Patient: {row['patient_id']}",
        f"Site: {row['site']}",
        f"Recording time: {row['recording_time']}",
    ]
    write_wfdb(directory, row["record"], ecg.signal, fs, comments)
    return row


def _write_metadata(path: Path, rows: list[dict[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(METADATA_COLUMNS))
        writer.writeheader()
        writer.writerows(rows)


def _condition_counts(rows: list[dict[str, str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for row in rows:
        for code in row["conditions"].split(";"):
            counts[code] = counts.get(code, 0) + 1
    return dict(sorted(counts.items()))
