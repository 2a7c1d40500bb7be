"""Shared helpers for readers: one WFDB file -> Record or Rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ecgtwin.data.record import LEADS, Record, RecordError, Rejected, to_canonical_order
from ecgtwin.data.wfdb_io import WfdbSignal, read_wfdb


def load_12_lead(path: Path) -> WfdbSignal:
    """Read a WFDB record and put its 12 standard leads in canonical order (other channels dropped)."""
    rec = read_wfdb(path)
    if len(rec.names) < len(LEADS):
        raise RecordError("wrong_lead_count", f"{len(rec.names)} leads ({', '.join(rec.names)}), need the 12 standard leads")
    rec.signal = to_canonical_order(rec.signal, rec.names)
    rec.names = list(LEADS)
    return rec


def reject(path: Path | str, error: RecordError) -> Rejected:
    return Rejected(source=str(path), reason=error.reason, message=str(error))


def try_load(path: Path, build: Callable[[WfdbSignal], Record]) -> list:
    """Load `path` and build a Record from it; any RecordError becomes a Rejected naming the file."""
    try:
        return [build(load_12_lead(path))]
    except RecordError as error:
        return [reject(path, error)]


def optional_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number == number else None  # NaN -> None


def load_with_metadata(path: Path, meta: dict) -> list:
    """Load the WFDB record at `path` as a Record carrying the metadata a dataset's table gave for it."""
    def build(rec: WfdbSignal) -> Record:
        return Record(signal=rec.signal, fs=rec.fs, source=str(path), **meta)

    return try_load(path, build)
