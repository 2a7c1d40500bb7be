"""Models as plain arrays: what a local pass takes and returns, what a Flower message carries and what a
checkpoint stores. One place that knows which module each stage trains."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ecgtwin.config import STAGES, ExperimentConfig
from ecgtwin.errors import UserError
from ecgtwin.models import ECGVAE, AdaXDenoiser, IndividualBaseExtractor

Weights = dict[str, np.ndarray]


def build_module(stage: str, config: ExperimentConfig, seed: int | None = None) -> torch.nn.Module:
    """A fresh module of `stage`; with `seed`, its initial weights are drawn from that seed without touching
    the caller's global random state."""
    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
    make = {"vae": lambda: ECGVAE(config.model.vae), "ibe": lambda: IndividualBaseExtractor(config.model.ibe),
            "twin": lambda: AdaXDenoiser(config.model.dit)}[stage]
    if seed is None:
        return make()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


def model_shapes(stage: str, config: ExperimentConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of a stage's model: the only arrays a site may send."""
    with torch.device("meta"):  # shapes only: no memory, no random draws
        module = build_module(stage, config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def parameter_count(stage: str, config: ExperimentConfig) -> int:
    """Trainable parameters of a stage's model (what DP-SGD clips and noises)."""
    with torch.device("meta"):
        module = build_module(stage, config)
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


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
