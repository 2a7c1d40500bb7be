"""The patient-level held-out split: which patients train and which are kept out, the same for every
stage and for the privacy planner (one seed: `data.split_seed`)."""

from __future__ import annotations

import hashlib

import numpy as np

from ecgtwin.data.store import SiteStore


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


def rows_of_patients(store: SiteStore, patients: list[str]) -> np.ndarray:
    """Row indices of the records of `patients`, in store order."""
    return np.sort(np.concatenate([store.records_of(p) for p in patients])) if patients else np.zeros(0, int)
