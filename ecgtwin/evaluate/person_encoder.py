"""The person encoder: an evaluation model that tells patients apart, independent of the generator.

The evaluation encoder is trained to match reports and to classify conditions, so its nearest neighbour
is mostly a patient with the same condition, not the same person. This encoder is trained only to tell
patients apart: two different ECGs of one patient are positives, every other patient's ECG a negative
(supervised InfoNCE). It is trained on the evaluation encoder's patients (never the twins' patients,
never the generator's training data) and uses the evaluation encoder's conv net, not the generator's
IBE, so a twin it re-identifies keeps traits a model the generator was never trained against can see.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F
from tqdm import tqdm

from ecgtwin.checkpoint import atomic_write
from ecgtwin.data.record import LEADS
from ecgtwin.data.store import SiteStore
from ecgtwin.errors import UserError
from ecgtwin.evaluate.encoder import ECGNet

FORMAT = 1


@dataclasses.dataclass
class PersonEncoderConfig:
    width: int = 32  # ECGNet's first conv channels
    dim: int = 64
    steps: int = 200
    patients_per_batch: int = 32  # two ECGs each
    lr: float = 2e-3
    temperature: float = 0.1
    seed: int = 0


class PersonEncoder:
    """A trained person encoder: (n, dim) features whose cosine says how alike two ECGs' persons are."""

    def __init__(self, net: ECGNet, fs: float, n_samples: int, leads: Sequence[str], config: PersonEncoderConfig,
                 info: dict | None = None) -> None:
        self.net = net.eval().requires_grad_(False)
        self.fs, self.n_samples, self.leads, self.config, self.info = fs, n_samples, tuple(leads), config, info or {}

    @torch.no_grad()
    def features(self, signals: np.ndarray, fs: float, leads: Sequence[str] = LEADS, batch: int = 256) -> np.ndarray:
        x = np.asarray(signals, np.float32)
        if tuple(leads) != self.leads or abs(fs - self.fs) > 1e-6 * self.fs or x.ndim != 3 \
                or x.shape[1:] != (len(self.leads), self.n_samples):
            raise UserError(f"person encoder expects (n, {len(self.leads)}, {self.n_samples}) signals at {self.fs:g} Hz "
                            f"of leads {','.join(self.leads)}, got {tuple(x.shape)} at {fs:g} Hz")
        return torch.cat([self.net(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])))
                          for i in range(0, len(x), batch)]).numpy()

    def save(self, folder: str | Path, key: str) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".person.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(tmp))
        tmp.replace(folder / "person.safetensors")
        meta = {"format": FORMAT, "key": key, "fs": self.fs, "n_samples": self.n_samples, "leads": list(self.leads),
                "config": dataclasses.asdict(self.config), "info": self.info}
        atomic_write(folder / "person.json", json.dumps(meta, indent=2).encode())

    @classmethod
    def load(cls, folder: str | Path, key: str) -> "PersonEncoder | None":
        """The cached encoder in `folder`, or None when there is none or it was trained on other data."""
        folder = Path(folder)
        if not (folder / "person.json").is_file() or not (folder / "person.safetensors").is_file():
            return None
        meta = json.loads((folder / "person.json").read_text())
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        config = PersonEncoderConfig(**meta["config"])
        net = ECGNet(len(meta["leads"]), config.width, config.dim)
        net.load_state_dict(load_file(str(folder / "person.safetensors")))
        return cls(net, meta["fs"], meta["n_samples"], meta["leads"], config, meta["info"])


def person_encoder_key(store: SiteStore, rows: np.ndarray, config: PersonEncoderConfig) -> str:
    h = hashlib.sha256(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    h.update(json.dumps(store.manifest.get("representation", {}), sort_keys=True).encode())
    h.update("|".join(store.records.record_id.to_numpy()[rows].astype(str)).encode())
    return h.hexdigest()[:16]


def train_person_encoder(store: SiteStore, rows: np.ndarray, config: PersonEncoderConfig,
                         progress: bool = False) -> PersonEncoder | None:
    """Train on the store's records `rows`; None when fewer than two of their patients have two ECGs
    (nothing to learn a person from)."""
    rows = np.asarray(rows, int)
    patients = store.records.patient_id.to_numpy()[rows]
    groups = [rows[patients == p] for p in np.unique(patients)]
    groups = [g for g in groups if len(g) >= 2]
    if len(groups) < 2:
        return None
    with torch.random.fork_rng(devices=[]):  # seeded weights, the caller's random state untouched
        torch.manual_seed(config.seed)
        net = ECGNet(store.signals.shape[1], config.width, config.dim)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=1e-4)
    rng = np.random.default_rng(config.seed)
    per_batch = min(config.patients_per_batch, len(groups))
    losses = []
    net.train()
    for _ in tqdm(range(config.steps), desc="person encoder", unit="step", disable=not progress, file=sys.stderr):
        chosen = rng.choice(len(groups), size=per_batch, replace=False)
        pairs = np.array([rng.choice(groups[i], size=2, replace=False) for i in chosen])  # (P, 2) rows
        x = torch.from_numpy(np.asarray(store.signals[np.sort(pairs.ravel())], np.float32))
        order = np.argsort(np.argsort(pairs.ravel()))  # the sorted read back into pair order
        z = F.normalize(net(x[torch.from_numpy(order)]), dim=1)  # rows 2i, 2i+1: one patient
        logits = z @ z.T / config.temperature
        logits = logits.masked_fill(torch.eye(len(z), dtype=torch.bool), float("-inf"))
        partner = torch.arange(len(z)) ^ 1
        loss = F.cross_entropy(logits, partner)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    info = {"records": int(sum(len(g) for g in groups)), "patients": len(groups), "steps": config.steps,
            "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:]))}
    leads = tuple(store.manifest.get("representation", {}).get("leads", LEADS))
    return PersonEncoder(net, store.fs, int(store.signals.shape[-1]), leads, config, info)


def get_person_encoder(store: SiteStore, rows: np.ndarray, config: PersonEncoderConfig, cache: Path,
                       progress: bool = False) -> PersonEncoder | None:
    """The cached person encoder when trained on exactly these records with these settings, else a new one."""
    key = person_encoder_key(store, rows, config)
    cached = PersonEncoder.load(cache, key)
    if cached is not None:
        return cached
    encoder = train_person_encoder(store, rows, config, progress)
    if encoder is not None:
        encoder.save(cache, key)
    return encoder
