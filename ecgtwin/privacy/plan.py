"""Budget planning: the noise multiplier each stage needs so that all planned passes of all stages
together spend exactly the site's epsilon.

First each stage gets the sigma that would spend its `budget_fraction` of epsilon (to 2 %) if it were the
only mechanism (Opacus' get_noise_multiplier with the fast RDP accountant). Composition is sub-additive,
so together they spend less than the budget; all planned sigmas are then scaled by one common factor
until the composed epsilon (the policy's accountant) spends the budget to 0.2 % without exceeding it.
Fixed `noise_multiplier`s are kept as given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

from opacus.accountants.utils import get_noise_multiplier

from ecgtwin.checkpoint import atomic_write
from ecgtwin.config import to_dict
from ecgtwin.privacy.ledger import Mechanism, epsilon_of
from ecgtwin.errors import UserError
from ecgtwin.privacy.policy import PrivacyPolicy


@dataclasses.dataclass
class StageBudget:
    stage: str
    rounds: int
    local_steps: int
    sample_rate: float
    noise_multiplier: float
    epsilon_alone: float  # if this stage were the only thing trained
    epsilon_after: float  # composed, after this stage and those before it

    def mechanism(self) -> Mechanism:
        return (self.noise_multiplier, self.sample_rate, self.rounds * self.local_steps)


class PlanError(UserError):
    """The planned schedule cannot meet the budget."""


def sample_rate(policy: PrivacyPolicy, stage: str, n_patients: int) -> float:
    return min(1.0, policy.stage(stage).batch_patients / n_patients)


def plan_budget(policy: PrivacyPolicy, n_patients: int, where: str = "") -> list[StageBudget]:
    """Each planned stage's sigma and expected epsilon; raises PlanError when the budget cannot be met."""
    policy.check_patients(n_patients, where)
    stages = policy.planned_stages()
    fractions = policy.fractions()
    rates = {s: sample_rate(policy, s, n_patients) for s in stages}
    steps = {s: policy.stage(s).steps for s in stages}
    fixed = {s: policy.stage(s).noise_multiplier for s in stages if policy.stage(s).noise_multiplier is not None}
    free = [s for s in stages if s not in fixed]
    for s in free:
        if fractions[s] <= 0:
            raise PlanError(f"{where}: stage {s} has no budget left (budget_fraction of the others sums to 1)")
    try:
        sigma0 = {s: get_noise_multiplier(target_epsilon=policy.epsilon * fractions[s], target_delta=policy.delta,
                                          sample_rate=rates[s], steps=steps[s], accountant="rdp",
                                          epsilon_tolerance=0.02 * policy.epsilon * fractions[s]) for s in free}
    except ValueError as exc:  # Opacus: "The privacy budget is too low" (sigma beyond its search range)
        raise PlanError(f"{where}: the budget epsilon {policy.epsilon:g} is too small for the planned steps "
                        f"({exc}); plan fewer rounds or steps, smaller batches, or a larger budget") from exc

    known: dict[tuple, float] = {}  # each PRV composition takes about a second: none is computed twice

    def epsilon(history: list[Mechanism]) -> float:
        if tuple(history) not in known:
            known[tuple(history)] = epsilon_of(history, policy.delta, policy.accountant)
        return known[tuple(history)]

    def composed(scale: float) -> float:
        sigma = {**fixed, **{s: scale * sigma0[s] for s in free}}
        return epsilon([(sigma[s], rates[s], steps[s]) for s in stages])

    fixed_only = epsilon([(fixed[s], rates[s], steps[s]) for s in fixed])
    if fixed_only > policy.epsilon:
        raise PlanError(f"{where}: the fixed noise multipliers {fixed} alone spend epsilon {fixed_only:.3f} "
                        f"> budget {policy.epsilon:g}")
    scale = _smallest_scale(composed, policy.epsilon) if free else 1.0
    sigma = {**fixed, **{s: scale * sigma0[s] for s in free}}
    too_noisy = {s: round(v, 2) for s, v in sigma.items() if v > policy.max_noise_multiplier}
    if too_noisy:
        raise PlanError(f"{where}: the budget epsilon {policy.epsilon:g} is too small for the planned steps: "
                        f"noise multiplier {too_noisy} > max_noise_multiplier {policy.max_noise_multiplier:g}; "
                        "plan fewer rounds or steps, smaller batches, or a larger budget")
    out, history = [], []
    for s in stages:
        history.append((sigma[s], rates[s], steps[s]))
        out.append(StageBudget(s, policy.stage(s).rounds, policy.stage(s).local_steps, rates[s], sigma[s],
                               epsilon(history[-1:]), epsilon(history)))
    return out


def _smallest_scale(composed, budget: float, rtol: float = 2e-3) -> float:
    """Smallest common noise scale (at least 0.2) whose composed epsilon stays within the budget and spends
    at least (1 - rtol) of it. Each evaluation is a full PRV composition (about a second), so the search is
    false position on log epsilon against log scale (nearly linear), not bisection: 3-5 evaluations."""
    hi = 1.0
    e_hi = composed(hi)
    while e_hi > budget:  # fixed sigmas of other stages leave less room
        hi *= 1.5
        if hi > 100:
            raise PlanError("the fixed noise multipliers leave no budget for the other stages")
        e_hi = composed(hi)
    lo, e_lo = hi / 1.5, composed(hi / 1.5)  # near the answer: a very small scale is slow to account
    while e_lo <= budget:
        if lo <= 0.2:
            return 0.2
        hi, e_hi = lo, e_lo
        lo = max(0.2, lo / 1.5)
        e_lo = composed(lo)
    x_lo, g_lo = math.log(lo), math.log(e_lo / budget)  # g > 0: over the budget
    x_hi, g_hi = math.log(hi), math.log(e_hi / budget)  # g <= 0: within it
    while g_hi < math.log1p(-rtol) and x_hi - x_lo > 1e-4:
        width = x_hi - x_lo
        x = x_hi - g_hi * width / (g_hi - g_lo)
        x = min(max(x, x_lo + 0.05 * width), x_hi - 0.05 * width)  # keep shrinking from both sides
        g = math.log(composed(math.exp(x)) / budget)
        if g <= 0:
            x_hi, g_hi = x, g
        else:
            x_lo, g_lo = x, g
    return math.exp(x_hi)


def stage_noise(policy: PrivacyPolicy, stage: str, n_patients: int, where: str = "",
                cache: Path | None = None) -> tuple[float, float]:
    """(sampling rate, noise multiplier) a site uses for `stage`: from its own plan, never from the
    server. Planning takes seconds (PRV), so plans are kept in the JSON file `cache`, keyed by the
    policy and the patient count."""
    key = hashlib.sha256(json.dumps([to_dict(policy), n_patients], sort_keys=True).encode()).hexdigest()
    cached = json.loads(cache.read_text()) if cache is not None and cache.is_file() else {}
    if key not in cached:
        cached[key] = [dataclasses.asdict(b) for b in plan_budget(policy, n_patients, where)]
        if cache is not None:
            atomic_write(cache, json.dumps(cached).encode())
    for budget in cached[key]:
        if budget["stage"] == stage:
            return budget["sample_rate"], budget["noise_multiplier"]
    raise PlanError(f"{where}: the privacy policy plans no rounds for stage {stage}")
