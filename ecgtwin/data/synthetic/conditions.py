"""The conditions the simulator knows: their codes, what each does to the beat and the rhythm,
and the machine-style statements an electrocardiograph would print for them.

Every recording has exactly one rhythm (NSR, SB, ST or AF) plus any compatible findings. The
sinus rhythm codes follow the measured rate (SB < 60 <= NSR <= 100 < ST), so a label can never
contradict the recording's heart rate.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np

from ecgtwin.errors import UserError
from ecgtwin.data.synthetic.heart import (
    DEPOLARISATION,
    REPOLARISATION,
    WAVE_HALF_SPAN,
    BeatTrain,
    Breathing,
    HeartTraits,
    Wave,
    anterior_angle,
    atrial_waves,
    depolarisation_waves,
    direction,
    frontal_angle,
    qrs_end,
    qrs_onset,
    repolarisation_waves,
    rotation,
    sinus_node_times,
)

CONDITIONS: dict[str, str] = {
    "NSR": "normal sinus rhythm",
    "SB": "sinus bradycardia",
    "ST": "sinus tachycardia",
    "AF": "atrial fibrillation",
    "1AVB": "first-degree atrioventricular block",
    "LBBB": "left bundle branch block",
    "RBBB": "right bundle branch block",
    "STE": "ST elevation",
    "LVH": "left ventricular hypertrophy",
    "PVC": "premature ventricular contractions",
}
RHYTHMS: tuple[str, ...] = ("NSR", "SB", "ST", "AF")

# Pairs that never occur together. Clinical: one rhythm at a time; AF has no PR interval to
# prolong; one bundle cannot be blocked on both sides with conduction left. Simulator choices
# (kept simple, and said here): LBBB masks ST judgement, so it is not combined with STE; PVCs are
# drawn only with sinus rhythm, and first-degree block only below 80 bpm, where the P wave still
# stands clear of the preceding T wave.
EXCLUDED_PAIRS: frozenset[frozenset[str]] = frozenset(
    [frozenset((a, b)) for i, a in enumerate(RHYTHMS) for b in RHYTHMS[i + 1 :]]
    + [frozenset(p) for p in (("AF", "1AVB"), ("AF", "PVC"), ("LBBB", "RBBB"), ("LBBB", "STE"), ("ST", "1AVB"))]
)

ST_TERRITORIES: tuple[str, ...] = ("anterior", "inferior", "lateral")
# Direction of the injury current of each territory: the ST segment rises in the leads facing it
# (anterior: V1-V4; inferior: II, III, aVF with reciprocal aVL; lateral: I, aVL, V5-V6).
_INJURY_DIRECTION: dict[str, tuple[float, float]] = {
    "anterior": (60.0, 65.0),
    "inferior": (95.0, -10.0),
    "lateral": (-20.0, 10.0),
}


def rhythm_for_rate(hr_bpm: float) -> str:
    """Sinus rhythm code for a rate: SB below 60, ST above 100, NSR in between."""
    if hr_bpm < 60.0:
        return "SB"
    if hr_bpm > 100.0:
        return "ST"
    return "NSR"


def check_conditions(codes: Iterable[str]) -> None:
    """Raise ValueError unless `codes` are known, hold exactly one rhythm and no excluded pair."""
    codes = set(codes)
    unknown = codes - set(CONDITIONS)
    if unknown:
        raise UserError(f"unknown condition codes {sorted(unknown)}; known: {sorted(CONDITIONS)}")
    rhythms = codes & set(RHYTHMS)
    if len(rhythms) != 1:
        raise UserError(f"need exactly one rhythm of {RHYTHMS}, got {sorted(rhythms)}")
    clashes = [sorted(pair) for pair in EXCLUDED_PAIRS if pair <= codes]
    if clashes:
        raise UserError(f"conditions that exclude each other: {clashes}")


@dataclasses.dataclass(frozen=True)
class ConditionPlan:
    """The conditions of one recording and the numbers that realise them."""

    atrial_fibrillation: bool = False
    rate_bpm: float = 72.0  # sinus rate, or the mean ventricular rate in AF
    first_degree_block: bool = False
    bundle_branch_block: str | None = None  # "LBBB", "RBBB" or None
    hypertrophy: bool = False
    strain: bool = False  # LVH with secondary repolarisation change
    st_territory: str | None = None  # one of ST_TERRITORIES, or None
    pvc_count: int = 0

    def codes(self, hr_bpm: float) -> list[str]:
        """Condition codes of the realised recording, rhythm first, then in CONDITIONS order."""
        rhythm = "AF" if self.atrial_fibrillation else rhythm_for_rate(hr_bpm)
        present = {
            rhythm,
            *(["1AVB"] if self.first_degree_block else []),
            *([self.bundle_branch_block] if self.bundle_branch_block else []),
            *(["STE"] if self.st_territory else []),
            *(["LVH"] if self.hypertrophy else []),
            *(["PVC"] if self.pvc_count else []),
        }
        return [code for code in CONDITIONS if code in present]


# --- What each condition does to the beat ------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class BeatWaves:
    """The waves of one recording's beats: P (sinus only), the conducted QRS-T, the ectopic QRS-T."""

    atrial: list[Wave]
    conducted: list[Wave]
    ectopic: list[Wave]
    pr_s: float
    qrs_s: float


def beat_waves(plan: ConditionPlan, traits: HeartTraits, rng: np.random.Generator) -> BeatWaves:
    """The person's own beat, changed by the plan's conditions. Small per-recording interval jitter."""
    qtc = traits.qtc_s + rng.normal(0.0, 0.006)
    depolarisation = depolarisation_waves(traits, traits.qrs_s + rng.normal(0.0, 0.002))
    t_vector = None
    if plan.bundle_branch_block == "LBBB":
        depolarisation, t_vector = _left_bundle_branch_block(traits, rng)
    elif plan.bundle_branch_block == "RBBB":
        depolarisation, t_vector = _right_bundle_branch_block(depolarisation, traits, rng)
    if plan.hypertrophy:
        depolarisation, strain_t = _hypertrophy(depolarisation, traits, plan.strain, rng)
        t_vector = strain_t if t_vector is None else t_vector  # a block's own ST-T change dominates
    onset = qrs_onset(depolarisation)
    repolarisation = repolarisation_waves(traits, onset, qtc, t_vector)
    if plan.st_territory:
        repolarisation = _st_elevation(repolarisation, depolarisation, plan.st_territory, rng)
    # A blocked PR is the person's own PR, lengthened by a slowed AV node: 230-290 ms.
    own_pr = traits.pr_s + rng.normal(0.0, 0.004)
    pr = float(np.clip(own_pr + 0.1, 0.23, 0.29)) if plan.first_degree_block else own_pr
    atrial = [] if plan.atrial_fibrillation else atrial_waves(traits, onset, pr)
    return BeatWaves(
        atrial=atrial,
        conducted=depolarisation + repolarisation,
        ectopic=_ventricular_ectopic(traits, depolarisation) if plan.pvc_count else [],
        pr_s=pr,
        qrs_s=qrs_end(depolarisation) - onset,
    )


def _hypertrophy(
    depolarisation: list[Wave], traits: HeartTraits, strain: bool, rng: np.random.Generator
) -> tuple[list[Wave], np.ndarray | None]:
    """LVH: a thicker left ventricle gives larger, slightly longer and more posterior QRS forces
    (tall R in V5-V6, deep S in V1-V2). The machine calls LVH on voltage, so the main QRS force is
    brought to 2.6-3.4 mV whatever the person's own size (and at least 1.5 times it).

    With strain, repolarisation turns away from the left ventricle (lateral T inversion, ST depression).
    """
    main_force = max(float(np.linalg.norm(w.vector)) for w in depolarisation)
    gain = max(1.5, rng.uniform(2.6, 3.4) / main_force)
    widen = 1.1
    backwards = rotation(0.0, -12.0, 0.0)  # leftward forces turn towards the back
    waves = [
        dataclasses.replace(
            w, vector=backwards @ (w.vector * gain), offset_s=w.offset_s * widen, width_s=w.width_s * widen
        )
        for w in depolarisation
    ]
    if not strain:
        return waves, None
    r = traits.wave_vectors["R"]
    return waves, -rng.uniform(0.25, 0.4) * r / np.linalg.norm(r)


def _left_bundle_branch_block(traits: HeartTraits, rng: np.random.Generator) -> tuple[list[Wave], np.ndarray]:
    """LBBB: the septum fires right to left (no septal q) and the left ventricle late and slowly.

    Two broad leftward-posterior waves make the wide, notched R in I, aVL, V5-V6 and the deep QS
    in V1; repolarisation is discordant, opposite to the QRS.
    """
    qrs = rng.uniform(0.135, 0.17)
    r = traits.wave_vectors["R"]
    size = max(float(np.linalg.norm(r)), 0.9)
    axis = frontal_angle(r) - rng.uniform(10.0, 40.0)
    width = qrs / (2.0 * WAVE_HALF_SPAN + 2.9)  # two waves 2.9 widths apart span the whole QRS
    gap = 2.9 * width
    early = Wave("R", 0.75 * size * direction(axis + 10.0, -40.0), -gap / 2.0, width, DEPOLARISATION)
    late = Wave("R_LATE", 1.0 * size * direction(axis - 5.0, -55.0), gap / 2.0, width, DEPOLARISATION)
    t_vector = rng.uniform(0.3, 0.45) * direction(axis + 180.0, 40.0)
    return [early, late], t_vector


def _right_bundle_branch_block(
    depolarisation: list[Wave], traits: HeartTraits, rng: np.random.Generator
) -> tuple[list[Wave], np.ndarray]:
    """RBBB: the left ventricle fires normally, the right late: a terminal rightward-anterior R'.

    That R' is the rsR' of V1 and the broad S of I and V6; the T turns away from it (V1-V3).
    """
    qrs = rng.uniform(0.145, 0.175)
    onset = qrs_onset(depolarisation)
    width = rng.uniform(0.018, 0.024)
    peak = onset + qrs - WAVE_HALF_SPAN * width
    terminal = Wave("R_PRIME", rng.uniform(0.9, 1.4) * direction(170.0, 50.0), peak, width, DEPOLARISATION)
    t = traits.wave_vectors["T"]
    t_vector = float(np.linalg.norm(t)) * direction(frontal_angle(t), anterior_angle(t) - 50.0)
    return depolarisation + [terminal], t_vector


def _st_elevation(
    repolarisation: list[Wave], depolarisation: list[Wave], territory: str, rng: np.random.Generator
) -> list[Wave]:
    """An injury current: the ST segment and a hyperacute T rise in the leads facing the territory."""
    injury = direction(*_INJURY_DIRECTION[territory])
    size = rng.uniform(0.3, 0.5)
    width = 0.05
    j_point = qrs_end(depolarisation)
    st = Wave("ST", size * injury, j_point + 1.3 * width, width, REPOLARISATION)
    hyperacute = [
        dataclasses.replace(w, vector=w.vector + 0.5 * size * injury) if w.name == "T" else w for w in repolarisation
    ]
    return hyperacute + [st]


def _ventricular_ectopic(traits: HeartTraits, conducted: list[Wave]) -> list[Wave]:
    """A PVC from the person's own ectopic focus: slow cell-to-cell spread, wide QRS, discordant T.

    Unopposed, unsynchronised activation makes it larger than the person's conducted QRS (>= 1.3x).
    """
    largest_conducted = max(float(np.linalg.norm(w.vector)) for w in conducted)
    v = traits.ectopic_vector * max(1.0, 1.3 * largest_conducted / float(np.linalg.norm(traits.ectopic_vector)))
    turned = float(np.linalg.norm(v)) * direction(frontal_angle(v) + 35.0, anterior_angle(v))
    return [
        Wave("E1", 0.75 * v, -0.04, 0.018, DEPOLARISATION),
        Wave("E2", 0.5 * turned, 0.035, 0.02, DEPOLARISATION),
        Wave("ET", -0.3 * v, 0.3, 0.06, REPOLARISATION),
    ]


# --- What each condition does to the rhythm ----------------------------------------------------


def beat_train(plan: ConditionPlan, rng: np.random.Generator, duration_s: float, breathing: Breathing) -> BeatTrain:
    """Sinus node (with PVCs) or AF's irregular ventricular response."""
    if plan.atrial_fibrillation:
        times = _fibrillation_ventricular_times(rng, plan.rate_bpm, duration_s)
        return BeatTrain(np.empty(0), times, np.empty(0))
    sinus = sinus_node_times(rng, plan.rate_bpm, duration_s, breathing)
    conducted, ectopic = _insert_pvcs(sinus, plan.pvc_count, duration_s, rng)
    return BeatTrain(sinus, conducted, ectopic)


def _fibrillation_ventricular_times(rng: np.random.Generator, rate_bpm: float, duration_s: float) -> np.ndarray:
    """Irregularly irregular: independent log-normal RR intervals (CV 0.2-0.3), never below 300 ms."""
    mean_rr = 60.0 / rate_bpm
    spread = rng.uniform(0.2, 0.3)
    n = int((duration_s + 3.0) / 0.3) + 2
    rr = np.maximum(mean_rr * rng.lognormal(-spread**2 / 2.0, spread, size=n), 0.3)
    times = -1.0 - rng.uniform(0.0, mean_rr) + np.concatenate([[0.0], np.cumsum(rr)])
    return times[times < duration_s + 1.0]


def _insert_pvcs(
    sinus: np.ndarray, count: int, duration_s: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Replace `count` non-adjacent sinus beats by early ectopic beats.

    The sinus node keeps its pace, so the next sinus beat comes on time: a full compensatory pause
    (the two RR intervals around a PVC add up to two sinus cycles).
    """
    candidates = np.flatnonzero((sinus > 1.2) & (sinus < duration_s - 1.2))
    chosen: list[int] = []
    for index in rng.permutation(candidates):
        if len(chosen) == count:
            break
        if all(abs(index - c) > 1 for c in chosen):
            chosen.append(int(index))
    chosen_array = np.array(sorted(chosen), dtype=int)
    coupling = rng.uniform(0.55, 0.7)
    ectopic = sinus[chosen_array - 1] + coupling * (sinus[chosen_array] - sinus[chosen_array - 1])
    return np.delete(sinus, chosen_array), ectopic


def fibrillatory_waves(rng: np.random.Generator, t: np.ndarray) -> np.ndarray:
    """AF's f waves as a (3, n) dipole: 4-9 Hz, drifting in rate and size, mostly seen in V1 and II."""
    size = rng.uniform(0.04, 0.1)
    signal = np.zeros_like(t)
    for _ in range(3):
        drift = np.sin(2.0 * np.pi * rng.uniform(0.05, 0.2) * t + rng.uniform(0, 2 * np.pi))
        rate = rng.uniform(4.5, 8.5) + 0.6 * drift
        phase = 2.0 * np.pi * np.cumsum(rate) * (t[1] - t[0]) + rng.uniform(0.0, 2.0 * np.pi)
        envelope = 1.0 + 0.5 * np.sin(2.0 * np.pi * rng.uniform(0.1, 0.5) * t + rng.uniform(0, 2 * np.pi))
        signal += rng.uniform(0.3, 1.0) * envelope * np.sin(phase)
    signal *= size / np.max(np.abs(signal))
    return direction(rng.uniform(60.0, 90.0), rng.uniform(40.0, 65.0))[:, None] * signal[None, :]


# --- The machine's statements ------------------------------------------------------------------

_MAJOR = {"AF", "LBBB", "RBBB", "STE", "LVH"}


def machine_report(codes: list[str], hr_bpm: float, plan: ConditionPlan, rng: np.random.Generator) -> str:
    """A report like an electrocardiograph's: statements joined with '. ', rhythm first, summary last.

    Phrasings vary a little (and by rate or severity) so that text and codes are not a 1:1 map.
    """
    statements = [_rhythm_statement(codes, hr_bpm, rng)]
    if "1AVB" in codes and not statements[0].endswith("block"):
        statements.append(str(rng.choice(["First degree AV block", "1st degree A-V block", "Prolonged PR interval"])))
    if "PVC" in codes:
        many = plan.pvc_count > 1
        if many:
            statements.append(str(rng.choice(["Multiple ventricular premature complexes", "Frequent PVCs"])))
        else:
            statements.append(str(rng.choice(["Ventricular premature complex", "Occasional PVCs"])))
    if "LBBB" in codes:
        statements.append("Left bundle branch block")
    if "RBBB" in codes:
        statements.append(str(rng.choice(["Right bundle branch block", "RBBB"])))
    if "LVH" in codes:
        if plan.strain:
            statements.append("Left ventricular hypertrophy with repolarization abnormality")
        else:
            options = ["Left ventricular hypertrophy", "Voltage criteria for left ventricular hypertrophy"]
            statements.append(str(rng.choice(options)))
    if "STE" in codes:
        territory = plan.st_territory.capitalize() if plan.st_territory else ""
        options = [
            f"{territory} ST elevation - consider acute infarct",
            f"ST elevation consider {plan.st_territory} injury or acute infarct",
        ]
        statements.append(str(rng.choice(options)))
        if rng.random() < 0.5:
            statements.append("Acute MI / STEMI")
    statements.append(_summary(codes, hr_bpm))
    return ". ".join(statements) + "."


def _rhythm_statement(codes: list[str], hr_bpm: float, rng: np.random.Generator) -> str:
    if "AF" in codes:
        if hr_bpm > 100.0:
            return "Atrial fibrillation with rapid ventricular response"
        if hr_bpm < 60.0:
            return "Atrial fibrillation with slow ventricular response"
        return "Atrial fibrillation"
    if "SB" in codes:
        rhythm = "Marked sinus bradycardia" if hr_bpm < 50.0 else "Sinus bradycardia"
    elif "ST" in codes:
        rhythm = "Sinus tachycardia"
    else:
        rhythm = str(rng.choice(["Sinus rhythm", "Normal sinus rhythm"]))
    if "1AVB" in codes and rng.random() < 0.5:
        return f"{rhythm} with 1st degree A-V block"
    return rhythm


def _summary(codes: list[str], hr_bpm: float) -> str:
    findings = set(codes) - set(RHYTHMS)
    if codes == ["NSR"]:
        return "Normal ECG"
    if not findings and hr_bpm >= 50.0 and "AF" not in codes:
        return "Otherwise normal ECG"
    if findings & _MAJOR or "AF" in codes:
        return "Abnormal ECG"
    return "Borderline ECG"
