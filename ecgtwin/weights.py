"""Models as plain arrays: what a local pass takes and returns, what a Flower message carries and what a
checkpoint stores. One place that knows which module each stage trains."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ecgtwin.config import STAGES, ExperimentConfig
from ecgtwin.errors import UserError
from ecgtwin.models import ECGVAE, AdaXDenoiser, IndividualBaseExtractor
from ecgtwin.models.finetune import add_lora, train_only
from ecgtwin.models.finetune import trainable_names as module_trainable_names

Weights = dict[str, np.ndarray]


def build_module(stage: str, config: ExperimentConfig, seed: int | None = None) -> torch.nn.Module:
    """A fresh module of `stage` (with LoRA adapters when the stage trains `lora`); with `seed`, its initial
    weights are drawn from that seed without touching the caller's global random state."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    settings = config.stage(stage)
    make = {"vae": lambda: ECGVAE(config.model.vae), "ibe": lambda: IndividualBaseExtractor(config.model.ibe),
            "twin": lambda: AdaXDenoiser(config.model.dit)}[stage]

    def build() -> torch.nn.Module:
        module = make()
        if settings.trainable == "lora":
            add_lora(module, settings.lora_rank)
        return module

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def model_shapes(stage: str, config: ExperimentConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a stage's model: the only arrays a site may send."""
    with torch.device("meta"):  # shapes only: no memory, no random draws
        module = build_module(stage, config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def trainable_names(stage: str, config: ExperimentConfig) -> list[str]:
    """The tensors a pass of `stage` trains under the stage's `trainable` setting: what DP-SGD clips and
    noises and the only ones a reply carries (the others stay bit-identical)."""
    with torch.device("meta"):
        module = build_module(stage, config)
    return _names(module, stage, config)


def _names(module: torch.nn.Module, stage: str, config: ExperimentConfig) -> list[str]:
    settings = config.stage(stage)
    try:
        return module_trainable_names(module, settings.trainable, settings.trainable_modules)
    except ValueError as exc:  # a module name that the model does not have: the config's mistake
        raise UserError(f"{stage}.{exc}") from exc


def trainable_shapes(stage: str, config: ExperimentConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors a reply of `stage` carries."""
    shapes = model_shapes(stage, config)
    return {name: shapes[name] for name in trainable_names(stage, config)}


def parameter_count(stage: str, config: ExperimentConfig) -> int:
    """Trainable parameters of a stage under its `trainable` setting (what DP-SGD clips and noises)."""
    return int(sum(np.prod(shape, dtype=np.int64) for shape in trainable_shapes(stage, config).values()))


def select_trainable(module: torch.nn.Module, stage: str, config: ExperimentConfig) -> torch.nn.Module:
    """Freeze every parameter the stage's `trainable` setting does not train."""
    return train_only(module, _names(module, stage, config))


def trainable_part(stage: str, config: ExperimentConfig, weights: Mapping[str, np.ndarray]) -> Weights:
    """The trainable tensors of a stage's full weights: what a reply carries."""
    return {name: weights[name] for name in trainable_names(stage, config)}


def start_from(stage: str, config: ExperimentConfig, foundation: Mapping[str, np.ndarray]) -> Weights:
    """A stage's starting weights from a foundation's tensors: every tensor of the foundation (checked
    against the model), completed by the stage's seeded initial values for what the foundation lacks (the
    LoRA adapters, whose B is zero, so the start is the foundation's function)."""
    shapes = model_shapes(stage, config)
    for name, value in foundation.items():
        if name not in shapes or tuple(value.shape) != tuple(shapes[name]):
            raise UserError(f"foundation {stage} tensor {name} {tuple(value.shape)} does not fit the model "
                            f"({'no such tensor' if name not in shapes else shapes[name]})")
    missing = [n for n in shapes if n not in foundation and ".lora_" not in n]
    if missing:
        raise UserError(f"the foundation lacks {len(missing)} {stage} tensors, e.g. {missing[0]}")
    return {**initial_weights(stage, config), **{k: np.asarray(v) for k, v in foundation.items()}}


FLAT = "flat"  # the name of the one array a message carries per stage


def pack(weights: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]) -> np.ndarray:
    """The tensors named in `shapes`, in that order, as one float32 vector. A message then carries one array
    per stage, not one per tensor: on a deployment each array is its own signed request to the SuperLink, and
    a per-tensor message of the demo VAE took 12-25 s to move where one array takes well under a second."""
    if not shapes:
        return np.zeros(0, np.float32)
    return np.concatenate([np.asarray(weights[name], np.float32).ravel() for name in shapes])


def unpack(vector: np.ndarray, shapes: Mapping[str, tuple[int, ...]]) -> Weights:
    """The inverse of `pack`; a vector of the wrong size is a ValueError (a reply that is not the model's)."""
    vector = np.asarray(vector)
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes.values()]
    if vector.ndim != 1 or vector.size != sum(sizes):
        raise ValueError(f"{vector.size} values of shape {vector.shape}, the model's tensors hold {sum(sizes)}")
    parts = np.split(vector.astype(np.float32, copy=False), np.cumsum(sizes)[:-1])
    return {name: part.reshape(shape).copy() for (name, shape), part in zip(shapes.items(), parts)}


def module_weights(module: torch.nn.Module) -> Weights:
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def initial_weights(stage: str, config: ExperimentConfig) -> Weights:
    """The stage's starting weights, the same for every site (seeded by the stage's seed)."""
    return module_weights(build_module(stage, config, seed=config.stage(stage).seed))


def load_weights_into(module: torch.nn.Module, weights: Mapping[str, np.ndarray]) -> torch.nn.Module:
    """Strict: every name present with the model's shape, nothing else."""
    module.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, strict=True)
    return module


def module_from(stage: str, config: ExperimentConfig, weights: Mapping[str, np.ndarray] | None) -> torch.nn.Module:
    """The stage's module holding `weights`, or its seeded initial weights when there are none."""
    if not weights:
        return build_module(stage, config, seed=config.stage(stage).seed)
    return load_weights_into(build_module(stage, config), weights)


def frozen(module: torch.nn.Module) -> torch.nn.Module:
    """A module used, never trained: eval mode, no gradients."""
    return module.eval().requires_grad_(False)
