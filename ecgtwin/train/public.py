"""Public negatives for the IBE's DP objective: ECGs of simulated people from the built-in simulator.

They depend only on a fixed public seed and the simulator's code, never on a site's patients, so
contrasting a patient against them costs no privacy. They are simulated once per checkpoint folder
and kept in a small store beside it; their latents and base vectors use the current weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ecgtwin.checkpoint import Checkpoint
from ecgtwin.conditioning import Conditions, store_conditions
from ecgtwin.config import ExperimentConfig
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.preprocess import PreprocessConfig
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.train import data as stage_data

PUBLIC_SEED = 7_919_001  # not the seed of any consortium the project ships (those use 0..)


def public_store(config: ExperimentConfig, folder: Path, n_people: int = 64) -> SiteStore:
    """A store of `n_people` simulated ECGs (one each), written once into `folder`."""
    if not (folder / "manifest.json").is_file():
        with tempfile.TemporaryDirectory() as tmp:
            synthesize_consortium(Path(tmp), sites=1, patients_per_site=n_people, records_per_patient=1,
                                  seed=PUBLIC_SEED, duration_s=config.data.duration_s)
            site = next(p for p in Path(tmp).iterdir() if p.is_dir())
            prepare_store("synthetic", site, folder, PreprocessConfig(n_samples=config.data.n_samples,
                                                                      duration_s=config.data.duration_s),
                          on_reject=lambda rejected: None)
    return SiteStore(folder)


def public_negatives(config: ExperimentConfig, checkpoint: Checkpoint, conditioner,
                     n_people: int = 64) -> tuple[torch.Tensor, Conditions]:
    """(latents, conditions) of the public pool under the checkpoint's frozen VAE."""
    from ecgtwin.train.runner import frozen_vae  # runner imports this module's users

    store = public_store(config, checkpoint.path / "public-negatives", n_people)
    latents = stage_data.encode_latents(frozen_vae(config, checkpoint), store.signals[:])
    return latents, store_conditions(store.records, conditioner)
