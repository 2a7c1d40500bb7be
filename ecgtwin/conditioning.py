"""Condition tokens, as both papers build them: one token per report statement, each statement's
embedding concatenated with the patient's normalised [HR, age, sex].

The normalisation statistics are fitted on the training store and saved with the checkpoint, so a
twin generated later is conditioned on the same scale the model was trained on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ecgtwin.config import ExperimentConfig
from ecgtwin.errors import MissingInput
from ecgtwin.text import StatementEncoder, split_statements

SEX_CODE = {"F": 1.0, "M": -1.0}  # unknown sex -> 0, the midpoint


@dataclasses.dataclass
class PatientInfoNormalizer:
    """z-normalises HR and age (missing values -> 0, i.e. the mean); sex F = +1, M = -1, unknown = 0."""

    hr_mean: float = 75.0
    hr_std: float = 20.0
    age_mean: float = 60.0
    age_std: float = 17.0

    @classmethod
    def fit(cls, hr: np.ndarray, age: np.ndarray) -> "PatientInfoNormalizer":
        def stats(x: np.ndarray, default: tuple[float, float]) -> tuple[float, float]:
            x = np.asarray(x, dtype=float)
            x = x[np.isfinite(x)]
            if len(x) < 2 or np.std(x) == 0:
                return default
            return float(np.mean(x)), float(np.std(x))

        hr_mean, hr_std = stats(hr, (cls.hr_mean, cls.hr_std))
        age_mean, age_std = stats(age, (cls.age_mean, cls.age_std))
        return cls(hr_mean, hr_std, age_mean, age_std)

    def transform(self, hr: np.ndarray, age: np.ndarray, sex: list[str | None]) -> np.ndarray:
        hr = (np.asarray(hr, dtype=float) - self.hr_mean) / self.hr_std
        age = (np.asarray(age, dtype=float) - self.age_mean) / self.age_std
        sex_code = np.array([SEX_CODE.get(str(s), 0.0) for s in sex])
        return np.nan_to_num(np.stack([hr, age, sex_code], axis=1)).astype(np.float32)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "PatientInfoNormalizer":
        return cls(**json.loads(text))


@dataclasses.dataclass
class Conditions:
    """Condition tokens of n records: statement ids (n, S) into a vocabulary of distinct statement
    embeddings (V, E), with mask (n, S), and patient info (n, 3). A site repeats a few hundred statements
    over up to hundreds of thousands of records, so the embeddings are kept once, not per record."""

    vocabulary: torch.Tensor  # (V, E); row 0 is the empty statement (zeros)
    ids: torch.Tensor  # (n, S) long
    mask: torch.Tensor
    patient: torch.Tensor

    def to(self, device: torch.device | str) -> "Conditions":
        return Conditions(*(t.to(device) for t in (self.vocabulary, self.ids, self.mask, self.patient)))

    def tokens(self, index: torch.Tensor | slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens (b, S, E + 3), mask (b, S)) for the selected records."""
        index = slice(None) if index is None else index
        statements, patient = self.vocabulary[self.ids[index]], self.patient[index]
        tokens = torch.cat([statements, patient[:, None, :].expand(-1, statements.shape[1], -1)], dim=-1)
        return tokens, self.mask[index]


class Conditioner:
    """Reports and patient information -> Conditions. A report with no statement gets one empty
    (all-zero) statement token, so the patient information still reaches the model."""

    def __init__(self, encoder: StatementEncoder, normalizer: PatientInfoNormalizer, max_statements: int) -> None:
        self.encoder = encoder
        self.normalizer = normalizer
        self.max_statements = max_statements

    def build(self, reports: list[str], hr: np.ndarray, age: np.ndarray, sex: list[str | None]) -> Conditions:
        split = [split_statements(r)[: self.max_statements] for r in reports]
        width = max(1, max((len(s) for s in split), default=1))
        distinct = sorted({s for statements in split for s in statements})
        vocabulary = np.zeros((len(distinct) + 1, self.encoder.dim), np.float32)
        if distinct:
            vocabulary[1:] = self.encoder.embed(distinct)
        number = {s: k + 1 for k, s in enumerate(distinct)}
        ids = np.zeros((len(reports), width), np.int64)
        mask = np.zeros((len(reports), width), bool)
        mask[:, 0] = True
        for i, statements in enumerate(split):
            ids[i, :len(statements)] = [number[s] for s in statements]
            mask[i, :len(statements)] = True
        patient = self.normalizer.transform(hr, age, sex)
        return Conditions(torch.from_numpy(vocabulary), torch.from_numpy(ids), torch.from_numpy(mask),
                          torch.from_numpy(patient))


def report_text(row: pd.Series) -> str:
    """The report to condition on: an English statement list where the source has one (PTB-XL's SCP
    descriptions: its free text is German, the sentence encoder English), else the report itself."""
    extra = json.loads(row.get("extra") or "{}")
    return extra.get("report_en") or str(row.get("report") or "")


def conditioning_hr(records: pd.DataFrame) -> np.ndarray:
    """HR as the source states it, else as measured from the R peaks at prepare time."""
    stated = pd.to_numeric(records["hr"], errors="coerce")
    measured = pd.to_numeric(records.get("hr_measured", pd.Series(np.nan, index=records.index)), errors="coerce")
    return stated.fillna(measured).to_numpy(dtype=float)


def store_conditions(records: pd.DataFrame, conditioner: Conditioner) -> Conditions:
    """Conditions of every record of a site store (records.csv rows)."""
    reports = [report_text(row) for _, row in records.iterrows()]
    age = pd.to_numeric(records["age"], errors="coerce").to_numpy(dtype=float)
    sex = [s if s in SEX_CODE else None for s in records["sex"].astype(str)]
    return conditioner.build(reports, conditioning_hr(records), age, sex)


NORMALIZER_FILE = "conditioning.json"  # beside the weights in a checkpoint folder


def conditioner_from(config: ExperimentConfig, normalizer: PatientInfoNormalizer,
                     cache_dir: Path | None = None) -> Conditioner:
    """The conditioner of an experiment with the given patient-info statistics; statement embeddings are
    cached in `cache_dir` (a site-side folder: its keys are report statements)."""
    encoder = StatementEncoder(config.text.encoder, cache_dir=cache_dir)
    return Conditioner(encoder, normalizer, config.text.max_statements)


def fit_normalizer(records: pd.DataFrame) -> PatientInfoNormalizer:
    """Statistics of one store's records (centralised training only: in federated and private training
    they would be an un-noised statistic of a site's patients, so those use the fixed population ones)."""
    return PatientInfoNormalizer.fit(conditioning_hr(records),
                                     records["age"].replace("", np.nan).astype(float).to_numpy())


def ensure_population_normalizer(folder: str | Path) -> None:
    """Give checkpoint folder `folder` the fixed population statistics unless it has statistics already:
    federated, private and foundation models use these, never statistics of a site's patients."""
    path = Path(folder) / NORMALIZER_FILE
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(PatientInfoNormalizer().to_json())


def read_normalizer(folder: Path) -> PatientInfoNormalizer:
    path = Path(folder) / NORMALIZER_FILE
    if not path.is_file():
        raise MissingInput(f"{path}: missing; the checkpoint was not trained past the VAE stage")
    return PatientInfoNormalizer.from_json(path.read_text())


def load_conditioner(config: ExperimentConfig, folder: Path) -> Conditioner:
    """The conditioner of checkpoint folder `folder` (its saved statistics, its text cache)."""
    return conditioner_from(config, read_normalizer(folder), Path(folder) / "text-cache")
