"""Public negatives for the IBE's DP objective: ECGs of simulated people from the built-in simulator.

They depend only on a fixed public seed and the simulator's code, never on a site's patients, so
contrasting a patient against them costs no privacy. They are simulated once per site
and kept in a small store in the site's cache folder; their latents and base vectors use the current weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ecgtwin.conditioning import Conditioner, Conditions, store_conditions
from ecgtwin.config import ExperimentConfig
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.preprocess import PreprocessConfig
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.models import ECGVAE
from ecgtwin.train.inputs import encode_latents

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


def public_negatives(config: ExperimentConfig, vae: ECGVAE, conditioner: Conditioner, folder: Path | None,
                     n_people: int = 64) -> tuple[torch.Tensor, Conditions]:
    """(latents, conditions) of the public pool under the frozen `vae`; the pool's store is kept in
    `folder` (a temporary folder when None)."""
    if folder is None:
        with tempfile.TemporaryDirectory() as tmp:
            return public_negatives(config, vae, conditioner, Path(tmp), n_people)
    store = public_store(config, folder, n_people)
    return encode_latents(vae, store), store_conditions(store.records, conditioner)
