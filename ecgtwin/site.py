"""A hospital's side of a federated round, without Flower: the ClientApp (client/) is a thin wrapper.

A `Site` is opened from the SuperNode's node config: `data-path` (the site store), `policy-path` (the
site's privacy policy, written by its privacy officer) and optionally `state-path` (a writable folder for
the privacy ledger, the noise-plan cache, the kept replies and the working checkpoint; default:
POLICY_DIR/state). A store already charged is accounted in the ledger it names (ecgtwin.site_folder).

`Site.train` receives the global weights of the stage being trained and of the frozen earlier stages,
hands them as values to ONE local pass with the site's own steps and noise (from its policy; the server
cannot choose them), and returns the new stage weights and an allowlisted set of aggregate metrics. The
pass's local log stays in the state folder; the last pass's weights are kept there too (state/checkpoint). When the site's
budget would be exceeded, or its policy plans no rounds for the stage, it trains nothing and returns a
refusal with the reason. `check_reply` is the last gate before anything leaves the site.
"""

from __future__ import annotations

import hashlib
import json
import sys
import traceback
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from safetensors.numpy import load_file, save_file

from ecgtwin.checkpoint import Checkpoint, atomic_write
from ecgtwin.conditioning import ensure_population_normalizer
from ecgtwin.config import STAGES, ExperimentConfig, config_from_text, config_text, to_dict
from ecgtwin.data.store import SiteStore
from ecgtwin.privacy import BudgetExceeded, PlanError, load_policy
from ecgtwin.privacy.ledger import LedgerDamaged
from ecgtwin.site_folder import POLICY_FILE, SiteFolder
from ecgtwin.train.result import PassResult
from ecgtwin.device import resolve_device
from ecgtwin.weights import trainable_part, trainable_shapes
from ecgtwin.errors import UserError, MissingInput

# What a PRIVATE site sends besides its noisy weights: only values that are public or DP. epsilon and delta
# follow from the public plan; num-examples (the weight in aggregation) is the policy's public population;
# refused is a flag. No loss, no count of the site's patients or records, no timing.
PRIVATE_METRICS = frozenset({"num-examples", "epsilon", "delta", "refused"})
# A NON-private site (public or synthetic data only, `private: false`) may also report aggregate counts, the
# mean loss of its pass and its wall time (train-seconds, for the overhead benchmark).
ALLOWED_METRICS = PRIVATE_METRICS | {"patients", "records", "loss", "train-seconds"}
# The only config values a site ever sends: its name and, when it refuses, why.
ALLOWED_CONFIG = frozenset({"site", "reason"})


class ReplyRejected(RuntimeError):
    """A reply that must not leave the site (an array or a metric outside the allowlist)."""


def check_reply(stage: str, config: ExperimentConfig, arrays: Mapping[str, np.ndarray] | None,
                metrics: Mapping[str, Any], info: Mapping[str, Any] | None = None,
                shapes: Mapping[str, tuple[int, ...]] | None = None, private: bool = True) -> None:
    """Raise ReplyRejected unless the arrays are exactly the stage's trainable tensors (names and shapes; a
    frozen tensor is never sent), all finite, and every metric (a number) and config key is allowlisted
    (PRIVATE_METRICS for a private site)."""
    if arrays is not None:
        shapes = dict(shapes) if shapes is not None else trainable_shapes(stage, config)
        names = set(arrays)
        if names != set(shapes):
            extra, missing = sorted(names - set(shapes)), sorted(set(shapes) - names)
            raise ReplyRejected(f"reply arrays are not the {stage} model's trainable tensors: unexpected {extra[:3]}, "
                                f"missing {missing[:3]}")
        for name, value in arrays.items():
            if tuple(np.shape(value)) != tuple(shapes[name]):
                raise ReplyRejected(f"reply array {name}: shape {tuple(np.shape(value))} is not the model's "
                                    f"{tuple(shapes[name])}")
            if not np.issubdtype(np.asarray(value).dtype, np.floating):
                raise ReplyRejected(f"reply array {name}: dtype {np.asarray(value).dtype} is not a weight dtype")
            if not np.isfinite(value).all():
                raise ReplyRejected(f"reply array {name}: non-finite weights")
    allowed = PRIVATE_METRICS if private else ALLOWED_METRICS
    for key, value in metrics.items():
        if key not in allowed:
            raise ReplyRejected(f"reply metric {key!r} is not in the allowlist ({', '.join(sorted(allowed))})")
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ReplyRejected(f"reply metric {key!r}: {type(value).__name__} is not a single number")
    for key, value in (info or {}).items():
        if key not in ALLOWED_CONFIG:
            raise ReplyRejected(f"reply config {key!r} is not in the allowlist ({', '.join(sorted(ALLOWED_CONFIG))})")
        if not isinstance(value, str):
            raise ReplyRejected(f"reply config {key!r}: must be text")


def site_paths(node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None) -> SiteFolder:
    """This node's site folder. From the node config (data-path, policy-path, state-path); in simulation,
    where nodes only have a partition-id, from the run config's sites-root: the partition-id-th folder
    (sorted) of <sites-root>/<site>/{store, privacy.yaml, state}."""
    if "data-path" in node_config or "policy-path" in node_config:
        missing = [k for k in ("data-path", "policy-path") if not node_config.get(k)]
        if missing:
            raise UserError(f"node config: {', '.join(missing)} missing (set them with flower-supernode --node-config)")
        return SiteFolder.of(str(node_config["data-path"]), str(node_config["policy-path"]),
                             str(node_config.get("state-path") or "") or None)
    root = str((run_config or {}).get("sites-root", "") or "")
    if "partition-id" not in node_config or not root:
        raise UserError("node config has no data-path/policy-path (flower-supernode --node-config "
                         "'data-path=\"...\" policy-path=\"...\"'), and this is not a simulation with a sites-root")
    sites = sorted(p.parent for p in Path(root).glob(f"*/{POLICY_FILE}"))
    index = int(node_config["partition-id"])
    if not 0 <= index < len(sites):
        raise UserError(f"sites-root {root}: simulation node {index} has no site (found {len(sites)} sites with "
                         f"{POLICY_FILE})")
    return SiteFolder.at(sites[index])


class Site:
    def __init__(self, data_path: str | Path, policy_path: str | Path, state_path: str | Path | None = None,
                 progress: bool = False, device: str = "auto") -> None:
        self.folder = SiteFolder.of(data_path, policy_path, state_path)
        self.device = device  # where its passes compute: the SuperNode's node config `device` (auto|cpu|cuda[:N])
        self.policy = load_policy(self.folder.policy)
        if not self.folder.store.is_dir():
            raise MissingInput(f"{self.folder.store}: site store does not exist")
        self.ledger = self.folder.ledger()
        self.work = self.folder.checkpoint
        self.name = self.policy.site or self.folder.store.name
        self.progress = progress
        self.last_result: PassResult | None = None  # the last pass this object computed (site-side figures)
        self.last_key: str | None = None  # the pass key of the last request

    @classmethod
    def open(cls, folder: SiteFolder, progress: bool = False, device: str = "auto") -> "Site":
        return cls(folder.store, folder.policy, folder.state, progress=progress, device=device)

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any], run_config: Mapping[str, Any] | None = None,
                         progress: bool = False) -> "Site":
        return cls.open(site_paths(node_config, run_config), progress=progress,
                        device=str(node_config.get("device", "auto")))

    def train(self, stage: str, server_round: int, run_id: str, config_yaml: str,
              weights: Mapping[str, Mapping[str, np.ndarray]],
              proximal_mu: float = 0.0, secure: bool = False) -> tuple[dict[str, np.ndarray] | None, dict, str | None]:
        """One local pass of `stage` from the received global weights. Returns (new stage weights or None,
        allowlisted metrics, refusal reason or None). Every outcome is kept under the pass's key before it is
        returned, refusals too: a repeated request gets it again and nothing is computed twice. A failure
        (an exception) comes back as a fixed category, its text in the site's state/errors.log; a retry
        computes again, with the same noise (the pass secret comes from the site's secret and the key).
        `secure`: the request came through secure aggregation (a distributed-DP site trains only then)."""
        if stage not in STAGES:
            raise UserError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
        if self.policy.distributed_sites is not None and not secure:  # its noise share alone is not the budget's
            return None, {}, (f"{self.name}: the site's policy releases updates only through secure aggregation "
                              f"of at least {self.policy.distributed_sites} sites (distributed DP); not training")
        received = {s: dict(weights[s]) for s in STAGES[: STAGES.index(stage) + 1] if s in weights and len(weights[s])}
        key = pass_key(run_id, stage, server_round, received, config_yaml, proximal_mu)
        self.last_key = key  # the pass this request is (client.secure records what it unmasks under it)
        stored = self._stored(key)
        if stored is not None:  # a repeated request: the same output again, at no cost (post-processing)
            return stored
        try:
            outcome = self._outcome(stage, server_round, run_id, config_yaml, received, proximal_mu, key)
        except Exception as exc:  # noqa: BLE001  its text may hold paths or data: it stays at the site
            return None, {}, site_failure(self, exc)
        self._store(key, *outcome)
        return outcome

    def _outcome(self, stage: str, server_round: int, run_id: str, config_yaml: str, received: dict,
                 proximal_mu: float, key: str) -> tuple[dict[str, np.ndarray] | None, dict, str | None]:
        config = config_from_text(config_yaml)
        plan = self.policy.stage(stage)
        if config.stage(stage).trainable == "frozen":
            return None, {}, f"{self.name}: stage {stage} is frozen in the run's config; there is nothing to train"
        if plan.rounds < 1:
            return None, {}, (f"{self.name}: the site's privacy policy plans no rounds for stage {stage}; "
                              "not training it")
        try:
            result = self._pass(stage, config, received, server_round, plan.local_steps, run_id, proximal_mu, key)
        except (BudgetExceeded, PlanError) as exc:
            return None, {}, str(exc)
        except LedgerDamaged as exc:  # its text names local paths: the server gets the fact only
            _log_error(self, exc)
            return None, {}, (f"{self.name}: the privacy ledger is missing, truncated or edited; refusing to "
                              "train (details in the site's state/errors.log)")
        self._keep(config, received, result)
        self.last_result = result  # for a caller at the site (`ecgtwin train --policy`); never sent
        if not all(np.isfinite(v).all() for v in result.weights.values()):  # never sent, whatever the cause
            return None, {}, f"{self.name}: the pass produced non-finite weights; nothing was sent"
        if self.policy.private:
            metrics = {"num-examples": int(result.summary["population"]),
                       "epsilon": float(result.summary["epsilon"]), "delta": float(result.summary["delta"])}
        else:
            metrics = {"num-examples": int(result.summary["patients"]), "patients": int(result.summary["patients"]),
                       "records": int(result.summary["records_used"]), "loss": float(result.summary["loss"]),
                       "train-seconds": float(result.summary["seconds"])}
        reply = trainable_part(stage, config, result.weights)  # frozen tensors never leave the site
        check_reply(stage, config, reply, metrics, private=self.policy.private)
        return reply, metrics, None

    def _stored(self, key: str) -> tuple[dict[str, np.ndarray] | None, dict, str | None] | None:
        folder = self.folder.passes / key
        if not (folder / "metrics.json").is_file():
            return None
        kept = json.loads((folder / "metrics.json").read_text())
        if "refusal" in kept:
            return None, {}, kept["refusal"]
        weights = {k: np.asarray(v) for k, v in load_file(str(folder / "weights.safetensors")).items()}
        return weights, kept, None

    def _store(self, key: str, weights: dict[str, np.ndarray] | None, metrics: dict, refusal: str | None) -> None:
        """The pass's outcome, kept before it is sent (metrics.json last: its presence means complete)."""
        folder = self.folder.passes / key
        folder.mkdir(parents=True, exist_ok=True)
        if refusal is not None:
            atomic_write(folder / "metrics.json", json.dumps({"refusal": refusal}).encode())
            return
        save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(folder / "weights.safetensors"))
        atomic_write(folder / "metrics.json", json.dumps(metrics).encode())

    def spent(self) -> float | None:
        """Epsilon spent so far by this site (None for a non-private site)."""
        return self.ledger.spent(self.policy) if self.policy.private else None

    def _pass(self, stage: str, config: ExperimentConfig, weights: dict, server_round: int, steps: int,
              run_id: str, proximal_mu: float = 0.0, key: str | None = None) -> PassResult:
        store = SiteStore(self.folder.store)
        device = resolve_device(self.device)
        if self.policy.private:
            from ecgtwin.train.private import private_pass

            return private_pass(stage, config, store, weights, self.policy, self.ledger, round=server_round,
                                steps=steps, run=run_id, proximal_mu=proximal_mu, cache_dir=self.folder.cache,
                                progress=self.progress, charge_key=key, device=device)
        from ecgtwin.train.local import local_pass

        return local_pass(stage, config, store, weights, steps, round=server_round, proximal_mu=proximal_mu,
                          cache_dir=self.folder.cache, progress=self.progress, device=device)

    def _keep(self, config: ExperimentConfig, received: dict, result: PassResult) -> None:
        """The site's own record of the pass: its local log, and the weights it had and made (a checkpoint
        folder that `ecgtwin generate` can read once all stages are there). None of it is sent."""
        checkpoint = Checkpoint(self.work)
        if (self.work / "config.yaml").is_file() and to_dict(checkpoint.config().model) != to_dict(config.model):
            for name in [*(f"{s}.safetensors" for s in STAGES), "config.yaml"]:
                (self.work / name).unlink(missing_ok=True)  # weights of another model configuration
        checkpoint.save_config(config)
        ensure_population_normalizer(self.work)
        for s, arrays in received.items():
            if s != result.stage:
                checkpoint.save_arrays(s, arrays)
        checkpoint.save_arrays(result.stage, result.weights)
        name = f"dp_{result.stage}_loss.jsonl" if result.entry is not None else f"{result.stage}_loss.jsonl"
        with (self.work / name).open("a") as f:
            f.writelines(json.dumps(line) + "\n" for line in result.log)


def train_with_policy(stage: str, config: ExperimentConfig, store: str | Path, policy: str | Path,
                      out: str | Path, progress: bool = True, foundation: str | Path | None = None,
                      device: str = "auto") -> dict:
    """`ecgtwin train --policy`: the policy's rounds of `stage` at this site, each ONE pass through
    `Site.train` exactly as in a federated round (the site's steps and noise, its ledger, the pass key and
    secret, the kept outcome), from and into checkpoint folder `out` (started from `foundation` if given)."""
    from ecgtwin.train.centralised import adopt_foundation, check_or_save_config

    site = Site(store, policy, progress=progress, device=device)
    plan = site.policy.stage(stage)
    if plan.rounds < 1:
        raise UserError(f"{policy}: the policy plans no rounds for stage {stage}")
    checkpoint = Checkpoint(out)
    with checkpoint.lock():  # the same folder lock as train_stage: one training writes a folder
        check_or_save_config(checkpoint, config)
        start = adopt_foundation(checkpoint, config, stage, foundation)
        if start is not None and not checkpoint.has(stage):
            checkpoint.save_arrays(stage, start)
        ensure_population_normalizer(checkpoint.path)  # fixed population statistics (see train/local.py)
        weights = {s: checkpoint.load_arrays(s) for s in STAGES[: STAGES.index(stage) + 1] if checkpoint.has(s)}
        summaries = []
        for rnd in range(1, plan.rounds + 1):
            site.last_result = None
            reply, metrics, refusal = site.train(stage, rnd, "train --policy", config_text(config), weights)
            if refusal is not None:
                raise UserError(refusal)
            weights[stage] = {**(weights.get(stage) or Checkpoint(site.work).load_arrays(stage)), **reply}
            checkpoint.save_arrays(stage, weights[stage])
            result = site.last_result  # None: the kept outcome of this very pass, replayed at no cost
            if result is not None:
                with (checkpoint.path / f"dp_{stage}_loss.jsonl").open("a") as f:
                    f.writelines(json.dumps(line) + "\n" for line in result.log)
            summaries.append(result.summary if result is not None else {"stage": stage, "round": rnd, **metrics})
    return {**summaries[-1], "checkpoint": str(checkpoint.path), "rounds": len(summaries),
            "losses": [s.get("loss") for s in summaries]}


def pass_key(run_id: str, stage: str, server_round: int, received: Mapping[str, Mapping[str, np.ndarray]],
             config_yaml: str, proximal_mu: float) -> str:
    """What identifies a pass: the run, stage and round, and everything it starts from (the received weights,
    the experiment config, the proximal term). The same request gets the same answer."""
    h = hashlib.sha256(json.dumps([run_id, stage, server_round, config_yaml, proximal_mu]).encode())
    for s in sorted(received):
        for name in sorted(received[s]):
            h.update(f"{s}/{name}".encode())
            h.update(np.ascontiguousarray(received[s][name]).tobytes())
    return f"{stage}-r{server_round}-{h.hexdigest()[:24]}"


# What the server learns of a failure at the site: a fixed category, never the exception's text (it may
# hold local paths, patient ids or data-dependent numbers). The full text goes to the site's own log.
FAILURE_CATEGORIES = (("MissingInput", "a file the site needs is missing"),
                      ("ConfigError", "the configuration was refused"),
                      ("UserError", "the site's data or settings were refused"),
                      ("MemoryError", "out of memory"),
                      ("Exception", "internal error"))


def site_failure(site: "Site | None", exc: BaseException) -> str:
    """The reason sent for a pass that failed: the site's name and a fixed category. The exception itself is
    appended to the site's state/errors.log, or, when the site could not even be opened, written to this
    process's own stderr (the SuperNode's log, which stays at the site)."""
    names = {k.__name__ for k in type(exc).__mro__}
    category = next(text for name, text in FAILURE_CATEGORIES if name in names)
    if site is None:
        sys.stderr.write("".join(traceback.format_exception(exc)))
        return f"site error: {category} (details in the SuperNode's log)"
    _log_error(site, exc)
    return f"{site.name}: site error: {category} (details in the site's state/errors.log)"


def _log_error(site: "Site", exc: BaseException) -> None:
    site.folder.state.mkdir(parents=True, exist_ok=True)
    with site.folder.errors_log.open("a") as log:
        log.write("".join(traceback.format_exception(exc)) + "\n")
