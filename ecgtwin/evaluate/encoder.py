"""The evaluation encoder: a CLIP-style ECG-text contrastive model (DiffuSETS' evaluation encoder) with a
multilabel condition-classifier head on its ECG features, trained on REAL records of patients the
generator never trained on.

ECG side: a small 1-D conv net over the (12, L) signal in mV, pooled over time, projected to the joint
space. Text side: each report statement embedded by the project's offline sentence encoder, averaged,
projected by a small MLP. Loss: symmetric InfoNCE with a learned temperature, where records with the
same report text count as positives of each other (synthetic and machine reports repeat; treating an
identical report as a negative would be a false negative), plus binary cross-entropy of a linear
condition head on the ECG embedding (the store's `labels` codes).

Everything is trained and used at the site that holds the data; the cached encoder folder holds only
weights and the code list.
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
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from ecgtwin.checkpoint import atomic_write
from ecgtwin.data.record import LEADS
from ecgtwin.data.store import SiteStore
from ecgtwin.text import BUNDLED, StatementEncoder, split_statements
from ecgtwin.errors import UserError

FORMAT = 1


@dataclasses.dataclass
class EncoderConfig:
    width: int = 32  # channels of the first conv; doubles twice
    dim: int = 64  # joint ECG-text embedding size (the features every metric uses)
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-3
    classifier_weight: float = 1.0
    max_codes: int = 20  # the most frequent label codes of the training records
    min_code_count: int = 2
    seed: int = 0
    text_model: str = BUNDLED


def record_codes(labels_json: str) -> list[str]:
    """Codes of a store row's labels column (JSON object code -> likelihood, or a list of codes)."""
    try:
        labels = json.loads(labels_json or "{}")
    except json.JSONDecodeError:
        return []
    return sorted(labels) if isinstance(labels, (dict, list)) else []


def multi_hot(labels: Sequence[str], codes: Sequence[str]) -> np.ndarray:
    index = {c: i for i, c in enumerate(codes)}
    out = np.zeros((len(labels), len(codes)), np.float32)
    for row, text in enumerate(labels):
        for code in record_codes(text):
            if code in index:
                out[row, index[code]] = 1.0
    return out


class ECGNet(nn.Module):
    def __init__(self, leads: int, width: int, dim: int) -> None:
        super().__init__()
        chans = [leads, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(chans[:-1], chans[1:])):
            layers += [nn.Conv1d(a, b, 7 if i == 0 else 5, stride=2, padding=3 if i == 0 else 2),
                       nn.GroupNorm(8 if b % 8 == 0 else 1, b), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(2 * chans[-1], dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x)
        return self.proj(torch.cat([h.mean(-1), h.amax(-1)], dim=1))


class ClipModel(nn.Module):
    def __init__(self, leads: int, text_dim: int, n_codes: int, config: EncoderConfig) -> None:
        super().__init__()
        self.ecg = ECGNet(leads, config.width, config.dim)
        self.text = nn.Sequential(nn.Linear(text_dim, 2 * config.dim), nn.SiLU(), nn.Linear(2 * config.dim, config.dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(np.log(1 / 0.07))))
        self.head = nn.Linear(config.dim, max(n_codes, 1))


class EvaluationEncoder:
    """A trained evaluation encoder: ECG features, report features, condition probabilities."""

    def __init__(self, model: ClipModel, codes: list[str], text: StatementEncoder, fs: float, n_samples: int,
                 leads: tuple[str, ...], config: EncoderConfig, info: dict | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.codes, self.text_encoder, self.fs, self.n_samples = codes, text, fs, n_samples
        self.leads, self.config, self.info = tuple(leads), config, info or {}

    # -- inputs -------------------------------------------------------------------------------------
    def _check(self, signals: np.ndarray, fs: float, leads: Sequence[str]) -> None:
        if tuple(leads) != self.leads:
            raise UserError(f"evaluation encoder was trained on leads {','.join(self.leads)}, "
                             f"got {','.join(leads)}")
        if abs(fs - self.fs) > 1e-6 * self.fs:
            raise UserError(f"evaluation encoder was trained at {self.fs:g} Hz, got signals at {fs:g} Hz")
        if signals.ndim != 3 or signals.shape[-1] != self.n_samples or signals.shape[1] != len(self.leads):
            raise UserError(f"evaluation encoder expects (n, {len(self.leads)}, {self.n_samples}) signals, "
                             f"got {tuple(signals.shape)}")
        if len(signals) == 0:
            raise UserError("evaluation encoder: empty set of signals")

    @torch.no_grad()
    def _embed(self, signals: np.ndarray, batch: int = 256) -> torch.Tensor:
        x = np.asarray(signals, np.float32)
        return torch.cat([self.model.ecg(torch.from_numpy(np.ascontiguousarray(x[i:i + batch])))
                          for i in range(0, len(x), batch)])

    def ecg_features(self, signals: np.ndarray, fs: float, leads: Sequence[str] = LEADS) -> np.ndarray:
        """(n, dim) ECG embeddings in the joint space (not normalised; cosine metrics normalise)."""
        self._check(np.asarray(signals), fs, leads)
        return self._embed(signals).numpy()

    @torch.no_grad()
    def text_features(self, reports: Sequence[str]) -> np.ndarray:
        if len(reports) == 0:
            raise UserError("evaluation encoder: no reports")
        return self.model.text(torch.from_numpy(report_vectors(self.text_encoder, reports))).numpy()

    @torch.no_grad()
    def condition_probabilities(self, features: np.ndarray) -> np.ndarray:
        """(n, n_codes) probabilities of the condition head, from ECG features."""
        return torch.sigmoid(self.model.head(torch.as_tensor(features, dtype=torch.float32))).numpy()[:, :len(self.codes)]

    # -- persistence --------------------------------------------------------------------------------
    def save(self, folder: str | Path, key: str) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / ".encoder.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(tmp))
        tmp.replace(folder / "encoder.safetensors")
        meta = {"format": FORMAT, "key": key, "codes": self.codes, "fs": self.fs, "n_samples": self.n_samples,
                "leads": list(self.leads), "config": dataclasses.asdict(self.config), "info": self.info}
        atomic_write(folder / "encoder.json", json.dumps(meta, indent=2).encode())

    @classmethod
    def load(cls, folder: str | Path, key: str | None = None) -> "EvaluationEncoder | None":
        """The cached encoder in `folder`, or None when there is none or it was trained on other data."""
        folder = Path(folder)
        meta_path = folder / "encoder.json"
        if not meta_path.is_file() or not (folder / "encoder.safetensors").is_file():
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT or (key is not None and meta.get("key") != key):
            return None
        config = EncoderConfig(**meta["config"])
        text = StatementEncoder(config.text_model, cache_dir=folder / "text-cache")
        model = ClipModel(len(meta["leads"]), text.dim, len(meta["codes"]), config)
        model.load_state_dict(load_file(str(folder / "encoder.safetensors")))
        return cls(model, meta["codes"], text, meta["fs"], meta["n_samples"], tuple(meta["leads"]), config, meta["info"])


def report_vectors(text: StatementEncoder, reports: Sequence[str]) -> np.ndarray:
    """(n, text_dim) mean statement embedding of each report (zeros for an empty report)."""
    split = [split_statements(r) for r in reports]
    distinct = sorted({s for ss in split for s in ss})
    table = dict(zip(distinct, text.embed(distinct))) if distinct else {}
    out = np.zeros((len(reports), text.dim), np.float32)
    for i, statements in enumerate(split):
        if statements:
            v = np.mean([table[s] for s in statements], axis=0)
            out[i] = v / max(np.linalg.norm(v), 1e-12)
    return out


def encoder_key(store: SiteStore, rows: np.ndarray, config: EncoderConfig) -> str:
    """What the cached encoder was trained on: the store's records of those rows and the settings."""
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(config), sort_keys=True).encode())
    h.update(json.dumps(store.manifest.get("representation", {}), sort_keys=True).encode())
    h.update("|".join(store.records.record_id.to_numpy()[rows].astype(str)).encode())
    return h.hexdigest()[:16]


def train_encoder(store: SiteStore, rows: np.ndarray, config: EncoderConfig, reports: Sequence[str],
                  progress: bool = False, text_cache: str | Path | None = None) -> EvaluationEncoder:
    """Train the evaluation encoder on the store's records `rows` (real ECGs, their reports and labels)."""
    rows = np.asarray(rows, int)
    if len(rows) < 2:
        raise UserError(f"evaluation encoder: needs at least 2 real records to train on, got {len(rows)}")
    if config.steps < 1:
        raise UserError("evaluation encoder: steps must be at least 1")
    labels = store.records.labels.to_numpy()[rows]
    counts: dict[str, int] = {}
    for text in labels:
        for code in record_codes(text):
            counts[code] = counts.get(code, 0) + 1
    codes = sorted(c for c, n in sorted(counts.items(), key=lambda kv: -kv[1])[:config.max_codes]
                   if n >= config.min_code_count)
    text = StatementEncoder(config.text_model, cache_dir=text_cache)
    signals = torch.from_numpy(np.asarray(store.signals[rows], np.float32))
    text_vecs = torch.from_numpy(report_vectors(text, reports))
    targets = torch.from_numpy(multi_hot(labels, codes))
    same_text = torch.from_numpy(np.equal.outer(np.asarray(reports, object), np.asarray(reports, object)).astype(np.float32))
    with torch.random.fork_rng(devices=[]):  # seeded initial weights, the caller's random state untouched
        torch.manual_seed(config.seed)
        model = ClipModel(signals.shape[1], text.dim, len(codes), config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    rng = np.random.default_rng(config.seed)
    losses = []
    model.train()
    for _ in tqdm(range(config.steps), desc="evaluation encoder", unit="step", disable=not progress, file=sys.stderr):
        batch = torch.from_numpy(rng.choice(len(rows), size=min(config.batch_size, len(rows)), replace=False))
        e = model.ecg(signals[batch])
        t = model.text(text_vecs[batch])
        logits = model.logit_scale.clamp(max=np.log(100)).exp() * F.normalize(e, dim=1) @ F.normalize(t, dim=1).T
        positive = same_text[batch][:, batch]
        target = positive / positive.sum(1, keepdim=True)
        clip = 0.5 * (-(target * F.log_softmax(logits, 1)).sum(1).mean() - (target * F.log_softmax(logits.T, 1)).sum(1).mean())
        loss = clip
        if codes:
            loss = loss + config.classifier_weight * F.binary_cross_entropy_with_logits(
                model.head(e)[:, :len(codes)], targets[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    info = {"records": int(len(rows)), "patients": int(store.records.patient_id.iloc[rows].nunique()),
            "steps": config.steps, "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])),
            "codes": codes}
    return EvaluationEncoder(model, codes, text, store.fs, signals.shape[-1],
                             tuple(store.manifest.get("representation", {}).get("leads", LEADS)), config, info)
