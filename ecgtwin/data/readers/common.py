"""Shared helpers for readers: one WFDB file -> Record or Rejected."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import pandas as pd

from ecgtwin.data.record import LEADS, Record, RecordError, Rejected, to_canonical_order
from ecgtwin.data.store import blank_id
from ecgtwin.data.wfdb_io import WfdbSignal, read_wfdb
from ecgtwin.errors import UserError


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


def read_table(path: Path, columns: Iterable[str], **options: object) -> pd.DataFrame:
    """A dataset's CSV as text, with the columns the reader needs; a missing one is one line naming the file
    (not a KeyError deep in a reader)."""
    try:
        table = pd.read_csv(path, **{"dtype": str, "keep_default_na": False, **options})
    except ValueError as exc:  # pandas' parser and empty-file errors are ValueErrors
        raise UserError(f"{path}: not a readable CSV ({exc})") from exc
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise UserError(f"{path}: missing column{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return table


def patient_id(value: object) -> str:
    """A metadata row's patient id; a blank one is a bad row (it would merge patients into one)."""
    if blank_id(value):
        raise ValueError(f"no patient_id ({value!r})")
    return str(value)
