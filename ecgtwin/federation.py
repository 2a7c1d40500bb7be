"""The coordinator's side of a federated run, without Flower: run settings, global weights, the round
checkpoint (resume), the metrics log and plot, the final model, and robust aggregation.

server/ (the Flower ServerApp) drives the rounds and talks to the SuperNodes; everything it keeps or
writes goes through here, so it can be tested without Flower. See docs/federation.md.

The run folder (`out`):

    out/state.npz          the round checkpoint: every stage's global weights so far, the server optimiser
                           moments (FedAdam), the completed rounds and the metrics history; written
                           atomically after every round, read back on start (resume)
    out/metrics.jsonl      one line per round: what each site reported, who refused and why, who failed
    out/metrics.png        loss and epsilon per site over the rounds
    out/model/             the global model as an ecgtwin checkpoint (what `ecgtwin generate` reads)
    out/status.json        finished | failed, with the reason (flwr run may exit 0 when a run failed)
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import yaml

from ecgtwin.checkpoint import STAGES, Checkpoint, atomic_write
from ecgtwin.config import ConfigError, ExperimentConfig, from_dict, load_config, to_dict
from ecgtwin.models import ECGVAE, AdaXDenoiser, IndividualBaseExtractor

Weights = dict[str, np.ndarray]
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedmedian", "fedtrimmedavg")
STATE_FILE = "state.npz"


class FederationError(RuntimeError):
    """The run cannot go on (e.g. fewer sites replied than the configured minimum)."""


# ---------------------------------------------------------------------------------------------------------
# models as plain arrays


def build_module(stage: str, config: ExperimentConfig) -> torch.nn.Module:
    if stage == "vae":
        return ECGVAE(config.model.vae)
    if stage == "ibe":
        return IndividualBaseExtractor(config.model.ibe)
    if stage == "twin":
        return AdaXDenoiser(config.model.dit)
    raise ValueError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")


def model_shapes(stage: str, config: ExperimentConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a stage's model: the only arrays a site may send."""
    return {k: tuple(v.shape) for k, v in build_module(stage, config).state_dict().items()}


def module_weights(module: torch.nn.Module) -> Weights:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def initial_weights(stage: str, config: ExperimentConfig) -> Weights:
    """The stage's starting weights, the same for every site (seeded by the stage's seed)."""
    with torch.random.fork_rng():
        torch.manual_seed(getattr(config, stage).seed)
        return module_weights(build_module(stage, config))


def load_weights_into(module: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """Strict: every name present with the model's shape, nothing else."""
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, strict=True)
    return module


def config_text(config: ExperimentConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def config_from_text(text: str, where: str = "the server's config") -> ExperimentConfig:
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {str(exc).splitlines()[0]}") from exc
    return from_dict(ExperimentConfig, data, where)


# ---------------------------------------------------------------------------------------------------------
# run settings (Flower run config: flat keys with dashes, values str/int/float/bool)


@dataclasses.dataclass
class FederationSettings:
    config: str = "configs/demo.yaml"
    out: str = "federation-output"
    run_name: str = "ecgtwin"
    rounds_vae: int = 1
    rounds_ibe: int = 1
    rounds_twin: int = 1
    strategy: str = "fedavg"
    min_nodes: int = 2
    node_wait: float = 120.0  # seconds to wait for min_nodes SuperNodes to connect
    round_timeout: float = 3600.0  # seconds to wait for the replies of one round
    proximal_mu: float = 0.01  # FedProx
    server_lr: float = 0.01  # FedAdam's eta
    trim_beta: float = 0.2  # FedTrimmedAvg: fraction cut at each tail
    sites_root: str = ""  # simulation only: <sites-root>/<site>/{store,privacy.yaml,state}

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any], base: Path | None = None) -> "FederationSettings":
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name in fields:
                kind = type(fields[name].default)
                values[name] = kind(value) if kind is not str else str(value)
        settings = cls(**values)
        if settings.strategy not in STRATEGIES:
            raise ConfigError(f"run config: strategy: must be one of {', '.join(STRATEGIES)}, got {settings.strategy!r}")
        if settings.min_nodes < 1:
            raise ConfigError(f"run config: min-nodes: must be >= 1, got {settings.min_nodes}")
        for stage in STAGES:
            if settings.rounds(stage) < 0:
                raise ConfigError(f"run config: rounds-{stage}: must be >= 0, got {settings.rounds(stage)}")
        if not 0 <= settings.trim_beta < 0.5:
            raise ConfigError(f"run config: trim-beta: must be in [0, 0.5), got {settings.trim_beta}")
        return settings

    def rounds(self, stage: str) -> int:
        return getattr(self, f"rounds_{stage}")

    def config_path(self, base: Path | None = None) -> Path:
        """The experiment YAML: absolute, else relative to the working directory, else to `base` (the app)."""
        path = Path(self.config)
        if path.is_absolute() or path.is_file() or base is None:
            return path
        return base / path

    def load_config(self, base: Path | None = None) -> ExperimentConfig:
        return load_config(self.config_path(base))


# ---------------------------------------------------------------------------------------------------------
# the round checkpoint


@dataclasses.dataclass
class RunState:
    """What the server must keep to resume a run with no round lost or repeated."""

    run_name: str
    model: dict  # the model configuration the weights belong to
    weights: dict[str, Weights] = dataclasses.field(default_factory=dict)  # global weights per stage
    moments: dict[str, dict[str, Weights]] = dataclasses.field(default_factory=dict)  # stage -> m_t/v_t
    completed: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    history: list[dict] = dataclasses.field(default_factory=list)  # one metrics entry per round

    def done(self, stage: str, round: int) -> bool:
        return (stage, round) in {tuple(c) for c in self.completed}

    def last(self) -> tuple[str, int] | None:
        return tuple(self.completed[-1]) if self.completed else None

    def save(self, out: str | Path) -> Path:
        """One file, written atomically (temp + rename): a crash leaves the previous round's checkpoint."""
        arrays: dict[str, np.ndarray] = {}
        for stage, weights in self.weights.items():
            arrays.update({f"weights/{stage}/{k}": v for k, v in weights.items()})
        for stage, moments in self.moments.items():
            for name, weights in moments.items():
                arrays.update({f"moments/{stage}/{name}/{k}": v for k, v in weights.items()})
        meta = {"run_name": self.run_name, "model": self.model, "completed": [list(c) for c in self.completed],
                "history": self.history, "saved": _now()}
        arrays["__meta__"] = np.frombuffer(json.dumps(meta, default=_json_default).encode(), dtype=np.uint8)
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        path = Path(out) / STATE_FILE
        atomic_write(path, buffer.getvalue())
        return path

    @classmethod
    def load(cls, out: str | Path) -> "RunState | None":
        path = Path(out) / STATE_FILE
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["__meta__"]).decode())
            state = cls(meta["run_name"], meta["model"], completed=[tuple(c) for c in meta["completed"]],
                        history=meta["history"])
            for key in data.files:
                parts = key.split("/")
                if parts[0] == "weights":
                    state.weights.setdefault(parts[1], {})["/".join(parts[2:])] = data[key]
                elif parts[0] == "moments":
                    state.moments.setdefault(parts[1], {}).setdefault(parts[2], {})["/".join(parts[3:])] = data[key]
        return state


def open_run(out: str | Path, settings: FederationSettings, config: ExperimentConfig) -> tuple[RunState, bool]:
    """The run's state: resumed from out/state.npz when present (same model configuration), else new."""
    state = RunState.load(out)
    if state is None:
        return RunState(settings.run_name, to_dict(config.model)), False
    if state.model != to_dict(config.model):
        raise ConfigError(f"{out}: holds a run of a different model configuration; use another out folder")
    return state, True


# ---------------------------------------------------------------------------------------------------------
# metrics


def round_entry(stage: str, round: int, replies: list[dict], refused: dict[str, str], failed: list[str],
                seconds: float, strategy: str) -> dict:
    """One metrics line. `replies`: per accepted site {"site", "node_id", allowlisted metrics...}."""
    total = sum(r.get("num-examples", 0) for r in replies) or 1
    losses = [(r["loss"], r.get("num-examples", 0)) for r in replies if _finite(r.get("loss"))]
    mean_loss = sum(l * n for l, n in losses) / (sum(n for _, n in losses) or 1) if losses else None
    return {"time": _now(), "stage": stage, "round": round, "strategy": strategy, "seconds": round_(seconds),
            "sites": {r["site"]: {k: v for k, v in r.items() if k != "site"} for r in replies},
            "refused": refused, "failed": failed, "patients": int(total) if replies else 0, "loss": mean_loss}


def write_metrics(out: str | Path, history: list[dict]) -> None:
    """metrics.jsonl (rewritten from the checkpoint's history, so it never holds a round twice) and the plot."""
    out = Path(out)
    atomic_write(out / "metrics.jsonl", "".join(json.dumps(e, default=_json_default) + "\n" for e in history).encode())
    plot_metrics(history, out / "metrics.png")


def plot_metrics(history: list[dict], png: str | Path) -> Path | None:
    """Top: each stage's training loss per site over its rounds (one panel per stage, the losses of the
    stages differ in scale). Bottom: epsilon spent per site over all rounds (stage boundaries marked)."""
    if not history:
        return None
    from ecgtwin import plot as _style  # noqa: F401  (selects the Agg backend)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    stages = [s for s in STAGES if any(e["stage"] == s for e in history)]
    sites = sorted({s for e in history for s in e["sites"]} | {s for e in history for s in e["refused"]})
    fig = plt.figure(figsize=(3.2 * max(2, len(stages)), 6))
    grid = fig.add_gridspec(2, len(stages))
    for col, stage in enumerate(stages):
        ax = fig.add_subplot(grid[0, col])
        entries = [e for e in history if e["stage"] == stage]
        for site in sites:
            points = [(e["round"], e["sites"][site].get("loss")) for e in entries if site in e["sites"]]
            points = [(x, y) for x, y in points if _finite(y)]
            if points:
                ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, label=site)
        ax.set_title(f"{stage}: training loss", fontsize=9)
        ax.set_xlabel("round")
        rounds = sorted({e["round"] for e in entries})
        ax.set_xticks(rounds if len(rounds) <= 12 else rounds[:: max(1, len(rounds) // 10)])
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
        if col == 0 and ax.lines:
            ax.legend(fontsize=7)
    ax = fig.add_subplot(grid[1, :])
    for site in sites:
        points = [(x, e["sites"][site].get("epsilon")) for x, e in enumerate(history, 1) if site in e["sites"]]
        points = [(x, y) for x, y in points if _finite(y)]
        if points:
            ax.plot(*zip(*points), marker="o", ms=3, lw=1.2, label=site)
    previous = None
    for x, e in enumerate(history, 1):
        if e["stage"] != previous:
            ax.axvline(x - 0.5, color="grey", lw=0.6, ls="--")
            ax.text(x - 0.45, 0.02, e["stage"], transform=ax.get_xaxis_transform(), fontsize=8)
            previous = e["stage"]
        for site in e["refused"]:
            ax.annotate("refused", (x, 0.95), xycoords=("data", "axes fraction"), fontsize=7, color="red",
                        ha="center")
    ax.set_ylabel("epsilon spent")
    ax.set_xlabel("round (all stages)")
    ax.set_xlim(0.4, len(history) + 0.6)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=7)
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return png


def write_status(out: str | Path, status: str, message: str = "", **extra: Any) -> None:
    atomic_write(Path(out) / "status.json",
                 json.dumps({"status": status, "message": message, "time": _now(), **extra}, indent=2).encode())


def read_status(out: str | Path) -> dict | None:
    path = Path(out) / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None


# ---------------------------------------------------------------------------------------------------------
# the final model


def save_global_model(path: str | Path, config: ExperimentConfig, weights: Mapping[str, Weights]) -> Path:
    """An ecgtwin checkpoint folder of the global model: the stages' weights, the config and the population
    normaliser the sites trained with (what `ecgtwin generate --checkpoint` reads)."""
    from ecgtwin.train.runner import use_population_normalizer

    checkpoint = Checkpoint(path)
    checkpoint.save_config(config)
    use_population_normalizer(checkpoint)
    for stage in STAGES:
        if stage in weights:
            checkpoint.save_weights(stage, load_weights_into(build_module(stage, config), weights[stage]))
    return checkpoint.path


# ---------------------------------------------------------------------------------------------------------
# aggregation without Flower (used by tests and as a reference for the strategies)


def weighted_mean(updates: list[tuple[Weights, float]]) -> Weights:
    total = float(sum(w for _, w in updates))
    if not updates or total <= 0:
        raise ValueError("nothing to aggregate")
    keys = updates[0][0].keys()
    return {k: sum(u[k].astype(np.float64) * (w / total) for u, w in updates).astype(updates[0][0][k].dtype)
            for k in keys}


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def round_(x: float) -> float:
    return float(np.round(x, 2))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# running a simulation from ecgtwin (which never imports Flower): a child process, stopped by its pid


def simulate(run_config: Mapping[str, Any], log_path: str | Path, progress: bool = False,
             timeout: float | None = None, cpus_per_site: float = 1.0) -> dict:
    """Run `python -m server.simulate` (Flower's simulation engine, one simulated SuperNode per site under
    run_config["sites-root"]) and return out/status.json. Success is judged by that file, not by the exit
    status. The child runs in its own process group; on timeout or interrupt it is stopped (SIGINT, so that
    Ray shuts down, then SIGKILL) by its process-group id."""
    import os
    import signal
    import subprocess
    import sys
    import time

    settings = FederationSettings.from_run_config(run_config)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)}
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "server.simulate", "--run-config", json.dumps(dict(run_config)),
               "--cpus-per-site", str(cpus_per_site)]
    deadline = None if timeout is None else time.monotonic() + timeout
    (Path(settings.out) / "status.json").unlink(missing_ok=True)  # a previous run's status must not be read
    with log_path.open("w") as log:
        child = subprocess.Popen(command, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True, start_new_session=True)
        try:
            for line in child.stdout:  # type: ignore[union-attr]
                log.write(line)
                log.flush()
                if progress and "ecgtwin:" in line:
                    print(line.split("ecgtwin:", 1)[1].strip(), file=sys.stderr, flush=True)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"the simulation ran past {timeout:g} s (log: {log_path})")
            child.wait()
        finally:
            if child.poll() is None:
                _stop_group(child, signal, time)
    status = read_status(settings.out)
    if status is None:
        return {"status": "failed", "message": f"the simulation wrote no status (exit {child.returncode}); "
                                               f"see {log_path}"}
    return status


def _stop_group(child, signal, time) -> None:
    import os

    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)  # the group we started (start_new_session): the child and its workers
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except Exception:  # noqa: BLE001  (subprocess.TimeoutExpired)
            continue
