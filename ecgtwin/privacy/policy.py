"""The site privacy policy: a YAML file owned by the hospital (never by the server).

It states the budget (epsilon, delta), how DP-SGD runs (clip norm, records per patient per step,
accountant, per-sample gradient mode) and the planned rounds and local steps of each stage. From it
and the number of patients in the site store, `ecgtwin.privacy.plan` derives each stage's noise
multiplier. Errors name the file and the key, e.g. `privacy.yaml: epsilon: must be > 0, got 0`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path

import yaml

from ecgtwin.config import STAGES
from ecgtwin.config import ConfigError, load_yaml, to_dict
from ecgtwin.errors import UserError

STAGE_ORDER = STAGES
ACCOUNTANTS = ("prv", "rdp")
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ghost")
UNITS = ("patient", "record")
# A fixed `seed` makes DP noise repeatable: allowed in a private policy only where this is set (the tests)
TEST_SEED_SWITCH = "ECGTWIN_ALLOW_TEST_SEED"


@dataclasses.dataclass
class StagePlan:
    """The planned use of one stage: `rounds` passes of `local_steps` DP-SGD steps, each step
    Poisson-sampling patients with expected count `batch_patients`."""

    rounds: int = 1
    local_steps: int = 100
    batch_patients: int = 16
    budget_fraction: float | None = None  # share of epsilon if this stage were accounted alone
    noise_multiplier: float | None = None  # fix sigma instead of planning it

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise UserError(f"rounds: must be >= 0, got {self.rounds}")
        if self.local_steps < 1:
            raise UserError(f"local_steps: must be >= 1, got {self.local_steps}")
        if self.batch_patients < 1:
            raise UserError(f"batch_patients: must be >= 1, got {self.batch_patients}")
        if self.budget_fraction is not None and not 0 < self.budget_fraction <= 1:
            raise UserError(f"budget_fraction: must be in (0, 1], got {self.budget_fraction}")
        if self.noise_multiplier is not None and not self.noise_multiplier > 0:
            raise UserError(f"noise_multiplier: must be > 0, got {self.noise_multiplier}")

    @property
    def steps(self) -> int:
        return self.rounds * self.local_steps


@dataclasses.dataclass
class StagePlans:
    vae: StagePlan = dataclasses.field(default_factory=StagePlan)
    ibe: StagePlan = dataclasses.field(default_factory=StagePlan)
    twin: StagePlan = dataclasses.field(default_factory=StagePlan)


@dataclasses.dataclass
class PrivacyPolicy:
    """A site's privacy policy. The guarantee is (epsilon, delta)-DP per PATIENT over everything
    the site trains (all stages, all rounds)."""

    site: str = ""
    private: bool = True  # false: no DP at all (research on public or synthetic data only)
    epsilon: float | None = None  # required when private; refused when not
    delta: float = 1e-5
    # the number of patients the site declares publicly (e.g. rounded up from its count): the sampling rate
    # is batch_patients / population, so neither the noise nor the reply depends on the private count
    population: int | None = None
    unit: str = "patient"  # the privacy unit; "record" only where the data has no patient ids
    max_delta_times_population: float = 0.1  # delta <= this / population; above 0.1 with a warning
    accountant: str = "prv"  # prv (tight, Opacus' default) | rdp
    max_grad_norm: float = 1.0  # per-patient clipping norm
    records_per_patient: int = 1  # at most this many of a patient's records in one step
    # auto: each stage's fastest correct mode as measured by `python -m bench --only privacy`;
    # hooks | functorch | ghost (ghost: VAE/twin with 1 record per patient and 1 noise draw)
    grad_sample_mode: str = "auto"
    public_negatives: int = 15  # IBE DP objective: public synthetic negatives per patient per step
    max_noise_multiplier: float = 20.0  # a plan needing more noise than this is refused as useless
    seed: int | None = None  # None: every pass's randomness from OS entropy (production); tests and audits only
    # Distributed DP: the site's updates leave it only inside Flower's SecAgg+ sum of at least this many sites
    # (each adds noise sigma / sqrt(K); the sum carries sigma, which the ledger charges); None: central noise
    # at every site (docs/privacy.md, "Distributed DP through secure aggregation")
    distributed_sites: int | None = None
    stages: StagePlans = dataclasses.field(default_factory=StagePlans)

    def __post_init__(self) -> None:
        if not self.private:
            if self.epsilon is not None:
                raise UserError(f"private: false with epsilon {self.epsilon:g}: a non-private site spends no "
                                "budget; remove epsilon, or set private: true")
        else:
            if self.epsilon is None:
                raise UserError("epsilon: required for a private site (the total budget over all stages and rounds)")
            if not (math.isfinite(self.epsilon) and self.epsilon > 0):
                raise UserError(f"epsilon: must be > 0 and finite, got {self.epsilon}")
        if not (math.isfinite(self.delta) and 0 < self.delta < 1):
            raise UserError(f"delta: must be in (0, 1), got {self.delta}")
        if self.population is not None and self.population < 1:
            raise UserError(f"population: must be >= 1, got {self.population}")
        if self.unit not in UNITS:
            raise UserError(f"unit: must be one of {', '.join(UNITS)}, got {self.unit!r}")
        if not 0 < self.max_delta_times_population < 1:
            raise UserError(f"max_delta_times_population: must be in (0, 1), got {self.max_delta_times_population}")
        if self.max_delta_times_population > 0.1:
            warnings.warn(f"max_delta_times_population {self.max_delta_times_population:g} > 0.1: delta then "
                          "allows a sizeable chance of releasing a patient outright", stacklevel=2)
        if self.accountant not in ACCOUNTANTS:
            raise UserError(f"accountant: must be one of {', '.join(ACCOUNTANTS)}, got {self.accountant!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise UserError(f"grad_sample_mode: must be one of {', '.join(GRAD_SAMPLE_MODES)}, "
                             f"got {self.grad_sample_mode!r}")
        if not self.max_grad_norm > 0:
            raise UserError(f"max_grad_norm: must be > 0, got {self.max_grad_norm}")
        if self.records_per_patient < 1:
            raise UserError(f"records_per_patient: must be >= 1, got {self.records_per_patient}")
        if self.public_negatives < 1:
            raise UserError(f"public_negatives: must be >= 1, got {self.public_negatives}")
        if self.distributed_sites is not None:
            self._check_distributed()
        fractions = [self.stage(s).budget_fraction for s in self.planned_stages()]
        if any(f is not None for f in fractions) and sum(f or 0 for f in fractions) > 1 + 1e-9:
            raise UserError(f"stages: budget_fraction values sum to {sum(f or 0 for f in fractions):.3g} > 1")

    def _check_distributed(self) -> None:
        if not self.private:
            raise UserError("distributed_sites: distributed DP needs a private site (private: true)")
        if self.distributed_sites < 2:
            raise UserError(f"distributed_sites: must be >= 2 (the sites whose noise shares make up sigma), "
                            f"got {self.distributed_sites}")
        # the sum of K released gradients is the Gaussian mechanism only while the update is linear in the noise
        several = [s for s in self.planned_stages() if self.stage(s).local_steps != 1]
        if several:
            raise UserError(f"distributed_sites: each round must be one DP step (the server steps on the sum), "
                            f"but stages {', '.join(several)} plan local_steps > 1; set local_steps: 1")

    @property
    def site_noise_share(self) -> float:
        """The factor on sigma of the noise this site adds itself: 1 (central), 1/sqrt(K) (distributed)."""
        return 1.0 if self.distributed_sites is None else 1.0 / math.sqrt(self.distributed_sites)

    def stage(self, name: str) -> StagePlan:
        if name not in STAGE_ORDER:
            raise UserError(f"unknown stage {name!r} (known: {', '.join(STAGE_ORDER)})")
        return getattr(self.stages, name)

    def planned_stages(self) -> list[str]:
        return [s for s in STAGE_ORDER if getattr(self.stages, s).rounds > 0]

    def fractions(self) -> dict[str, float]:
        """Each planned stage's budget share: as given; the rest split by steps among the others."""
        stages = self.planned_stages()
        given = {s: self.stage(s).budget_fraction for s in stages if self.stage(s).budget_fraction is not None}
        rest = [s for s in stages if s not in given]
        left = max(0.0, 1.0 - sum(given.values()))
        total_steps = sum(self.stage(s).steps for s in rest)
        shares = {s: left * self.stage(s).steps / total_steps for s in rest} if rest else {}
        return {s: given.get(s, shares.get(s, 0.0)) for s in stages}

    def check_patients(self, n_patients: int, where: str = "") -> None:
        """delta must be well below 1/patients (by default <= 0.1/patients), or the guarantee allows
        releasing a whole patient with non-negligible probability."""
        if n_patients < 1:
            raise UserError(f"{where}: the store has no training patients")
        limit = self.max_delta_times_population / n_patients
        if self.delta > limit:
            raise UserError(f"{where}: delta {self.delta:g} must be <= {self.max_delta_times_population:g}/patients "
                            f"= {self.max_delta_times_population:g}/{n_patients} = {limit:.3g}")

    def public_population(self, where: str = "") -> int:
        """The public patient count a DP pass plans with (the sampling rate and the reply's weight). Nothing
        here looks at the private count: a refusal that did would tell the server about it."""
        if self.population is None:
            raise UserError(f"{where}: population: required for DP training: the number of patients the site "
                            "declares publicly (at least its training patients); the sampling rate and the reply's "
                            "weight use it instead of the private count")
        return self.population

    def declared_population(self, n_training: int, where: str = "") -> int:
        """For the officer's own tools (`ecgtwin privacy plan`, run at the site): the public count, refused
        when the store has more training patients (delta was set against the declared count). A DP pass does
        not refuse (see public_population): it warns at the site only."""
        population = self.public_population(where)
        if n_training > population:
            raise UserError(f"{where}: the store has more training patients than the policy's population "
                            f"{population}; declare a larger population")
        return population


def load_policy(path: str | Path) -> PrivacyPolicy:
    """Read and validate a site privacy policy. A policy file of a private site may not fix the seed: that
    would make the DP noise repeatable across rounds and sites (tests set ECGTWIN_ALLOW_TEST_SEED=1)."""
    policy = load_yaml(PrivacyPolicy, path, "privacy policy")
    if policy.private and policy.seed is not None and os.environ.get(TEST_SEED_SWITCH) != "1":
        raise ConfigError(f"{path}: seed: a fixed seed makes the DP noise repeatable across rounds and sites; "
                          "remove it from a private policy (only tests may set one)")
    return policy


def site_policy(site: str, rounds: tuple[int, ...], local_steps: tuple[int, ...], batch_patients: int,
                budget_fractions: tuple[float, ...] | None = None, **settings) -> PrivacyPolicy:
    """A validated policy planning `rounds[i]` x `local_steps[i]` for each stage in STAGE_ORDER (demo, benchmarks)."""
    fractions = budget_fractions or (None,) * len(STAGE_ORDER)
    plans = {s: StagePlan(rounds=r, local_steps=k, batch_patients=batch_patients, budget_fraction=f)
             for s, r, k, f in zip(STAGE_ORDER, rounds, local_steps, fractions)}
    return PrivacyPolicy(site=site, stages=StagePlans(**plans), **settings)


def save_policy(policy: PrivacyPolicy, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(to_dict(policy), sort_keys=False))
