"""Every random draw that touches a patient's gradient in a DP pass, per patient.

Each draw is derived from the pass's secret key, the step, the patient's id and what it is for
(sampling, which records, VAE noise, diffusion timesteps and noise, guidance dropout, public negatives).
So removing or changing one patient changes no other patient's draws, and so no other patient's
gradient: the independence the per-patient clipping argument needs. The key comes from the operating
system's entropy for every pass; only tests derive it from a seed (see PrivacyPolicy.seed).
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import torch


class PatientRandomness:
    def __init__(self, key: bytes) -> None:
        self.key = key

    @classmethod
    def fresh(cls) -> "PatientRandomness":
        return cls(os.urandom(32))

    @classmethod
    def from_seed(cls, seed: int, *context: object) -> "PatientRandomness":
        """Tests only: a repeatable key from a seed and the pass's context (site, stage, round)."""
        return cls(hashlib.sha256(repr((seed, *context)).encode()).digest())

    def _seed(self, purpose: str, step: int, patient: str) -> int:
        digest = hashlib.blake2b(f"{purpose}\0{step}\0{patient}".encode(), key=self.key, digest_size=8).digest()
        return int.from_bytes(digest, "little") & ((1 << 63) - 1)

    def uniform(self, purpose: str, step: int, patient: str) -> float:
        """A uniform number in [0, 1) (Poisson sampling of this patient at this step)."""
        return self._seed(purpose, step, patient) / float(1 << 63)

    def numpy(self, purpose: str, step: int, patient: str) -> np.random.Generator:
        return np.random.default_rng(self._seed(purpose, step, patient))

    def torch(self, purpose: str, step: int, patient: str) -> torch.Generator:
        return torch.Generator().manual_seed(self._seed(purpose, step, patient))

    def pass_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """The DP optimizer's noise (the same for all patients by nature: it is added once per step), on the
        device of the parameters it is added to."""
        return torch.Generator(device=device).manual_seed(self._seed("optimizer-noise", -1, ""))
