"""What a local pass takes besides the data, and what it gives back: plain values, so that a reader sees
the data flow in the signatures (weights in; weights, a ledger entry and a local log out)."""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np
import torch

from ecgtwin.config import STAGES, ExperimentConfig
from ecgtwin.data.store import SiteStore
from ecgtwin.data.split import rows_of_patients, training_rows
from ecgtwin.errors import MissingInput, UserError
from ecgtwin.models import ECGVAE, IndividualBaseExtractor
from ecgtwin.weights import Weights, frozen, load_weights_into, build_module

StageWeights = Mapping[str, Weights]  # stage -> its tensors


@dataclasses.dataclass
class PassResult:
    """One local pass's output. Only `weights` (and, for a DP pass, the epsilon in `entry`) may leave the
    site; `log` and `summary` hold un-noised values of the site's patients and stay there."""

    stage: str
    weights: Weights  # the trained stage's new tensors
    summary: dict  # losses, counts, seconds, noise: the site's own record of the pass
    log: list[dict]  # one line per step
    entry: dict | None = None  # the ledger entry the pass was charged under (DP passes only)


def check_store(store: SiteStore, config: ExperimentConfig) -> None:
    """The config must fit the store's records: a mismatch is one line naming the store and the config key,
    not a shape error inside a model."""
    rep = store.manifest["representation"]
    have = rep["n_samples"]
    if have != config.data.n_samples:
        raise UserError(f"{store.path}: store holds {have} samples per record, the config expects "
                        f"{config.data.n_samples}; prepare it with --samples {config.data.n_samples}")
    if abs(float(rep["duration_s"]) - config.data.duration_s) > 1e-9:
        raise UserError(f"{store.path}: store holds {rep['duration_s']:g} s per record, the config's "
                        f"data.duration_s is {config.data.duration_s:g}")
    vae, leads = config.model.vae, store.signals.shape[1]
    if vae.in_channels != leads:
        raise UserError(f"{store.path}: store holds {leads}-lead records, the config's model.vae.in_channels "
                        f"is {vae.in_channels}; set it to {leads}")
    if have % vae.downsample_factor:
        raise UserError(f"{store.path}: {have} samples per record is not a multiple of {vae.downsample_factor}, "
                        f"the VAE's downsampling (config key model.vae.channel_mult)")
    if config.model.dit.n_tokens != have // vae.downsample_factor:
        raise UserError(f"{store.path}: records of {have} samples make {have // vae.downsample_factor} latent "
                        f"tokens, the config's model.dit.n_tokens is {config.model.dit.n_tokens}")


def pass_rows(store: SiteStore, config: ExperimentConfig, patients: list[str] | None = None) -> np.ndarray:
    """The rows a pass trains on: `patients`' records, by default the store's training patients (the one
    split of `data.split_seed`)."""
    if patients is not None:
        return rows_of_patients(store, patients)
    return training_rows(store, config.data.held_out_fraction, config.data.split_seed)


def frozen_stages(stage: str, config: ExperimentConfig, weights: StageWeights,
                  device: torch.device | str = "cpu") -> list:
    """The frozen modules `stage` builds on (VAE for the IBE; VAE and IBE for the twin stage), on `device`."""
    needed = STAGES[: STAGES.index(stage)]
    missing = [s for s in needed if not weights.get(s)]
    if missing:
        raise MissingInput(f"stage {stage} needs the trained {', '.join(missing)} weights "
                        f"(train them first: ecgtwin train --stage {missing[0]} ...)")
    return [frozen(load_weights_into(build_module(s, config), weights[s])).to(device) for s in needed]


def frozen_vae(config: ExperimentConfig, weights: Weights) -> ECGVAE:
    return frozen(load_weights_into(build_module("vae", config), weights))


def frozen_ibe(config: ExperimentConfig, weights: Weights) -> IndividualBaseExtractor:
    return frozen(load_weights_into(build_module("ibe", config), weights))
