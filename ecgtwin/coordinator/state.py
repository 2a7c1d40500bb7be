"""The round checkpoint: what the server keeps to resume a run with no round lost or repeated."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np

from ecgtwin.checkpoint import atomic_write
from ecgtwin.config import STAGES, ConfigError, ExperimentConfig, to_dict
from ecgtwin.coordinator.settings import FederationSettings
from ecgtwin.coordinator.status import json_default, now
from ecgtwin.weights import Weights

STATE_FILE = "state.npz"


@dataclasses.dataclass
class RunState:
    """What the server must keep to resume a run with no round lost or repeated."""

    run_name: str
    model: dict  # the model configuration the weights belong to
    weights: dict[str, Weights] = dataclasses.field(default_factory=dict)  # global weights per stage
    moments: dict[str, dict[str, Weights]] = dataclasses.field(default_factory=dict)  # stage -> m_t/v_t
    completed: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    history: list[dict] = dataclasses.field(default_factory=list)  # one metrics entry per round
    start: dict = dataclasses.field(default_factory=dict)  # the foundation's hashes and each stage's trainable set

    def done(self, stage: str, round: int) -> bool:
        return (stage, round) in {tuple(c) for c in self.completed}

    def nodes_seen(self) -> set[int]:
        """The node ids of every site that returned weights in an earlier round."""
        return {int(r["node_id"]) for e in self.history for r in e["sites"].values() if "node_id" in r}

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
                "history": self.history, "start": self.start, "saved": now()}
        arrays["__meta__"] = np.frombuffer(json.dumps(meta, default=json_default).encode(), dtype=np.uint8)
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
                        history=meta["history"], start=meta.get("start", {}))
            for key in data.files:
                parts = key.split("/")
                if parts[0] == "weights":
                    state.weights.setdefault(parts[1], {})["/".join(parts[2:])] = data[key]
                elif parts[0] == "moments":
                    state.moments.setdefault(parts[1], {}).setdefault(parts[2], {})["/".join(parts[3:])] = data[key]
        return state


def open_run(out: str | Path, settings: FederationSettings, config: ExperimentConfig) -> tuple[RunState, bool]:
    """The run's state: resumed from out/state.npz when present (same model configuration, same foundation,
    same trainable set per stage), else new."""
    state, start = RunState.load(out), run_start(settings, config)
    if state is None:
        return RunState(settings.run_name, to_dict(config.model), start=start), False
    if state.model != to_dict(config.model):
        raise ConfigError(f"{out}: holds a run of a different model configuration; use another out folder")
    for key, what in (("foundation", "foundation"), ("trainable", "trainable set")):
        if state.start.get(key) != start[key]:
            raise ConfigError(f"{out}: this run started with another {what} ({state.start.get(key)} now "
                              f"{start[key]}); resume it with the one it started from, or use another out folder")
    return state, True


def run_start(settings: FederationSettings, config: ExperimentConfig) -> dict:
    """What a run starts from and must keep when resumed: the foundation (by the sha256 of its weight files)
    and what each stage trains (frozen when it has no rounds)."""
    foundation = {}
    if settings.foundation:
        folder = Path(settings.foundation)
        foundation = {s: hashlib.sha256((folder / f"{s}.safetensors").read_bytes()).hexdigest()
                      for s in STAGES if (folder / f"{s}.safetensors").is_file()}
    trainable = {s: "frozen" if settings.rounds(s) == 0 or config.stage(s).trainable == "frozen" else
                 f"{config.stage(s).trainable}" + (f"-r{config.stage(s).lora_rank}"
                                                   if config.stage(s).trainable == "lora" else "")
                 + ("-" + ",".join(config.stage(s).trainable_modules) if config.stage(s).trainable == "modules" else "")
                 for s in STAGES}
    return {"foundation": foundation, "trainable": trainable}
