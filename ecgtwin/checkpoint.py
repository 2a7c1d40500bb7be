"""A checkpoint folder: weights as safetensors, the experiment config, the conditioning statistics,
and per-stage training state for resuming. Every file is written atomically (temp file + rename), so an
interrupted run leaves the previous version of each file intact.

    DIR/config.yaml            the experiment configuration the weights belong to
    DIR/conditioning.json      patient-info normalisation and text encoder
    DIR/{vae,ibe,twin}.safetensors
    DIR/{stage}_state.pt       optimizer, step and random states of an unfinished or finished stage
    DIR/{stage}_loss.jsonl, DIR/{stage}_loss.png
    DIR/.train.lock            flock-ed by the one training that writes the folder (holds its pid)
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from safetensors.torch import load_file, save_file
from torch import nn

from ecgtwin.config import ExperimentConfig, load_config, save_config
from ecgtwin.errors import MissingInput, UserError

LOCK_FILE = ".train.lock"


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as tmp:
        tmp.write(data)
        tmp.flush()
        os.fsync(tmp.fileno())
    os.replace(tmp.name, path)


class Checkpoint:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder's exclusive training lock, or refuse at once if another process holds it. An
        flock dies with its process, so a crashed training never leaves the folder locked."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a+") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                raise UserError(f"{self.path}: another training is writing this checkpoint folder ({holder} holds "
                                f"{LOCK_FILE}); wait for it to finish or use another --out folder") from None
            handle.truncate(0)
            handle.write(f"pid {os.getpid()}")
            handle.flush()
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def weights_path(self, stage: str) -> Path:
        return self.path / f"{stage}.safetensors"

    def has(self, stage: str) -> bool:
        return self.weights_path(stage).is_file()

    def require(self, *stages: str) -> None:
        missing = [s for s in stages if not self.has(s)]
        if missing:
            raise MissingInput(f"{self.path}: checkpoint has no {', '.join(missing)} weights "
                                    f"(train them first: ecgtwin train --stage {missing[0]} ...)")

    def save_weights(self, stage: str, module: nn.Module) -> None:
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{stage}.", suffix=".safetensors")
        os.close(fd)
        save_file(state, tmp)
        os.replace(tmp, self.weights_path(stage))

    def load_weights(self, stage: str, module: nn.Module) -> nn.Module:
        self.require(stage)
        module.load_state_dict(load_file(str(self.weights_path(stage))))
        return module

    def load_arrays(self, stage: str) -> dict[str, np.ndarray]:
        """A stage's weights as plain arrays (what a local pass takes)."""
        self.require(stage)
        return {k: np.asarray(v) for k, v in load_numpy(str(self.weights_path(stage))).items()}

    def save_arrays(self, stage: str, weights: dict[str, np.ndarray]) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=f".{stage}.", suffix=".safetensors")
        os.close(fd)
        save_numpy({k: np.ascontiguousarray(v) for k, v in weights.items()}, tmp)
        os.replace(tmp, self.weights_path(stage))

    def save_state(self, stage: str, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write(self.path / f"{stage}_state.pt", buffer.getvalue())

    def load_state(self, stage: str) -> dict | None:
        path = self.path / f"{stage}_state.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None

    def save_config(self, config: ExperimentConfig) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        buffer = self.path / ".config.yaml.tmp"
        save_config(config, buffer)
        os.replace(buffer, self.path / "config.yaml")

    def config(self) -> ExperimentConfig:
        path = self.path / "config.yaml"
        if not path.is_file():
            raise MissingInput(f"{self.path}: not a checkpoint (no config.yaml)")
        return load_config(path)

    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path / name, text.encode())

    def read_text(self, name: str) -> str:
        path = self.path / name
        if not path.is_file():
            raise MissingInput(f"{path}: missing from the checkpoint")
        return path.read_text()
