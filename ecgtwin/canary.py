"""A canary audit that measures epsilon (one-run auditing, Steinke, Nasr and Jagielski, 2023).

m canary patients, crafted so that a model that saw them reconstructs them better, are each put into the
site's training set independently with probability 1/2. The real training runs once, through `Site` as in
a federation (all three stages), once with DP-SGD under the audited budget and once without noise. Each
canary is scored by how much better the trained VAE reconstructs it than the starting weights do. The
auditor guesses "in" for the k best-scored canaries and "out" for the k worst. Under epsilon-DP the number
of correct guesses is stochastically dominated by Binomial(2k, e^eps / (1 + e^eps)) (their Theorem 3.1;
under (epsilon, delta)-DP up to an additive term in delta, Cor. 5.4, which the bound includes), so the
largest epsilon that this dominance rules out at the chosen confidence is an empirical LOWER bound on the
epsilon the run really has. A bound above the claimed epsilon would prove the implementation wrong. The non-private run shows what the audit can detect.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from scipy.stats import binom

from ecgtwin.config import STAGES, ExperimentConfig, config_text
from ecgtwin.data.store import SiteStore, StoreWriter, record_row
from ecgtwin.data.record import Record
from ecgtwin.errors import UserError
from ecgtwin.models import ECGVAE
from ecgtwin.privacy.policy import PrivacyPolicy, StagePlan, StagePlans, save_policy
from ecgtwin.site import Site
from ecgtwin.site_folder import SiteFolder
from ecgtwin.weights import build_module, initial_weights, load_weights_into


def epsilon_lower_bound(correct: int, guesses: int, confidence: float = 0.95, delta: float = 0.0,
                        canaries: int | None = None) -> float:
    """The largest epsilon that `correct` of `guesses` rules out at `confidence` for an (epsilon, delta)-DP
    run with `canaries` canaries (default: `guesses`). Under (epsilon, delta)-DP (Steinke, Nasr and Jagielski
    2023, Cor. 5.4) P[correct >= v] <= beta + 2 m delta alpha, where
    beta = P[Binomial(r, q) >= v], q = e^eps / (1 + e^eps), r = `guesses`, m = `canaries`, and
    alpha = max over i = 1..v of P[v - i <= Binomial(r, q) < v] / i. The bound is the largest epsilon
    whose right-hand side is still below 1 - confidence; delta 0 is their pure-DP Theorem 3.1."""
    m = guesses if canaries is None else canaries
    if guesses == 0 or correct <= guesses / 2:
        return 0.0

    def p_value(eps: float) -> float:
        q = 1.0 / (1.0 + math.exp(-eps))
        beta = float(binom.sf(correct - 1, guesses, q))
        if delta == 0.0:
            return beta
        below = np.cumsum(binom.pmf(np.arange(correct - 1, -1, -1), guesses, q))  # P[v - i <= B < v], i = 1..v
        alpha = float(np.max(below / np.arange(1, correct + 1)))
        return beta + 2 * m * delta * alpha

    limit = 1.0 - confidence
    if p_value(0.0) >= limit:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(hi) < limit and hi < 50:
        lo, hi = hi, hi * 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if p_value(mid) < limit else (lo, mid)
    return lo


def canary_signals(store: SiteStore, m: int, rng: np.random.Generator) -> np.ndarray:
    """(m, 2, 12, n) records of m canary patients: a real ECG of the store plus a large pattern of the
    canary's own (two frequencies and phases on every lead), twice with small differences."""
    n = store.signals.shape[-1]
    t = np.arange(n) / n
    base = np.asarray(store.signals[rng.choice(len(store), size=m)])
    out = np.empty((m, 2, *store.signals.shape[1:]), np.float32)
    for i in range(m):
        f1, f2 = rng.uniform(3, 40, size=2)
        lead_phase = rng.uniform(0, 2 * np.pi, size=(12, 1))
        pattern = 1.2 * np.sin(2 * np.pi * f1 * t + lead_phase) + 0.8 * np.sign(np.sin(2 * np.pi * f2 * t))
        for k in range(2):
            out[i, k] = base[i] + pattern + rng.normal(0, 0.02, size=pattern.shape)
    return out


def _site_store(store: SiteStore, canaries: np.ndarray, included: np.ndarray, out: Path) -> SiteStore:
    """The site's store plus the included canaries (each a patient with two ECGs)."""
    writer = StoreWriter(out, store.signals.shape[-1])
    for row, signal in zip(store.records.to_dict("records"), store.signals):
        writer.add({**row}, np.asarray(signal))
    for i in np.flatnonzero(included):
        for k in range(2):
            record = Record(record_id=f"canary{i:03d}_{k}", patient_id=f"canary{i:03d}", signal=canaries[i, k],
                            fs=store.fs, source="canary", report="Sinus rhythm", age=60.0, sex="F",
                            recording_time=None, extra={})
            writer.add(record_row(record), canaries[i, k])
    manifest = {k: v for k, v in store.manifest.items() if k != "format_version"}
    writer.commit({**manifest, "canaries": int(included.sum())})
    return SiteStore(out)


@torch.no_grad()
def _errors(vae: ECGVAE, signals: np.ndarray) -> np.ndarray:
    """Mean reconstruction MSE per canary (posterior mean) over its two records."""
    vae.eval()
    x = torch.from_numpy(signals.reshape(-1, *signals.shape[2:]))
    err = (vae.decode(vae.encode(x)[0]) - x).pow(2).flatten(1).mean(1).numpy()
    return err.reshape(len(signals), -1).mean(1)


def _train(site_dir: Path, store: SiteStore, config: ExperimentConfig, policy: PrivacyPolicy) -> dict:
    """Every stage once through the site, as a federation round would (weights in, weights out)."""
    site_dir.mkdir(parents=True, exist_ok=True)
    shutil.move(str(store.path), site_dir / "store")
    save_policy(policy, site_dir / "privacy.yaml")
    site = Site.open(SiteFolder.at(site_dir))
    weights = {}
    for stage in STAGES:
        weights[stage] = initial_weights(stage, config)
        new, metrics, refusal = site.train(stage, 1, "canary-audit", config_text(config), weights)
        if refusal is not None:
            raise UserError(f"canary audit: the {stage} pass was refused: {refusal}")
        weights[stage] = new
    return {"weights": weights, "epsilon": site.spent()}


def canary_audit(store_path: str | Path, config: ExperimentConfig, out: str | Path, epsilon: float = 8.0,
                 canaries: int = 64, steps: tuple[int, int, int] = (150, 5, 5), batch_patients: int = 16,
                 confidence: float = 0.95, seed: int = 0) -> dict:
    """Audit DP training at `epsilon` (and the same run without noise) with `canaries` canary patients."""
    store, out = SiteStore(store_path), Path(out)
    if canaries < 8:
        raise UserError(f"--canaries: at least 8, got {canaries}")
    if out.exists():
        shutil.rmtree(out)  # a throwaway experiment with its own throwaway ledgers
    rng = np.random.default_rng(seed)
    signals = canary_signals(store, canaries, rng)
    included = rng.random(canaries) < 0.5
    k = canaries // 4  # guesses on each side: 2k of the m canaries
    population = len(store.patients) + canaries
    plans = StagePlans(**{s: StagePlan(rounds=1, local_steps=n, batch_patients=batch_patients)
                          for s, n in zip(STAGES, steps)})
    initial = build_module("vae", config, seed=config.vae.seed)
    baseline = _errors(initial, signals)
    report = {"method": "canary", "canaries": canaries, "included": int(included.sum()), "guesses": 2 * k,
              "confidence": confidence, "epsilon_claimed": epsilon, "runs": {}}
    for name, private in (("dp", True), ("non_private", False)):
        policy = PrivacyPolicy(site=f"audit-{name}", private=private, epsilon=epsilon if private else None,
                               delta=0.1 / population, population=population, stages=plans)
        site_store = _site_store(store, signals, included, out / f"{name}-store")
        trained = _train(out / name, site_store, dataclasses.replace(config), policy)
        vae = load_weights_into(ECGVAE(config.model.vae), trained["weights"]["vae"])
        score = baseline - _errors(vae, signals)  # how much better the model got at each canary
        order = np.argsort(-score)
        correct = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        report["runs"][name] = {"epsilon_claimed": trained["epsilon"] if private else None,
                                "correct": correct, "guesses": 2 * k,
                                "epsilon_lower_bound": epsilon_lower_bound(correct, 2 * k, confidence,
                                                                          policy.delta, canaries)}
    report["epsilon_lower_bound"] = report["runs"]["dp"]["epsilon_lower_bound"]
    return report
