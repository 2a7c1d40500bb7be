"""An empirical membership-inference audit at a site: does a trained model give its patients away?

The store's patients are split at random into members and non-members. A VAE is trained on the
members twice, without DP (a deliberately long run on few patients, which overfits) and with DP-SGD
at the audited epsilon. Each model is then attacked:
- loss attack (Yeom et al.): a patient whose ECGs the model reconstructs unusually well is guessed
  to be a member; the score is minus the patient's mean reconstruction error;
- calibrated attack (shadow-free, Watson et al.'s difficulty calibration): the same error minus the
  error of the model's own starting weights, so that patients who are simply easy to reconstruct
  are not mistaken for members.
Reported per model and attack: ROC AUC (0.5 = no better than chance) and the TPR at 10 % and 1 % FPR.
The audit's numbers are computed on patient data and are not themselves private: they are for the
site's privacy officer, not for release.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dataclasses

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from ecgtwin.checkpoint import Checkpoint
from ecgtwin.config import ExperimentConfig
from ecgtwin.data.store import SiteStore
from ecgtwin.errors import UserError
from ecgtwin.models import ECGVAE
from ecgtwin.plot import new_figure
from ecgtwin.privacy.ledger import Ledger
from ecgtwin.privacy.policy import PrivacyPolicy, StagePlan, StagePlans
from ecgtwin.train.local import local_pass
from ecgtwin.train.private import private_pass
from ecgtwin.weights import build_module, load_weights_into


def membership_audit(store_path: str | Path, config: ExperimentConfig, out: str | Path, epsilon: float = 8.0,
                     steps: int = 300, overfit_steps: int = 600, batch_patients: int = 8, seed: int = 0,
                     progress: bool = True) -> dict:
    """Train a non-private VAE (`overfit_steps`) and a DP one (`steps`) on half of the store's patients
    and attack both; returns the report."""
    store, out = SiteStore(store_path), Path(out)
    if out.exists():
        shutil.rmtree(out)  # an audit is a throwaway experiment with its own throwaway ledger
    patients = list(np.random.default_rng(seed).permutation(store.patients))
    if len(patients) < 8:
        raise UserError(f"{store.path}: the audit needs at least 8 patients, found {len(patients)}")
    members, others = patients[: len(patients) // 2], patients[len(patients) // 2:]
    config = dataclasses.replace(config, vae=dataclasses.replace(config.vae, seed=seed))
    initial = build_module("vae", config, seed=seed)  # the starting weights both runs share
    plain = local_pass("vae", config, store, {}, steps=overfit_steps, patients=members, progress=progress)
    # a throwaway run whose model is never released: a fixed seed keeps the audit reproducible
    policy = PrivacyPolicy(site="audit", epsilon=epsilon, delta=0.1 / len(members), accountant="rdp", seed=seed,
                           population=len(members),
                           stages=StagePlans(vae=StagePlan(rounds=1, local_steps=steps, batch_patients=batch_patients),
                                             ibe=StagePlan(rounds=0), twin=StagePlan(rounds=0)))
    result = private_pass("vae", config, store, {}, policy, Ledger(out / "dp" / "ledger.jsonl"),
                          progress=progress, patients=members)
    dp = result.summary
    trained = {"non_private": plain.weights, "dp": result.weights}
    for name, weights in trained.items():  # kept for the officer: out/<model>/vae.safetensors
        Checkpoint(out / name.replace("_", "-")).save_arrays("vae", weights)
    reference = patient_errors(initial, store)
    is_member = np.array([p in set(members) for p in store.patients])
    report = {"store": str(store.path), "members": len(members), "non_members": len(others), "steps": steps,
              "overfit_steps": overfit_steps,
              "epsilon": dp["epsilon"], "delta": policy.delta, "noise_multiplier": dp["noise_multiplier"],
              "models": {}}
    curves = {}
    for name, weights in trained.items():
        vae = load_weights_into(ECGVAE(config.model.vae), weights)
        errors = patient_errors(vae, store)
        attacks = {"loss": -errors, "calibrated": reference - errors}
        report["models"][name] = {
            "train_error": float(errors[is_member].mean()), "test_error": float(errors[~is_member].mean()),
            **{attack: attack_metrics(is_member, score) for attack, score in attacks.items()}}
        curves[name] = attacks
    plot_roc(is_member, curves, out / "audit_roc.png", title=f"membership audit, DP at epsilon {dp['epsilon']:.2f}")
    report["figure"] = str(out / "audit_roc.png")
    return report


@torch.no_grad()
def patient_errors(vae: ECGVAE, store: SiteStore, batch_size: int = 64) -> np.ndarray:
    """Each patient's mean reconstruction MSE (posterior mean, no sampling), in store.patients order."""
    vae.eval()
    signals = store.signals
    per_record = []
    for i in range(0, len(signals), batch_size):
        x = torch.as_tensor(np.asarray(signals[i:i + batch_size]), dtype=torch.float32)
        mean, _ = vae.encode(x)
        per_record.append((vae.decode(mean) - x).pow(2).flatten(1).mean(1))
    per_record = torch.cat(per_record).numpy()
    return np.array([per_record[store.records_of(p)].mean() for p in store.patients])


def attack_metrics(is_member: np.ndarray, score: np.ndarray) -> dict:
    fpr, tpr, _ = roc_curve(is_member, score)
    return {"auc": float(roc_auc_score(is_member, score)),
            "tpr_at_fpr_0.1": float(tpr[fpr <= 0.1].max(initial=0.0)),
            "tpr_at_fpr_0.01": float(tpr[fpr <= 0.01].max(initial=0.0))}


def plot_roc(is_member: np.ndarray, curves: dict[str, dict[str, np.ndarray]], path: Path, title: str) -> None:
    fig = new_figure(figsize=(5, 5))
    ax = fig.subplots()
    for model, attacks in curves.items():
        for attack, score in attacks.items():
            fpr, tpr, _ = roc_curve(is_member, score)
            ax.plot(fpr, tpr, label=f"{model}, {attack} (AUC {roc_auc_score(is_member, score):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
