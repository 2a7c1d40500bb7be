"""What a privacy officer reads: the plan of a policy on a store, and the ledger with its plot."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path


from ecgtwin.config import ExperimentConfig
from ecgtwin.plot import new_figure
from ecgtwin.data.store import SiteStore
from ecgtwin.privacy.ledger import Ledger, epsilon_of
from ecgtwin.privacy.plan import plan_budget
from ecgtwin.privacy.policy import STAGE_ORDER, load_policy
from ecgtwin.data.split import training_rows
from ecgtwin.errors import MissingInput, UserError
from ecgtwin.weights import parameter_count


def training_patients(store: SiteStore, config: ExperimentConfig | None = None) -> int:
    """Patients that DP-SGD samples from: the store's patients minus the held-out ones."""
    config = config or ExperimentConfig()
    rows = training_rows(store, config.data.held_out_fraction, config.data.split_seed)
    return len(set(store.records.patient_id.to_numpy()[rows]))


def plan_report(policy_path: str | Path, store_path: str | Path, config: ExperimentConfig | None = None) -> dict:
    """The plan a DP pass will use: sampling rates over the policy's public population (checked against the
    store's training patients), the noise per stage and the epsilon expected after each."""
    policy = load_policy(policy_path)
    if not policy.private:
        raise UserError(f"{policy_path}: private: false: this site trains without DP, there is no plan")
    store = SiteStore(store_path)
    n = training_patients(store, config)
    if store.patient_ids_are_records and policy.unit != "record":
        raise UserError(f"{store_path}: the source has no patient ids (one recording = one patient); set unit: "
                        "record in the policy to plan record-level DP")
    population = policy.declared_population(n, where=str(policy_path))
    stages = plan_budget(policy, population, where=str(policy_path))
    return {"policy": str(policy_path), "site": policy.site, "patients": n, "population": population,
            "unit": policy.unit, "epsilon": policy.epsilon,
            "delta": policy.delta, "accountant": policy.accountant, "max_grad_norm": policy.max_grad_norm,
            "records_per_patient": policy.records_per_patient,
            "expected_epsilon": stages[-1].epsilon_after if stages else 0.0,
            "config": (config or ExperimentConfig()).name,
            "stages": [_with_noise_scale(dataclasses.asdict(s), policy, population, config) for s in stages]}


def _with_noise_scale(stage: dict, policy, population: int, config: ExperimentConfig | None) -> dict:
    """What a stage's budget buys: its trainable parameters, and the noise on the MEAN update per step,
    sigma * C / expected batch (the figure that decides whether DP training works at all), per coordinate
    and as a norm over all trainable parameters in units of C, the largest norm the mean of the clipped
    gradients can have: above 1, every step's update is mostly noise."""
    expected_batch = stage["sample_rate"] * population
    noise = stage["noise_multiplier"] * policy.max_grad_norm / expected_batch
    parameters = parameter_count(stage["stage"], config or ExperimentConfig())
    return {**stage, "parameters": parameters, "expected_batch": expected_batch, "noise_on_mean_update": noise,
            "noise_norm_over_clip": noise * parameters ** 0.5 / policy.max_grad_norm,
            "regime": regime(stage["stage"], noise)}


REGIMES = Path(__file__).with_name("regimes.json")


def regime(stage: str, noise_on_mean_update: float, table: Path = REGIMES) -> str:
    """works | degrades | collapses: where this noise on the mean update falls among the measured DP
    fine-tunings of a foundation (bench/privacy_utility.py; measured for the twin stage only, the stage that
    decides the twins' quality), or `not measured`."""
    if stage != "twin" or not table.is_file():
        return "not measured"
    measured = json.loads(table.read_text())
    works, collapses = measured.get("works_up_to"), measured.get("collapses_from")
    if works is not None and noise_on_mean_update <= works:
        return "works"
    if collapses is not None and noise_on_mean_update >= collapses:
        return "collapses"
    if works is None and collapses is None:
        return "not measured"
    return "degrades"


def ledger_report(ledger: Ledger, policy_file: Path, figure: Path | None = None) -> dict:
    """The entries of `ledger` (a site's one ledger: ecgtwin.site_folder), the budget of its policy, and its plot."""
    path = ledger.path
    if not path.is_file():
        raise MissingInput(f"{path}: no privacy ledger (nothing trained at this site yet?)")
    entries = ledger.entries()
    budget = load_policy(policy_file).epsilon if policy_file.is_file() else None
    figure = figure or path.with_name("ledger.png")
    plot_ledger(entries, figure, budget)
    return {"ledger": str(path), "releases": len(entries), "budget": budget,
            "epsilon_spent": entries[-1]["epsilon"] if entries else 0.0,
            # distributed DP: what holds if secure aggregation fails (each release at the site's own noise share)
            "epsilon_spent_local": epsilon_of(ledger.local_history(), entries[-1]["delta"], entries[-1]["accountant"])
            if entries else 0.0,
            "delta": entries[-1]["delta"] if entries else None, "entries": entries, "figure": str(figure)}


def plot_ledger(entries: list[dict], path: Path, budget: float | None) -> None:
    fig = new_figure(figsize=(7, 3.5))
    ax = fig.subplots()
    colors = dict(zip(STAGE_ORDER, ("tab:blue", "tab:orange", "tab:green")))
    steps, eps = [0], [0.0]
    for e in entries:
        steps.append(steps[-1] + e["steps"])
        eps.append(e["epsilon"])
        ax.plot(steps[-2:], eps[-2:], color=colors.get(e["stage"], "k"), lw=2)
    for stage, color in colors.items():
        ax.plot([], [], color=color, lw=2, label=stage)
    if budget is not None:
        ax.axhline(budget, color="tab:red", ls="--", lw=1, label=f"budget {budget:g}")
    ax.set(xlabel="DP-SGD steps at this site (all rounds and stages)", ylabel="epsilon spent",
           title=f"privacy ledger: {len(entries)} releases")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
