"""The heart as a moving electric dipole, and the twelve leads that watch it.

Body axes: x points to the patient's left, y to the feet, z forward (anterior). In the frontal
plane (x, y) angles follow the hexaxial convention clinicians draw: 0 deg is lead I (leftward),
+90 deg is aVF (downward), -90 deg is up. "Anterior" angles lift a direction out of the frontal
plane towards the chest wall (negative: towards the back).

The cardiac dipole d(t) is a sum of Gaussian waves, one per activation phase of every beat, each
with its own 3-D direction (the idea of McSharry et al. 2003 and Sameni et al. 2007, written
here from scratch):

    P   atrial depolarisation, in two halves (right atrium, then left atrium)
    Q   septal depolarisation, left to right
    R   depolarisation of the ventricular free walls (the electrical axis)
    S   late depolarisation of the basal ventricles
    T   ventricular repolarisation, in two halves (a slow rise, then the steeper fall)

A lead records the dot product of d(t) with its lead vector. As on a real electrocardiograph only
eight channels are independent (I, II, V1-V6); III, aVR, aVL and aVF are computed from I and II,
so Einthoven's and Goldberger's relations hold exactly, noise included.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ecgtwin.data.record import LEADS

ATRIAL = "atrial"
DEPOLARISATION = "depolarisation"
REPOLARISATION = "repolarisation"  # these waves move with the QT interval, which shortens with rate


def direction(frontal_deg: float, anterior_deg: float = 0.0) -> np.ndarray:
    """Unit vector at `frontal_deg` in the frontal plane, tilted `anterior_deg` towards the chest wall."""
    frontal, anterior = np.radians(frontal_deg), np.radians(anterior_deg)
    return np.array([np.cos(anterior) * np.cos(frontal), np.cos(anterior) * np.sin(frontal), np.sin(anterior)])


def frontal_angle(vector: np.ndarray) -> float:
    """Direction of `vector` in the frontal plane, hexaxial degrees."""
    return float(np.degrees(np.arctan2(vector[1], vector[0])))


def anterior_angle(vector: np.ndarray) -> float:
    """Elevation of `vector` towards the chest wall, degrees."""
    return float(np.degrees(np.arcsin(vector[2] / np.linalg.norm(vector))))


def rotation(frontal_deg: float, anterior_turn_deg: float, tilt_deg: float) -> np.ndarray:
    """The heart's orientation in the chest, as a 3x3 rotation.

    frontal_deg turns the frontal axis (positive: towards +90, a right-axis shift); anterior_turn_deg
    turns leftward forces forward (an early precordial transition, "counter-clockwise rotation");
    tilt_deg turns inferior forces forward.
    """

    def plane_rotation(i: int, j: int, angle_deg: float) -> np.ndarray:
        c, s = np.cos(np.radians(angle_deg)), np.sin(np.radians(angle_deg))
        m = np.eye(3)
        m[i, i], m[i, j], m[j, i], m[j, j] = c, -s, s, c
        return m

    return plane_rotation(0, 1, frontal_deg) @ plane_rotation(0, 2, anterior_turn_deg) @ plane_rotation(1, 2, tilt_deg)


# --- The leads --------------------------------------------------------------------------------

INDEPENDENT_LEADS: tuple[str, ...] = ("I", "II", "V1", "V2", "V3", "V4", "V5", "V6")

# Precordial lead vectors: (angle in the transverse plane from leftward towards anterior, downward
# tilt, gain). The chest leads sit close to the heart, so their gains exceed the limb leads' and
# their effective directions are turned towards the left compared with the electrode positions
# (the proximity effect a single dipole cannot otherwise express).
_PRECORDIAL_GEOMETRY: dict[str, tuple[float, float, float]] = {
    "V1": (120.0, 8.0, 1.25),
    "V2": (90.0, 7.0, 1.70),
    "V3": (58.0, 5.0, 1.85),
    "V4": (28.0, 6.0, 1.70),
    "V5": (5.0, 6.0, 1.40),
    "V6": (-15.0, 5.0, 1.05),
}


def _precordial_vector(transverse_deg: float, down_deg: float, gain: float) -> np.ndarray:
    transverse, down = np.radians(transverse_deg), np.radians(down_deg)
    return gain * np.array([np.cos(down) * np.cos(transverse), np.sin(down), np.cos(down) * np.sin(transverse)])


def independent_lead_vectors() -> np.ndarray:
    """(8, 3) lead vectors of I, II, V1..V6 (limb leads on the hexaxial frontal plane, unit gain)."""
    limb = [direction(0.0), direction(60.0)]
    chest = [_precordial_vector(*_PRECORDIAL_GEOMETRY[name]) for name in INDEPENDENT_LEADS[2:]]
    return np.stack(limb + chest)


def complete_leads(independent: np.ndarray) -> np.ndarray:
    """(8, n) channels I, II, V1..V6 -> (12, n) in LEADS order, deriving III, aVR, aVL, aVF."""
    lead_i, lead_ii = independent[0], independent[1]
    derived = {
        "I": lead_i,
        "II": lead_ii,
        "III": lead_ii - lead_i,
        "aVR": -(lead_i + lead_ii) / 2.0,
        "aVL": lead_i - lead_ii / 2.0,
        "aVF": lead_ii - lead_i / 2.0,
    }
    chest = dict(zip(INDEPENDENT_LEADS[2:], independent[2:]))
    return np.stack([derived[name] if name in derived else chest[name] for name in LEADS])


# --- One beat ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Wave:
    """One Gaussian wave of the dipole: its peak vector, its timing and its width."""

    name: str
    vector: np.ndarray  # (3,) peak dipole in mV (as seen by a unit-gain lead along it)
    offset_s: float  # peak time relative to the beat's R peak
    width_s: float  # Gaussian standard deviation
    phase: str  # ATRIAL, DEPOLARISATION or REPOLARISATION


# A Gaussian wave is taken to start and end this many widths from its peak.
WAVE_HALF_SPAN = 2.5


# The normal adult beat: (amplitude mV, frontal deg, anterior deg) of each wave before the
# individual's own variation and the orientation of the heart in the chest.
NORMAL_WAVES: dict[str, tuple[float, float, float]] = {
    "P_RA": (0.12, 75.0, 35.0),  # right atrium: down and forward (the early positive P in V1)
    "P_LA": (0.12, 35.0, -35.0),  # left atrium: left and back (the late negative P in V1)
    "Q": (0.15, 190.0, 40.0),  # septum, left to right: q in I, aVL, V5-V6; r in V1
    "R": (1.30, 50.0, -15.0),  # the free walls, left ventricle dominant: the QRS axis
    "S": (0.55, -135.0, -60.0),  # the basal ventricles: up, right and back: S in V1-V3
    "T_RISE": (0.12, 40.0, 20.0),  # slow early repolarisation: the ST segment's gentle slope
    "T": (0.30, 45.0, 25.0),  # the T wave, concordant with R
}


@dataclasses.dataclass(frozen=True, eq=False)
class HeartTraits:
    """What makes one person's ECG theirs: it persists across all of their recordings."""

    orientation: np.ndarray  # (3, 3) rotation of the heart in the chest
    wave_vectors: dict[str, np.ndarray]  # personal version of NORMAL_WAVES, in the heart's own frame
    p_width_s: float
    t_width_s: float
    p_split_s: float  # delay between right and left atrial activation
    pr_s: float
    qrs_s: float
    qtc_s: float  # QT corrected to a 1 s RR interval (Fridericia)
    resting_hr_bpm: float
    ectopic_vector: np.ndarray  # direction and size of this heart's ventricular ectopic beats


def draw_heart_traits(rng: np.random.Generator, age: float, sex: str) -> HeartTraits:
    """A new individual. Age moves the axis leftward and lowers voltages; men have larger, wider QRS."""
    male = sex == "M"
    orientation = rotation(
        frontal_deg=rng.normal(0.0, 24.0) - 0.3 * (age - 50.0),
        anterior_turn_deg=rng.normal(0.0, 16.0),
        tilt_deg=rng.normal(0.0, 12.0),
    )
    voltage = rng.lognormal(0.0, 0.18) * (1.1 if male else 0.92) * float(np.clip(1.0 - 0.004 * (age - 50.0), 0.75, 1.2))
    wave_vectors = {
        name: amplitude
        * voltage
        * rng.lognormal(0.0, 0.2)
        * direction(frontal + rng.normal(0.0, 12.0), anterior + rng.normal(0.0, 12.0))
        for name, (amplitude, frontal, anterior) in NORMAL_WAVES.items()
    }
    return HeartTraits(
        orientation=orientation,
        wave_vectors=wave_vectors,
        p_width_s=0.016 * rng.lognormal(0.0, 0.1),
        t_width_s=0.045 * rng.lognormal(0.0, 0.12),
        p_split_s=rng.uniform(0.015, 0.03),
        pr_s=float(np.clip(rng.normal(0.150 + 0.0006 * (age - 50.0), 0.016), 0.12, 0.19)),
        qrs_s=float(np.clip(rng.normal(0.088 + (0.006 if male else 0.0), 0.006), 0.074, 0.104)),
        qtc_s=float(np.clip(rng.normal(0.400 + (0.0 if male else 0.012), 0.014), 0.37, 0.45)),
        resting_hr_bpm=float(np.clip(rng.normal(72.0, 7.0), 62.0, 92.0)),
        ectopic_vector=rng.uniform(1.6, 2.6) * direction(rng.uniform(-180.0, 180.0), rng.uniform(-50.0, 50.0)),
    )


def depolarisation_waves(traits: HeartTraits, qrs_s: float) -> list[Wave]:
    """Normal ventricular depolarisation: septal Q, then R, then basal S, spread over `qrs_s`."""
    vectors = traits.wave_vectors
    return [
        Wave("Q", vectors["Q"], -0.28 * qrs_s, 0.075 * qrs_s, DEPOLARISATION),
        Wave("R", vectors["R"], 0.0, 0.095 * qrs_s, DEPOLARISATION),
        Wave("S", vectors["S"], 0.26 * qrs_s, 0.085 * qrs_s, DEPOLARISATION),
    ]


def qrs_onset(depolarisation: list[Wave]) -> float:
    """QRS onset relative to the R peak: where the earliest depolarisation wave starts."""
    return min(w.offset_s - WAVE_HALF_SPAN * w.width_s for w in depolarisation)


def qrs_end(depolarisation: list[Wave]) -> float:
    """The J point relative to the R peak: where the last depolarisation wave ends."""
    return max(w.offset_s + WAVE_HALF_SPAN * w.width_s for w in depolarisation)


def atrial_waves(traits: HeartTraits, onset_s: float, pr_s: float) -> list[Wave]:
    """The P wave, right then left atrium, starting `pr_s` before the QRS onset."""
    right_peak = onset_s - pr_s + WAVE_HALF_SPAN * traits.p_width_s
    return [
        Wave("P_RA", traits.wave_vectors["P_RA"], right_peak, traits.p_width_s, ATRIAL),
        Wave("P_LA", traits.wave_vectors["P_LA"], right_peak + traits.p_split_s, traits.p_width_s, ATRIAL),
    ]


def repolarisation_waves(
    traits: HeartTraits, onset_s: float, qtc_s: float, t_vector: np.ndarray | None = None
) -> list[Wave]:
    """The T wave ending `qtc_s` after QRS onset (at RR = 1 s), with its slow rise in front of it.

    `t_vector` replaces the person's normal T direction and size (for secondary ST-T changes).
    """
    t_peak = onset_s + qtc_s - WAVE_HALF_SPAN * traits.t_width_s
    if t_vector is None:
        t_vector, rise_vector = traits.wave_vectors["T"], traits.wave_vectors["T_RISE"]
    else:
        rise_vector = 0.4 * t_vector
    return [
        Wave("T_RISE", rise_vector, t_peak - 1.0 * traits.t_width_s, 1.4 * traits.t_width_s, REPOLARISATION),
        Wave("T", t_vector, t_peak, traits.t_width_s, REPOLARISATION),
    ]


# --- Rhythm -----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class BeatTrain:
    """When each part of the heart fires, as R-peak times (s) from the start of the recording."""

    atrial_times: np.ndarray  # sinus node firings, placed as the R peak they would conduct to
    conducted_times: np.ndarray  # supraventricular QRS complexes
    ectopic_times: np.ndarray  # ventricular ectopic QRS complexes

    def r_times(self) -> np.ndarray:
        return np.sort(np.concatenate([self.conducted_times, self.ectopic_times]))

    def mean_hr_bpm(self, duration_s: float) -> float:
        """60 / mean RR over the R peaks inside the recording: what a reader of the strip would count."""
        r = self.r_times()
        inside = r[(r >= 0.0) & (r < duration_s)]
        beats = inside if inside.size >= 2 else r  # a strip shorter than two beats: count around it
        return float(60.0 / np.mean(np.diff(beats)))


@dataclasses.dataclass(frozen=True)
class Breathing:
    """Respiration: it modulates the sinus rate (RSA), the dipole's size and axis, and the baseline."""

    rate_hz: float
    phase: float
    sinus_arrhythmia: float  # fractional RR modulation
    axis_swing_deg: float  # the diaphragm swings the frontal axis
    amplitude_swing: float  # fractional change of the dipole's size

    def wave(self, t: np.ndarray) -> np.ndarray:
        return np.sin(2.0 * np.pi * self.rate_hz * t + self.phase)


def draw_breathing(rng: np.random.Generator) -> Breathing:
    """12-20 breaths a minute; how strongly breathing shows differs from recording to recording."""
    return Breathing(
        rate_hz=rng.uniform(0.2, 0.33),
        phase=rng.uniform(0.0, 2.0 * np.pi),
        sinus_arrhythmia=rng.uniform(0.01, 0.04),
        axis_swing_deg=rng.uniform(1.0, 4.0),
        amplitude_swing=rng.uniform(0.02, 0.06),
    )


def sinus_node_times(
    rng: np.random.Generator, rate_bpm: float, duration_s: float, breathing: Breathing
) -> np.ndarray:
    """R-peak times of a sinus rhythm, from a second before the strip to a second after it.

    The RR interval follows respiration (respiratory sinus arrhythmia) with a little random jitter.
    """
    rr = 60.0 / rate_bpm
    times = [-1.0 - rng.uniform(0.0, rr)]
    while times[-1] < duration_s + 1.0:
        swing = breathing.sinus_arrhythmia * np.sin(2.0 * np.pi * breathing.rate_hz * times[-1] + breathing.phase)
        times.append(times[-1] + rr * (1.0 - swing) * (1.0 + rng.normal(0.0, 0.005)))
    return np.asarray(times)


# --- Rendering --------------------------------------------------------------------------------


def _qt_scale(r_times: np.ndarray) -> np.ndarray:
    """Fridericia: QT grows with the cube root of the preceding RR interval (in seconds)."""
    rr = np.diff(r_times)
    preceding = np.concatenate([rr[:1], rr]) if rr.size else np.ones_like(r_times)
    return np.cbrt(preceding)


def _waves_at(times: np.ndarray, waves: list[Wave], qt_scale: np.ndarray) -> tuple[np.ndarray, ...]:
    """Centres, widths and vectors of `waves` repeated at every beat in `times`."""
    if times.size == 0 or not waves:
        return np.empty(0), np.empty(0), np.empty((0, 3))
    offsets = np.array([w.offset_s for w in waves])
    widths = np.array([w.width_s for w in waves])
    moves = np.array([w.phase == REPOLARISATION for w in waves])
    scale = np.where(moves[None, :], qt_scale[:, None], 1.0)
    centres = times[:, None] + offsets[None, :] * scale
    vectors = np.broadcast_to(np.stack([w.vector for w in waves]), (times.size, len(waves), 3))
    return centres.ravel(), (widths[None, :] * scale).ravel(), vectors.reshape(-1, 3)


def render_dipole(
    n_samples: int,
    fs: float,
    train: BeatTrain,
    atrial: list[Wave],
    conducted: list[Wave],
    ectopic: list[Wave],
    orientation: np.ndarray,
) -> np.ndarray:
    """The (3, n_samples) dipole: every wave of every beat, turned by the heart's orientation."""
    r_times = train.r_times()
    qt_scale = _qt_scale(r_times)

    def scale_of(times: np.ndarray) -> np.ndarray:
        return qt_scale[np.searchsorted(r_times, times)]

    parts = [
        _waves_at(train.atrial_times, atrial, np.ones(train.atrial_times.size)),
        _waves_at(train.conducted_times, conducted, scale_of(train.conducted_times)),
        _waves_at(train.ectopic_times, ectopic, scale_of(train.ectopic_times)),
    ]
    centres = np.concatenate([p[0] for p in parts])
    widths = np.concatenate([p[1] for p in parts])
    vectors = np.concatenate([p[2] for p in parts]) @ orientation.T
    return _sum_gaussians(n_samples, fs, centres, widths, vectors)


def _sum_gaussians(
    n_samples: int, fs: float, centres: np.ndarray, widths: np.ndarray, vectors: np.ndarray
) -> np.ndarray:
    """Sum of vector-valued Gaussians, each evaluated only within 5 widths of its peak (the rest is < 4e-6)."""
    reach = np.ceil(5.0 * widths * fs).astype(int)
    span = np.arange(-reach.max(), reach.max() + 1)
    index = np.round(centres * fs).astype(int)[:, None] + span[None, :]
    inside = (np.abs(span)[None, :] <= reach[:, None]) & (index >= 0) & (index < n_samples)
    z = (index / fs - centres[:, None]) / widths[:, None]
    shape = np.exp(-0.5 * z[inside] ** 2)
    wave_of = np.broadcast_to(np.arange(centres.size)[:, None], index.shape)[inside]
    return np.stack(
        [np.bincount(index[inside], weights=shape * vectors[wave_of, axis], minlength=n_samples) for axis in range(3)]
    )


def breathe(dipole: np.ndarray, t: np.ndarray, breathing: Breathing) -> np.ndarray:
    """Swing the frontal axis and the dipole's size with respiration."""
    resp = breathing.wave(t)
    angle = np.radians(breathing.axis_swing_deg) * resp
    cos, sin = np.cos(angle), np.sin(angle)
    x, y, z = dipole
    gain = 1.0 + breathing.amplitude_swing * resp
    return np.stack([gain * (cos * x - sin * y), gain * (sin * x + cos * y), gain * z])


# --- Acquisition: electrodes and noise ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Acquisition:
    """How one recording was taken: where the electrodes landed and what noise came with them."""

    lead_vectors: np.ndarray  # (8, 3) for I, II, V1..V6, jittered by electrode placement
    white_noise_mv: float
    mains_hz: float
    mains_mv: float
    wander_mv: float


def draw_acquisition(
    rng: np.random.Generator, white_noise_mv: float, mains_hz: float, mains_mv: float, wander_mv: float
) -> Acquisition:
    """Electrodes a little off their textbook places (a few degrees, a few percent gain), and noise levels."""
    vectors = independent_lead_vectors()
    chest = vectors[2:] @ rotation(rng.normal(0, 2.0), rng.normal(0, 4.0), rng.normal(0, 3.0)).T
    chest *= rng.lognormal(0.0, 0.04, size=(6, 1))
    limb = vectors[:2] * rng.lognormal(0.0, 0.02, size=(2, 1))
    return Acquisition(
        lead_vectors=np.concatenate([limb, chest]),
        white_noise_mv=white_noise_mv * rng.uniform(0.6, 1.5),
        mains_hz=mains_hz,
        mains_mv=mains_mv * rng.uniform(0.0, 1.5),
        wander_mv=wander_mv * rng.uniform(0.3, 1.5),
    )


def record_leads(
    rng: np.random.Generator, dipole: np.ndarray, t: np.ndarray, acquisition: Acquisition, breathing: Breathing
) -> np.ndarray:
    """(3, n) dipole -> (12, n) mV: project on the 8 recorded channels, add their noise, derive the rest."""
    channels = acquisition.lead_vectors @ dipole
    n_channels = channels.shape[0]
    # Baseline wander: electrode drift (slow random sinusoids) plus the chest moving with breath.
    drift_hz = rng.uniform(0.03, 0.3, size=(n_channels, 2))
    drift_phase = rng.uniform(0.0, 2.0 * np.pi, size=(n_channels, 2))
    drift_gain = rng.normal(0.0, acquisition.wander_mv, size=(n_channels, 2))
    drift = np.einsum("ck,ckn->cn", drift_gain, np.sin(2.0 * np.pi * drift_hz[..., None] * t + drift_phase[..., None]))
    chest_motion = rng.normal(0.0, 0.5 * acquisition.wander_mv, size=(n_channels, 1)) * breathing.wave(t)
    mains_pickup = rng.uniform(0.2, 1.0, size=(n_channels, 1))  # each electrode pair picks up its own share
    mains_phase = rng.uniform(0.0, 2.0 * np.pi)
    mains = acquisition.mains_mv * mains_pickup * np.sin(2.0 * np.pi * acquisition.mains_hz * t + mains_phase)
    white = rng.normal(0.0, acquisition.white_noise_mv, size=channels.shape)
    return complete_leads(channels + drift + chest_motion + mains + white)
