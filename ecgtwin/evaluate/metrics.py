"""The metrics of the DiffuSETS and ECGTwin benchmarks, on arrays (no models in here).

Feature metrics take (n, d) arrays of evaluation-encoder features; signal metrics take `SignalSet`s,
which carry the rate and the lead names so that mismatched inputs are refused instead of compared.
Every function raises ValueError with a one-line message on empty or mismatched inputs.
docs/evaluation.md gives each definition and how to read it.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from scipy import linalg

from ecgtwin.data.record import LEADS
from ecgtwin.data.signal import HR_PLAUSIBLE, heart_rate


AMPLITUDE_IMPLAUSIBLE_MV = 5.0  # |x| beyond this in a limb or chest lead is not an ECG any more


# ---------------------------------------------------------------------------------------------------------
# inputs


@dataclasses.dataclass
class SignalSet:
    """Signals (n, n_leads, n_samples) in mV with their rate and lead names."""

    signals: np.ndarray
    fs: float
    leads: tuple[str, ...] = LEADS
    name: str = "signals"

    def __post_init__(self) -> None:
        self.signals = np.asarray(self.signals, dtype=np.float32)
        self.leads = tuple(self.leads)
        if self.signals.ndim != 3:
            raise ValueError(f"{self.name}: expected (n, leads, samples) signals, got shape {self.signals.shape}")
        if len(self.signals) == 0:
            raise ValueError(f"{self.name}: empty set (no signals)")
        if self.signals.shape[1] != len(self.leads):
            raise ValueError(f"{self.name}: {self.signals.shape[1]} leads in the array but {len(self.leads)} lead names")
        if not np.isfinite(self.fs) or self.fs <= 0:
            raise ValueError(f"{self.name}: sampling rate must be positive, got {self.fs}")


def check_compatible(*sets: SignalSet) -> None:
    """Refuse to compare sets with different lead sets, sampling rates or lengths."""
    first = sets[0]
    for other in sets[1:]:
        if other.leads != first.leads:
            raise ValueError(f"{first.name} and {other.name} have different lead sets: "
                             f"{','.join(first.leads)} vs {','.join(other.leads)}")
        if abs(other.fs - first.fs) > 1e-6 * first.fs:
            raise ValueError(f"{first.name} and {other.name} have different sampling rates: "
                             f"{first.fs:g} Hz vs {other.fs:g} Hz (resample one of them first)")
        if other.signals.shape[-1] != first.signals.shape[-1]:
            raise ValueError(f"{first.name} and {other.name} have different lengths: "
                             f"{first.signals.shape[-1]} vs {other.signals.shape[-1]} samples")


def _features(x: np.ndarray, name: str, min_rows: int = 1) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected (n, d) features, got shape {x.shape}")
    if len(x) < min_rows:
        raise ValueError(f"{name}: needs at least {min_rows} samples, got {len(x)}" if len(x) else f"{name}: empty set")
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: features contain NaN or inf")
    return x


def _pair(real: np.ndarray, fake: np.ndarray, min_rows: int = 1) -> tuple[np.ndarray, np.ndarray]:
    real, fake = _features(real, "real features", min_rows), _features(fake, "generated features", min_rows)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real and generated features differ in dimension: {real.shape[1]} vs {fake.shape[1]}")
    return real, fake


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------------------------------------------
# fidelity and diversity (DiffuSETS)


def fid(real: np.ndarray, fake: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to the two feature sets (Heusel et al. 2017):
    |mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^1/2)."""
    real, fake = _pair(real, fake, min_rows=2)
    mu_r, mu_f = real.mean(0), fake.mean(0)
    s_r, s_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    s_r, s_f = np.atleast_2d(s_r), np.atleast_2d(s_f)
    with np.errstate(all="ignore"):
        covmean = linalg.sqrtm(s_r @ s_f)
    if not np.isfinite(covmean).all():  # singular product (fewer samples than dimensions): regularise
        offset = np.eye(len(s_r)) * 1e-6
        covmean = linalg.sqrtm((s_r + offset) @ (s_f + offset))
    covmean = np.real(covmean)
    value = float(np.sum((mu_r - mu_f) ** 2) + np.trace(s_r) + np.trace(s_f) - 2 * np.trace(covmean))
    return max(value, 0.0)


def _kth_radius(x: np.ndarray, k: int) -> np.ndarray:
    """Distance of every point to its k-th nearest neighbour in its own set (itself excluded)."""
    d = np.sqrt(np.maximum(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1), 0))
    return np.sort(d, axis=1)[:, min(k, len(x) - 1)]


def _covered(points: np.ndarray, centres: np.ndarray, radii: np.ndarray) -> np.ndarray:
    d = np.sqrt(np.maximum(((points[:, None, :] - centres[None, :, :]) ** 2).sum(-1), 0))
    return (d <= radii[None, :] * (1 + 1e-9) + 1e-12).any(axis=1)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3) -> dict:
    """k-NN precision and recall (Kynkaanniemi et al. 2019): precision = share of generated samples inside
    the real manifold (the union of balls around each real sample with radius its k-th NN distance),
    recall = share of real samples inside the generated manifold; F1 their harmonic mean."""
    real, fake = _pair(real, fake, min_rows=2)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    precision = float(_covered(fake, real, _kth_radius(real, k)).mean())
    recall = float(_covered(real, fake, _kth_radius(fake, k)).mean())
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"precision": precision, "recall": recall, "f1": float(f1), "k": k}


def clip_score(ecg_embeddings: np.ndarray, text_embeddings: np.ndarray) -> float:
    """Mean cosine between each ECG and its (requested) report in the joint ECG-text space."""
    ecg, text = _pair(ecg_embeddings, text_embeddings)
    if len(ecg) != len(text):
        raise ValueError(f"clip score: {len(ecg)} ECGs but {len(text)} reports")
    return float(np.mean(np.sum(_unit(ecg) * _unit(text), axis=1)))


# ---------------------------------------------------------------------------------------------------------
# heart rate and condition


def measured_hr(signals: SignalSet) -> np.ndarray:
    """HR in bpm of every signal (R peaks, ecgtwin.data.signal.heart_rate); NaN where no rhythm is detected."""
    return np.array([heart_rate(s, signals.fs) for s in _standard(signals).signals])


def hr_mae(requested: Sequence[float], measured: Sequence[float]) -> dict:
    """Mean absolute error of measured vs requested HR over the signals where both are known."""
    requested, measured = np.asarray(requested, float), np.asarray(measured, float)
    if len(requested) != len(measured):
        raise ValueError(f"HR MAE: {len(requested)} requested rates but {len(measured)} measured")
    if len(requested) == 0:
        raise ValueError("HR MAE: empty set")
    ok = np.isfinite(requested) & np.isfinite(measured)
    return {"hr_mae": float(np.mean(np.abs(requested[ok] - measured[ok]))) if ok.any() else float("nan"),
            "hr_measured_share": float(ok.mean()), "n": int(ok.sum())}


def condition_scores(requested: np.ndarray, probabilities: np.ndarray, codes: Sequence[str],
                     threshold: float = 0.5) -> dict:
    """How well a multilabel classifier recognises the requested conditions.

    requested (n, C) 0/1 and probabilities (n, C). condition_accuracy = share of requested (twin, code)
    pairs the classifier detects (probability > threshold); exact_match = share of signals whose
    detected set equals the requested set; per condition: how many signals asked for it, the share
    detected (recognised) and the share of the others where it was detected anyway (false_alarm)."""
    requested = np.asarray(requested, bool)
    probabilities = np.asarray(probabilities, float)
    if requested.shape != probabilities.shape or requested.shape[1] != len(codes):
        raise ValueError(f"condition scores: shapes {requested.shape}, {probabilities.shape} and {len(codes)} codes differ")
    if len(requested) == 0:
        raise ValueError("condition scores: empty set")
    detected = probabilities > threshold
    per = {}
    for j, code in enumerate(codes):
        asked, others = requested[:, j], ~requested[:, j]
        per[code] = {"n": int(asked.sum()),
                     "recognised": float(detected[asked, j].mean()) if asked.any() else None,
                     "false_alarm": float(detected[others, j].mean()) if others.any() else None}
    hits = detected[requested]
    return {"condition_accuracy": float(hits.mean()) if hits.size else float("nan"),
            "condition_exact_match": float((detected == requested).all(axis=1).mean()),
            "per_condition": per}


# ---------------------------------------------------------------------------------------------------------
# personalisation (ECGTwin)


def similarity_score(twins: np.ndarray, twin_patients: Sequence, real: np.ndarray, real_patients: Sequence) -> float:
    """ECGTwin's similarity score: for each twin, the mean cosine to the real ECGs of its own patient
    minus the mean cosine to the real ECGs of all other patients, averaged over twins."""
    real, twins = _pair(real, twins)
    twin_patients, real_patients = np.asarray(twin_patients), np.asarray(real_patients)
    _check_ids(twins, twin_patients, "twin"), _check_ids(real, real_patients, "real")
    cos = _unit(twins) @ _unit(real).T
    scores = []
    for i, p in enumerate(twin_patients):
        same, other = real_patients == p, real_patients != p
        if not same.any():
            raise ValueError(f"similarity: twin of patient {p} has no real ECG of that patient to compare with")
        if not other.any():
            raise ValueError("similarity: needs real ECGs of at least two patients")
        scores.append(cos[i, same].mean() - cos[i, other].mean())
    return float(np.mean(scores))


def silhouette(features: np.ndarray, patients: Sequence) -> float:
    """Silhouette score (cosine) of the twins grouped by patient: near 1 = tight, separate groups,
    0 = overlapping, negative = closer to other patients' twins than to their own."""
    from sklearn.metrics import silhouette_score

    features = _features(features, "silhouette features", 3)
    patients = np.asarray(patients)
    _check_ids(features, patients, "silhouette")
    n_groups = len(set(patients.tolist()))
    if not 2 <= n_groups <= len(features) - 1:
        raise ValueError(f"silhouette needs 2..n-1 patients, got {n_groups} patients for {len(features)} twins")
    return float(silhouette_score(features, patients, metric="cosine"))


def identification_ranks(twins: np.ndarray, twin_patients: Sequence, real: np.ndarray,
                         real_patients: Sequence) -> np.ndarray:
    """Per twin, the rank (0 = first) of its own patient in `identification`'s ranking. A twin's rank depends
    on the gallery only, never on the other twins, so a bootstrap over twins resamples these ranks."""
    real, twins = _pair(real, twins)
    gallery = sorted(set(np.asarray(real_patients).tolist()))
    return _identity_rank(_unit(twins) @ _unit(real).T, np.asarray(twin_patients), np.asarray(real_patients), gallery)


def identification(twins: np.ndarray, twin_patients: Sequence, real: np.ndarray, real_patients: Sequence,
                   ks: Sequence[int] = (1, 5)) -> dict:
    """Re-identification: rank the real patients by the cosine of their nearest real ECG to the twin;
    top-k rate = share of twins whose own patient is among the first k. Chance is k / n_patients."""
    real, twins = _pair(real, twins)
    twin_patients, real_patients = np.asarray(twin_patients), np.asarray(real_patients)
    _check_ids(twins, twin_patients, "twin"), _check_ids(real, real_patients, "real")
    gallery = sorted(set(real_patients.tolist()))
    missing = set(twin_patients.tolist()) - set(gallery)
    if missing:
        raise ValueError(f"identification: no real ECG of patient(s) {sorted(missing)[:3]} in the gallery")
    rank = identification_ranks(twins, twin_patients, real, real_patients)
    out = {f"identification_top{k}": float((rank < k).mean()) for k in ks}
    out.update({f"identification_chance_top{k}": min(1.0, k / len(gallery)) for k in ks})
    out["identification_patients"] = len(gallery)
    return out


def identification_real(real: np.ndarray, real_patients: Sequence, ks: Sequence[int] = (1,)) -> dict:
    """The same re-identification for real ECGs, leave one out: each ECG (of a patient with another one)
    against every other real ECG: how well the evaluation encoder tells these patients apart from real
    data alone, a reference level for a twin's rate (not a bound: a twin's gallery also holds the ECG it
    was made from, a real query's never holds itself)."""
    real = _features(real, "real features", 2)
    real_patients = np.asarray(real_patients)
    _check_ids(real, real_patients, "real")
    gallery = sorted(set(real_patients.tolist()))
    cos = _unit(real) @ _unit(real).T
    np.fill_diagonal(cos, -np.inf)  # never itself
    _, which, counts = np.unique(real_patients, return_inverse=True, return_counts=True)
    queries = counts[which] >= 2
    if not queries.any():
        return {f"identification_real_top{k}": None for k in ks}
    rank = _identity_rank(cos[queries], real_patients[queries], real_patients, gallery)
    return {f"identification_real_top{k}": float((rank < k).mean()) for k in ks}


def _identity_rank(cos: np.ndarray, query_patients: np.ndarray, real_patients: np.ndarray,
                   gallery: list) -> np.ndarray:
    """Per query row, the rank (0 = nearest) of its own patient among the gallery's patients, each patient
    scored by the cosine of its nearest real ECG."""
    best = np.stack([cos[:, real_patients == p].max(axis=1) for p in gallery], axis=1)  # (n_queries, n_patients)
    order = np.argsort(-best, axis=1, kind="stable")
    truth = np.array([gallery.index(p) for p in query_patients])
    return np.argmax(order == truth[:, None], axis=1)


def _check_ids(x: np.ndarray, ids: np.ndarray, name: str) -> None:
    if len(ids) != len(x):
        raise ValueError(f"{name}: {len(x)} feature rows but {len(ids)} patient ids")


# ---------------------------------------------------------------------------------------------------------
# signal sanity


def _standard(signals: SignalSet) -> SignalSet:
    missing = [lead for lead in LEADS if lead not in signals.leads]
    if missing:
        raise ValueError(f"{signals.name}: lacks lead(s) {','.join(missing)} of the 12 standard leads")
    if signals.leads == LEADS:
        return signals
    order = [signals.leads.index(lead) for lead in LEADS]
    return SignalSet(signals.signals[:, order], signals.fs, LEADS, signals.name)


def einthoven_residual(signals: SignalSet) -> np.ndarray:
    """Per signal: RMS of II - (I + III) relative to the RMS of II (0 for a consistent recording)."""
    x = _standard(signals).signals.astype(np.float64)
    lead_i, lead_ii, lead_iii = (x[:, LEADS.index(n)] for n in ("I", "II", "III"))
    residual = np.sqrt(np.mean((lead_ii - lead_i - lead_iii) ** 2, axis=1))
    return residual / np.maximum(np.sqrt(np.mean(lead_ii ** 2, axis=1)), 1e-6)


def sanity(signals: SignalSet, hr: np.ndarray | None = None) -> dict:
    """Signal sanity of a set: amplitude range, Einthoven consistency, share with a detectable rhythm."""
    std = _standard(signals)
    x = std.signals
    peak = np.abs(x).max(axis=(1, 2))
    ptp_ii = np.ptp(x[:, LEADS.index("II")], axis=1)
    residual = einthoven_residual(std)
    hr = measured_hr(std) if hr is None else np.asarray(hr, float)
    rhythm = np.isfinite(hr) & (hr >= HR_PLAUSIBLE[0]) & (hr <= HR_PLAUSIBLE[1])
    return {"n": len(x),
            "amplitude_max_abs_mv": _summary(peak),
            "lead_ii_peak_to_peak_mv": _summary(ptp_ii),
            "share_implausible_amplitude": float((peak > AMPLITUDE_IMPLAUSIBLE_MV).mean()),
            "einthoven_relative_residual": _summary(residual),
            "share_rhythm_detected": float(rhythm.mean())}


def _summary(x: np.ndarray) -> dict:
    x = np.asarray(x, float)
    return {"median": float(np.median(x)), "p5": float(np.percentile(x, 5)), "p95": float(np.percentile(x, 95)),
            "min": float(x.min()), "max": float(x.max())}
