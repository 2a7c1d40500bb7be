"""The final model of a run: an ecgtwin checkpoint folder that `ecgtwin generate --checkpoint` reads."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from ecgtwin.checkpoint import Checkpoint
from ecgtwin.conditioning import ensure_population_normalizer
from ecgtwin.config import STAGES, ExperimentConfig
from ecgtwin.weights import Weights


def save_global_model(path: str | Path, config: ExperimentConfig, weights: Mapping[str, Weights]) -> Path:
    """The stages' weights, the config and the fixed population normaliser the sites trained with."""
    checkpoint = Checkpoint(path)
    checkpoint.save_config(config)
    ensure_population_normalizer(checkpoint.path)
    for stage in STAGES:
        if stage in weights:
            checkpoint.save_arrays(stage, weights[stage])
    return checkpoint.path
