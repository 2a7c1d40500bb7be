"""What each stage trains on, built from a site store (all of it stays at the site).

VAE: the signals. IBE: VAE latents of pairs of one patient's ECGs (reference = earlier, target = later)
and each ECG's condition tokens. Twin: latents, condition tokens, and the base vector of a reference ECG
of the same patient from the frozen IBE.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import torch

from ecgtwin.conditioning import Conditions
from ecgtwin.data.store import SiteStore
from ecgtwin.models import LATENT_SCALE, ECGVAE, IndividualBaseExtractor


def split_patients(patients: list[str], held_out_fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic patient-level split (by a hash of the id): no patient is on both sides."""
    def score(p: str) -> float:
        return int(hashlib.sha256(f"{seed}:{p}".encode()).hexdigest()[:8], 16) / 16**8

    held = [p for p in patients if score(p) < held_out_fraction]
    return [p for p in patients if score(p) >= held_out_fraction], held


def training_rows(store: SiteStore, held_out_fraction: float, seed: int = 0) -> np.ndarray:
    """Row indices of the store's training patients, in store order."""
    train, _ = split_patients(store.patients, held_out_fraction, seed)
    return np.sort(np.concatenate([store.records_of(p) for p in train])) if train else np.zeros(0, int)


@torch.no_grad()
def encode_latents(vae: ECGVAE, signals: np.ndarray, batch_size: int = 64) -> torch.Tensor:
    """The frozen VAE's posterior means, scaled by LATENT_SCALE: what the IBE and the DiT see."""
    vae.eval()
    out = [vae.encode(torch.as_tensor(np.asarray(signals[i:i + batch_size]), dtype=torch.float32))[0]
           for i in range(0, len(signals), batch_size)]
    return torch.cat(out) * LATENT_SCALE


def earlier_later_pairs(store: SiteStore, rows: np.ndarray) -> np.ndarray:
    """(n, 2) row pairs (earlier, later) of the same patient, one per consecutive pair of records."""
    allowed = set(rows.tolist())
    pairs = []
    for patient in store.patients:
        mine = [r for r in store.records_of(patient) if r in allowed]
        pairs += [(a, b) for a, b in zip(mine[:-1], mine[1:])]
    return np.array(pairs, dtype=int).reshape(-1, 2)


def reference_rows(store: SiteStore, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For every training row, another record of the same patient to take the person from (ECGTwin's
    reference ECG); the record itself when the patient has only one."""
    allowed = set(rows.tolist())
    refs = {}
    for patient in store.patients:
        mine = [r for r in store.records_of(patient) if r in allowed]
        for r in mine:
            others = [o for o in mine if o != r]
            refs[r] = int(rng.choice(others)) if others else r
    return np.array([refs[r] for r in rows], dtype=int)


@torch.no_grad()
def base_vectors(ibe: IndividualBaseExtractor, latents: torch.Tensor, conditions: Conditions,
                 batch_size: int = 128) -> torch.Tensor:
    """The frozen IBE's base vector of every record (conditioned on its own report, which it subtracts)."""
    ibe.eval()
    out = []
    for i in range(0, len(latents), batch_size):
        index = torch.arange(i, min(i + batch_size, len(latents)))
        tokens, mask = conditions.tokens(index)
        out.append(ibe(latents[index], tokens, mask))
    return torch.cat(out)


@dataclasses.dataclass
class TwinData:
    latents: torch.Tensor  # (n, C, L) target latents
    base: torch.Tensor  # (n, base_dim) base vector of each target's reference ECG
    conditions: Conditions  # target conditions
