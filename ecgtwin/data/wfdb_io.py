"""Reading and writing WFDB records (.hea + .dat/.mat) with errors that name the file."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import numpy as np
import wfdb

from ecgtwin.data.record import LEADS, RecordError

_UNIT_TO_MV = {"mv": 1.0, "uv": 1e-3, "µv": 1e-3, "v": 1e3, "nu": 1.0, "": 1.0}


@dataclasses.dataclass
class WfdbSignal:
    """A record as WFDB stores it: all channels in mV, with their names and the header comments."""

    signal: np.ndarray  # (n_channels, n_samples) float32, mV
    fs: float
    names: list[str]
    comments: list[str]
    base_time: dt.datetime | None


def read_wfdb(path: str | Path) -> WfdbSignal:
    """Read the record at `path` (with or without .hea); every failure is a RecordError with a reason code."""
    base = Path(str(path).removesuffix(".hea"))
    header = Path(str(base) + ".hea")
    if not header.is_file():
        raise RecordError("missing_file", f"header {header} does not exist")
    try:
        head = wfdb.rdheader(str(base))
    except Exception as exc:  # wfdb raises ValueError, IndexError, ... on malformed headers
        raise RecordError("bad_header", f"cannot parse header: {_first_line(exc)}") from exc
    if not head.sig_name or not head.file_name:
        raise RecordError("bad_header", "header declares no signals")
    for name in sorted(set(head.file_name)):
        if not (base.parent / name).is_file():
            raise RecordError("missing_file", f"signal file {base.parent / name} does not exist")
    try:
        rec = wfdb.rdrecord(str(base), physical=True)
    except Exception as exc:
        raise RecordError("corrupt_file", f"cannot read signal data: {_first_line(exc)}") from exc
    signal = np.asarray(rec.p_signal, dtype=np.float64).T
    if signal.ndim != 2 or signal.shape[1] != head.sig_len:
        raise RecordError(
            "corrupt_file",
            f"signal data holds {0 if signal.ndim != 2 else signal.shape[1]} samples, header declares {head.sig_len} (truncated?)",
        )
    units = [(u or "").strip().lower() for u in (rec.units or [""] * signal.shape[0])]
    scale = np.array([_UNIT_TO_MV.get(u, 1.0) for u in units])[:, None]
    base_time = None
    if rec.base_date is not None:
        base_time = dt.datetime.combine(rec.base_date, rec.base_time or dt.time())
    return WfdbSignal(
        signal=(signal * scale).astype(np.float32),
        fs=float(rec.fs),
        names=list(rec.sig_name),
        comments=list(rec.comments or []),
        base_time=base_time,
    )


def write_wfdb(
    directory: str | Path,
    name: str,
    signal_mv: np.ndarray,
    fs: float,
    comments: list[str] | None = None,
    leads: tuple[str, ...] = LEADS,
) -> Path:
    """Write a (n_leads, n_samples) mV signal as a format-16 WFDB record at 1 uV resolution."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    signal = np.nan_to_num(np.asarray(signal_mv, dtype=np.float64).T)
    # 1000 adu/mV stores +-32.7 mV in 16 bits; clip rather than overflow on absurd input.
    signal = np.clip(signal, -32.0, 32.0)
    wfdb.wrsamp(
        record_name=name,
        fs=fs,
        units=["mV"] * signal.shape[1],
        sig_name=list(leads),
        p_signal=signal,
        fmt=["16"] * signal.shape[1],
        adc_gain=[1000.0] * signal.shape[1],
        baseline=[0] * signal.shape[1],
        comments=comments or [],
        write_dir=str(directory),
    )
    return directory / name


def header_fields(comments: list[str]) -> dict[str, str]:
    """'# Age: 78' style comment lines -> {'age': '78'} (keys lower-cased)."""
    fields: dict[str, str] = {}
    for line in comments:
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip().lower()] = value.strip()
    return fields


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
