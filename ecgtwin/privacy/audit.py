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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score, roc_curve  # noqa: E402

from ecgtwin.checkpoint import Checkpoint  # noqa: E402
from ecgtwin.config import ExperimentConfig  # noqa: E402
from ecgtwin.data.store import SiteStore  # noqa: E402
from ecgtwin.models import ECGVAE  # noqa: E402
from ecgtwin.privacy.ledger import Ledger  # noqa: E402
from ecgtwin.privacy.policy import PrivacyPolicy, StagePlan, StagePlans  # noqa: E402
from ecgtwin.train.private import private_pass  # noqa: E402
from ecgtwin.train.runner import local_pass  # noqa: E402


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
        raise ValueError(f"{store.path}: the audit needs at least 8 patients, found {len(patients)}")
    members, others = patients[: len(patients) // 2], patients[len(patients) // 2:]
    config = _with_seed(config, seed)
    initial = _init_vae(config)
    local_pass("vae", config, store.path, out / "non-private", steps=overfit_steps, progress=progress, patients=members)
    policy = PrivacyPolicy(site="audit", epsilon=epsilon, delta=0.1 / len(members), accountant="rdp", seed=seed,
                           stages=StagePlans(vae=StagePlan(rounds=1, local_steps=steps, batch_patients=batch_patients),
                                             ibe=StagePlan(rounds=0), twin=StagePlan(rounds=0)))
    dp = private_pass("vae", config, store.path, out / "dp", policy, Ledger(out / "dp" / "ledger.jsonl"),
                      progress=progress, patients=members)
    reference = patient_errors(initial, store)
    is_member = np.array([p in set(members) for p in store.patients])
    report = {"store": str(store.path), "members": len(members), "non_members": len(others), "steps": steps,
              "overfit_steps": overfit_steps,
              "epsilon": dp["epsilon"], "delta": policy.delta, "noise_multiplier": dp["noise_multiplier"],
              "models": {}}
    curves = {}
    for name, folder in (("non_private", out / "non-private"), ("dp", out / "dp")):
        vae = Checkpoint(folder).load_weights("vae", ECGVAE(config.model.vae))
        errors = patient_errors(vae, store)
        attacks = {"loss": -errors, "calibrated": reference - errors}
        report["models"][name] = {
            "train_error": float(errors[is_member].mean()), "test_error": float(errors[~is_member].mean()),
            **{attack: attack_metrics(is_member, score) for attack, score in attacks.items()}}
        curves[name] = attacks
    plot_roc(is_member, curves, out / "audit_roc.png", title=f"membership audit, DP at epsilon {dp['epsilon']:.2f}")
    report["figure"] = str(out / "audit_roc.png")
    return report


def _with_seed(config: ExperimentConfig, seed: int) -> ExperimentConfig:
    import dataclasses

    return dataclasses.replace(config, vae=dataclasses.replace(config.vae, seed=seed))


def _init_vae(config: ExperimentConfig) -> ECGVAE:
    """The starting weights both runs share (local_pass and private_pass seed them the same way)."""
    torch.manual_seed(config.vae.seed)
    return ECGVAE(config.model.vae)


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
    fig, ax = plt.subplots(figsize=(5, 5))
    for model, attacks in curves.items():
        for attack, score in attacks.items():
            fpr, tpr, _ = roc_curve(is_member, score)
            ax.plot(fpr, tpr, label=f"{model}, {attack} (AUC {roc_auc_score(is_member, score):.2f})")
    ax.plot([0, 1], [0, 1], "k:", lw=1, label="chance")
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
