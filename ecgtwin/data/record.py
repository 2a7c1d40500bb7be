"""One record model for every reader: 12 leads in canonical order, in mV, plus metadata.

Readers never raise on a bad file: they yield a `Rejected` naming the file and the reason,
so one damaged record cannot stop a site's preparation and nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Iterable, Union

import numpy as np

LEADS: tuple[str, ...] = ("I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "V6")
_CANONICAL = {name.lower(): name for name in LEADS}
# Spellings seen in the wild (PTB 'i', MIMIC 'AVR', some exports 'lead_ii', 'MLII').
_ALIASES = {"mlii": "II", "mli": "I", "mliii": "III"}


class RecordError(Exception):
    """A record that cannot be used; `reason` is a short machine-readable code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class Rejected:
    """A record a reader or a quality check refused: which file, why (code), and the one-line message."""

    source: str
    reason: str
    message: str

    def line(self) -> str:
        return f"{self.source}: {self.reason}: {self.message}"


@dataclasses.dataclass
class Record:
    """A 12-lead ECG in mV, shape (12, n_samples), leads in `LEADS` order."""

    record_id: str
    signal: np.ndarray
    fs: float
    patient_id: str
    source: str  # the file it came from, for error messages and provenance
    recording_time: dt.datetime | None = None
    age: float | None = None
    sex: str | None = None  # "F", "M" or None
    report: str = ""
    labels: dict[str, float] = dataclasses.field(default_factory=dict)  # code -> likelihood (0..100)
    site: str = ""
    fold: int | None = None
    hr: float | None = None  # as stated by the source (e.g. synthetic metadata), not measured
    extra: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def duration_s(self) -> float:
        return self.signal.shape[1] / self.fs


ReadResult = Union[Record, Rejected]
ReadResults = Iterable[ReadResult]


def canonical_lead(name: str) -> str | None:
    """Map a lead name case-insensitively to its canonical spelling, or None if it is not a standard lead."""
    key = name.strip().lower().replace("lead", "").replace("_", "").replace("-", "").replace(" ", "")
    return _CANONICAL.get(key) or _ALIASES.get(key)


def to_canonical_order(signal: np.ndarray, names: list[str]) -> np.ndarray:
    """Reorder (n_leads, n) channels into LEADS order; extra non-ECG channels are ignored.

    Raises RecordError('unmapped_leads') naming which of the 12 leads are absent.
    """
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        lead = canonical_lead(name)
        if lead is not None and lead not in index:
            index[lead] = i
    missing = [lead for lead in LEADS if lead not in index]
    if missing:
        raise RecordError(
            "unmapped_leads",
            f"cannot map leads {names} to the 12 standard leads (missing {', '.join(missing)})",
        )
    return np.stack([signal[index[lead]] for lead in LEADS]).astype(np.float32)


def parse_sex(value: object) -> str | None:
    """'Male', 'm', 0 (PTB-XL: 0 = male), 'Female', 'f', 1 -> 'M'/'F'; anything else -> None."""
    if value is None:
        return None
    text = str(value).strip().lower()
    if text in {"m", "male", "0", "0.0"}:
        return "M"
    if text in {"f", "female", "1", "1.0"}:
        return "F"
    return None


def parse_age(value: object) -> float | None:
    """A plausible age in years, or None (PTB-XL codes ages over 89 as 300)."""
    try:
        age = float(str(value).strip())
    except ValueError:
        return None
    if not np.isfinite(age) or age < 0:
        return None
    return 90.0 if age > 120 else age
