"""The site's persistent accountant: an append-only ledger of every DP-SGD release.

Each line of ledger.jsonl is one training pass (a stage's local steps in one round): when, which
stage and round, how many steps, the Poisson sampling rate over patients, the noise multiplier, the
clip norm, and the epsilon spent so far after it. The epsilon is always recomputed from the whole
history (composition across rounds and stages), so a restarted process cannot forget spent budget.

A pass is charged BEFORE it trains. A pass that would exceed the budget is refused and the ledger is
left untouched. A pass with a `key` (the site's (run, stage, round, received weights)) is charged once:
a retry of a pass that died before producing output re-uses its entry (nothing was released).

The pass secret: the noise of a keyed pass comes from the site's secret (SECRET, beside the ledger, made
once from the operating system's entropy) and the pass key. A retry of a charged pass (after a crash, from
a second state folder, after its stored reply was deleted) therefore draws the very same noise and
releases the same bytes: the charge it re-uses covers it. Each keyed entry records the secret's
fingerprint, so a lost or replaced secret is refused rather than re-used with fresh noise.

Tamper evidence: every entry carries the sha256 of the previous line (a hash chain), and a ledger bound
to a store keeps a marker in the store (STORE/ledger-marker.json: the ledger's path, its number of
entries and the hash of its last line). A missing, truncated or edited ledger is then refused instead
of starting the budget again, and every command that trains on that store uses that one ledger.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import hmac
import json
import math
import os
import warnings
from pathlib import Path

from opacus.accountants import PRVAccountant, RDPAccountant

from ecgtwin.data.store import LEDGER_MARKER
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


MARKER = LEDGER_MARKER  # in the store (ecgtwin.data.store keeps it across a re-prepare)
SECRET = "site-secret.key"  # beside the ledger: 32 bytes of OS entropy, never sent, never logged


class LedgerDamaged(UserError):
    """The ledger does not match its chain or its store's marker: spent budget cannot be known."""


def _digest(line: str) -> str:
    return hashlib.sha256(line.encode()).hexdigest()


def _fingerprint(secret: bytes) -> str:
    """Names a secret without revealing it (the ledger is read by people who must not hold the secret)."""
    return hashlib.sha256(b"ecgtwin site secret\0" + secret).hexdigest()[:16]


class Ledger:
    def __init__(self, path: str | Path, store: str | Path | None = None) -> None:
        self.path = Path(path)
        self.store = Path(store) if store is not None else None

    @classmethod
    def for_store(cls, store: str | Path, default: str | Path) -> "Ledger":
        """The one ledger of `store`: the one its marker names, else a new one at `default`."""
        marker = Path(store) / MARKER
        if marker.is_file():
            return cls(json.loads(marker.read_text())["ledger"], store)
        return cls(default, store)

    def pass_secret(self, key: str) -> bytes:
        """The secret of the pass `key`: HMAC of the pass key under the site's secret (made on first use).
        Refused when this key was charged under a secret that is not the one here now."""
        with self._locked():
            secret = self._site_secret()
            for entry in self.entries():
                if entry.get("key") == key and entry.get("secret", _fingerprint(secret)) != _fingerprint(secret):
                    raise LedgerDamaged(f"{self.path.with_name(SECRET)}: the site secret is not the one pass {key} "
                                        "was charged under (lost or replaced); a retry would draw fresh noise "
                                        "under the old charge, refusing")
        return hmac.new(secret, key.encode(), hashlib.sha256).digest()

    def _site_secret(self) -> bytes:
        path = self.path.with_name(SECRET)
        if not path.is_file():
            if any(e.get("secret") for e in self.entries()):
                raise LedgerDamaged(f"{path}: the site secret is missing but the ledger has passes charged under "
                                    "it; a retry would draw fresh noise under an old charge, refusing")
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(os.urandom(32))
                f.flush()
                os.fsync(f.fileno())
        secret = path.read_bytes()
        if len(secret) != 32:
            raise LedgerDamaged(f"{path}: the site secret is not 32 bytes; refusing to account")
        return secret

    def entries(self) -> list[dict]:
        lines = self._lines()
        out, digests = [], []
        previous = ""
        for n, line in enumerate(lines, 1):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as exc:  # never guess about spent budget
                raise LedgerDamaged(f"{self.path}: line {n} is not valid JSON ({exc.msg}); "
                                    "the ledger is damaged, refusing to account") from exc
            if "prev" in entry and entry["prev"] != previous:
                raise LedgerDamaged(f"{self.path}: line {n} does not follow line {n - 1} (hash chain broken): the "
                                    "ledger was edited or lines were removed; refusing to account")
            previous = _digest(line)
            digests.append(previous)
            out.append({k: v for k, v in entry.items() if k != "prev"})
        self._check_marker(digests)
        return out

    def _lines(self) -> list[str]:
        if not self.path.is_file():
            return []
        return [line for line in self.path.read_text().splitlines() if line.strip()]

    def _check_marker(self, digests: list[str]) -> None:
        if self.store is None or not (self.store / MARKER).is_file():
            return
        marker = json.loads((self.store / MARKER).read_text())
        if Path(marker["ledger"]) != self.path.resolve():
            raise LedgerDamaged(f"{self.store}: this store's budget is accounted in {marker['ledger']}, not "
                                f"{self.path}; use that ledger")
        m = marker["entries"]
        if len(digests) < m or digests[m - 1] != marker["head"]:
            raise LedgerDamaged(f"{self.path}: the store's marker records {m} releases, the ledger has "
                                f"{len(digests)}{'' if len(digests) < m else ' with a different entry there'}: "
                                "it was deleted, truncated or edited; refusing to account")

    def history(self) -> list[Mechanism]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries()]

    def local_history(self) -> list[Mechanism]:
        """The history with each distributed release at the noise its site added alone (sigma / sqrt(K)):
        what holds against whoever sees one site's update (secure aggregation broken, or K - 1 sites colluding
        with the server)."""
        return [(e.get("noise_multiplier_site", e["noise_multiplier"]), e["sample_rate"], e["steps"])
                for e in self.entries()]

    def spent(self, policy: PrivacyPolicy) -> float:
        return epsilon_of(self.history(), policy.delta, policy.accountant)

    def charge(self, policy: PrivacyPolicy, stage: str, round: int, steps: int, sample_rate: float,
               noise_multiplier: float, patients: int, run: str = "", key: str | None = None) -> dict:
        """Record a pass before it runs; raise BudgetExceeded (ledger unchanged) if it would not fit. With
        `key`, an entry already charged under that key (same steps and noise) is returned instead: the
        caller re-runs a pass that died before releasing anything."""
        with self._locked():  # two processes of one site must not both spend the last of the budget
            if key is not None:
                for entry in self.entries():
                    if entry.get("key") == key and (entry["steps"], entry["sample_rate"], entry["noise_multiplier"]) \
                            == (steps, sample_rate, noise_multiplier):
                        return entry
            return self._charge(policy, stage, round, steps, sample_rate, noise_multiplier, patients, run, key)

    def _charge(self, policy: PrivacyPolicy, stage: str, round: int, steps: int, sample_rate: float,
                noise_multiplier: float, patients: int, run: str, key: str | None) -> dict:
        history = self.history()
        after = epsilon_of(history + [(noise_multiplier, sample_rate, steps)], policy.delta, policy.accountant)
        if not (math.isfinite(after) and after <= policy.epsilon * (1 + 1e-6)):  # a NaN epsilon is refused too
            before = epsilon_of(history, policy.delta, policy.accountant)  # for the message only
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
                 "epsilon": after, "delta": policy.delta, "accountant": policy.accountant, "key": key}
        if policy.distributed_sites is not None:  # sigma is the sum's; the site added its share only
            entry["distributed_sites"] = policy.distributed_sites
            entry["noise_multiplier_site"] = noise_multiplier * policy.site_noise_share
            entry["epsilon_local"] = epsilon_of(self.local_history() + [(entry["noise_multiplier_site"], sample_rate,
                                                                        steps)], policy.delta, policy.accountant)
        if key is not None and self.path.with_name(SECRET).is_file():
            entry["secret"] = _fingerprint(self.path.with_name(SECRET).read_bytes())
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
        """Append one chained line, fsynced, then move the store's marker to it."""
        lines = self._lines()
        line = json.dumps({**entry, "prev": _digest(lines[-1]) if lines else ""})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.store is not None:
            marker = {"ledger": str(self.path.resolve()), "entries": len(lines) + 1, "head": _digest(line)}
            tmp = self.store / f".{MARKER}.tmp"
            tmp.write_text(json.dumps(marker))
            os.replace(tmp, self.store / MARKER)
