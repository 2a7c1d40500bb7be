"""The site's persistent accountant: an append-only ledger of every DP-SGD release.

Each line of ledger.jsonl is one training pass (a stage's local steps in one round): when, which
stage and round, how many steps, the Poisson sampling rate over patients, the noise multiplier, the
clip norm, and the epsilon spent so far after it. The epsilon is always recomputed from the whole
history (composition across rounds and stages), so a restarted process cannot forget spent budget.

A pass is charged BEFORE it trains: if the process dies during the pass, the budget stays spent
(the noisy updates may already have left the site). A pass that would exceed the budget is refused
and the ledger is left untouched.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import math
import os
import warnings
from pathlib import Path

from opacus.accountants import PRVAccountant, RDPAccountant

from ecgtwin.privacy.policy import PrivacyPolicy
from ecgtwin.errors import UserError

Mechanism = tuple[float, float, int]  # (noise multiplier, sampling rate, steps), as Opacus' history


class BudgetExceeded(UserError):
    """The next pass would spend more than the site's budget."""


def epsilon_of(history: list[Mechanism], delta: float, accountant: str = "prv") -> float:
    """Epsilon of the composition of Poisson-subsampled Gaussian mechanisms, at `delta`."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    acc.history = history
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha", PRV's overflow in exp
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


class Ledger:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def entries(self) -> list[dict]:
        if not self.path.is_file():
            return []
        out = []
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:  # never guess about spent budget
                    raise UserError(f"{self.path}: line {n} is not valid JSON ({exc.msg}); "
                                     "the ledger is damaged, refusing to account") from exc
        return out

    def history(self) -> list[Mechanism]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries()]

    def spent(self, policy: PrivacyPolicy) -> float:
        return epsilon_of(self.history(), policy.delta, policy.accountant)

    def charge(self, policy: PrivacyPolicy, stage: str, round: int, steps: int, sample_rate: float,
               noise_multiplier: float, patients: int, run: str = "") -> dict:
        """Record a pass before it runs; raise BudgetExceeded (ledger unchanged) if it would not fit."""
        with self._locked():  # two processes of one site must not both spend the last of the budget
            return self._charge(policy, stage, round, steps, sample_rate, noise_multiplier, patients, run)

    def _charge(self, policy: PrivacyPolicy, stage: str, round: int, steps: int, sample_rate: float,
                noise_multiplier: float, patients: int, run: str) -> dict:
        history = self.history()
        before = epsilon_of(history, policy.delta, policy.accountant)
        after = epsilon_of(history + [(noise_multiplier, sample_rate, steps)], policy.delta, policy.accountant)
        if not (math.isfinite(after) and after <= policy.epsilon * (1 + 1e-6)):  # a NaN epsilon is refused too
            raise BudgetExceeded(
                f"{policy.site or self.path.parent}: privacy budget refused: spent epsilon {before:.3f} of "
                f"{policy.epsilon:g} (delta {policy.delta:g}); asked {stage} round {round}: {steps} steps at "
                f"sampling rate {sample_rate:.4g}, noise multiplier {noise_multiplier:.4g}, which would bring "
                f"it to {after:.3f}")
        entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "site": policy.site,
                 "run": run, "stage": stage, "round": round, "steps": steps, "sample_rate": sample_rate,
                 "noise_multiplier": noise_multiplier, "max_grad_norm": policy.max_grad_norm,
                 "records_per_patient": policy.records_per_patient, "patients": patients, "unit": policy.unit,
                 "population": policy.population,
                 "epsilon": after, "delta": policy.delta, "accountant": policy.accountant}
        self._append(entry)
        return entry

    @contextlib.contextmanager
    def _locked(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _append(self, entry: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
