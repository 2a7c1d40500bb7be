"""What each stage trains on, built from a site store and the frozen earlier stages (all of it stays at
the site).

VAE: the signals. IBE: VAE latents of pairs of one patient's ECGs (reference = earlier, target = later)
and each ECG's condition tokens. Twin: latents, condition tokens, and the base vector of a reference ECG
of the same patient from the frozen IBE.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from ecgtwin.conditioning import Conditioner, Conditions, store_conditions
from ecgtwin.data.store import ReadAhead, SiteStore
from ecgtwin.device import module_device, to_device
from ecgtwin.errors import UserError
from ecgtwin.models import LATENT_SCALE, ECGVAE, IndividualBaseExtractor


@torch.no_grad()
def encode_latents(vae: ECGVAE, store: SiteStore, rows: np.ndarray | None = None,
                   batch_size: int = 64, readers: int = 2) -> torch.Tensor:
    """The frozen VAE's posterior means of the signals of `rows` (all when None), scaled by LATENT_SCALE:
    what the IBE and the DiT see. A store is read a batch at a time, so a site of 100,000 records never
    holds its signals (5 GB) in memory, only their latents (0.2 GB); `readers` threads read the next batches
    while this one is encoded."""
    vae.eval()
    device = module_device(vae)  # computed once per pass, on the pass's device, and kept there
    rows = np.arange(len(store)) if rows is None else np.asarray(rows)
    chunks = [rows[i:i + batch_size] for i in range(0, len(rows), batch_size)]
    out = []
    with ReadAhead(store, workers=readers, ahead=2 * readers, pin=device.type == "cuda") as reader:
        for k, chunk in enumerate(chunks):
            batch = reader.read(chunk, chunks[k + 1:k + 1 + reader.ahead])
            out.append(vae.encode(to_device(batch, device))[0])
    return torch.cat(out) * LATENT_SCALE


def earlier_later_pairs(store: SiteStore, rows: np.ndarray) -> np.ndarray:
    """(n, 2) row pairs (earlier, later) of the same patient, one per consecutive pair of records."""
    allowed = set(rows.tolist())
    pairs = []
    for patient in store.patients:
        mine = [r for r in store.records_of(patient) if r in allowed]
        pairs += [(a, b) for a, b in zip(mine[:-1], mine[1:])]
    return np.array(pairs, dtype=int).reshape(-1, 2)


def reference_rows(store: SiteStore, rows: np.ndarray,
                   rng_of: Callable[[str], np.random.Generator]) -> np.ndarray:
    """For every training row, another record of the same patient to take the person from (ECGTwin's
    reference ECG); the record itself when the patient has only one. `rng_of(patient)` gives the draws
    (per patient in a DP pass, so that no patient's pick depends on another's)."""
    allowed = set(rows.tolist())
    refs = {}
    for patient in store.patients:
        mine = [r for r in store.records_of(patient) if r in allowed]
        rng = rng_of(patient)
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
class IBEInputs:
    latents: torch.Tensor  # (n, C, L) VAE latents of the training rows
    conditions: Conditions
    pairs: np.ndarray  # (m, 2) local indices (earlier, later) of the same patient
    by_patient: dict[str, list[int]]  # patient -> indices into `pairs`


def ibe_inputs(store: SiteStore, rows: np.ndarray, vae: ECGVAE, conditioner: Conditioner,
               minimum_pairs: int = 2) -> IBEInputs:
    """Latents, conditions and the (earlier, later) pairs of the rows. Fewer than `minimum_pairs` pairs is
    refused; a DP pass asks for 0 (a refusal there would depend on the private data: with no pair each step
    is noise only, with one the pair is contrasted with public negatives)."""
    latents = encode_latents(vae, store, rows)
    conditions = store_conditions(store.records.iloc[rows], conditioner).to(latents.device)
    local = {row: i for i, row in enumerate(rows)}
    pairs = earlier_later_pairs(store, rows)
    if len(pairs) < minimum_pairs:
        raise UserError(f"{store.path}: the IBE needs at least two patients with two or more ECGs, "
                        f"found {len(pairs)} pairs")
    pairs = np.array([[local[a], local[b]] for a, b in pairs], dtype=int).reshape(-1, 2)
    patient_of = store.records.patient_id.to_numpy()[rows]
    by_patient: dict[str, list[int]] = {}
    for k, (a, _) in enumerate(pairs):
        by_patient.setdefault(patient_of[a], []).append(k)
    return IBEInputs(latents, conditions, pairs, by_patient)


@dataclasses.dataclass
class TwinInputs:
    latents: torch.Tensor  # (n, C, L) target latents
    conditions: Conditions  # target conditions
    base: torch.Tensor  # (n, base_dim) base vector of each target's reference ECG


def twin_inputs(store: SiteStore, rows: np.ndarray, vae: ECGVAE, ibe: IndividualBaseExtractor,
                conditioner: Conditioner, rng_of: Callable[[str], np.random.Generator]) -> TwinInputs:
    """Latents, conditions and the base vector of each row's reference ECG (picked with `rng_of`)."""
    latents = encode_latents(vae, store, rows)
    conditions = store_conditions(store.records.iloc[rows], conditioner).to(latents.device)
    base_all = base_vectors(ibe, latents, conditions)
    local = {row: i for i, row in enumerate(rows)}
    refs = np.array([local[r] for r in reference_rows(store, rows, rng_of)])
    return TwinInputs(latents, conditions, base_all[torch.from_numpy(refs)])
