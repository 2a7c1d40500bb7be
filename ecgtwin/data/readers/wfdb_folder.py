"""A plain folder of WFDB records, any rate and length; long records are cut into windows.

The patient is the record's folder (PTB's patient001/ layout) unless the folder is the root itself,
in which case each record is its own patient. Age, sex and date come from header comments if present.
"""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path

from ecgtwin.data.readers.common import load_12_lead, reject
from ecgtwin.data.record import Record, RecordError, Rejected, parse_age, parse_sex
from ecgtwin.data.wfdb_io import header_fields


def scan(root: Path, window_s: float = 10.0, **_: object) -> tuple[list, list[Rejected]]:
    headers = sorted(root.rglob("*.hea"))
    return [functools.partial(_load, h.with_suffix(""), root, window_s) for h in headers], []


def _load(path: Path, root: Path, window_s: float) -> list:
    try:
        rec = load_12_lead(path)
    except RecordError as error:
        return [reject(path, error)]
    fields = header_fields(rec.comments)
    patient = path.parent.name if path.parent != root else path.name
    window = int(round(window_s * rec.fs))
    n_windows = max(1, rec.signal.shape[1] // window)  # a short record stays whole: quality checks judge it
    stem = str(path.relative_to(root)).replace("/", "-")
    return [
        Record(
            record_id=f"wfdb-{stem}" + (f"-w{k}" if n_windows > 1 else ""),
            patient_id=patient,
            signal=rec.signal[:, k * window:(k + 1) * window] if n_windows > 1 else rec.signal,
            fs=rec.fs,
            source=str(path),
            recording_time=_time(rec.base_time, fields, k * window_s),
            age=parse_age(fields.get("age")),
            sex=parse_sex(fields.get("sex")),
            report=fields.get("reason for admission", fields.get("dx", "")),
            extra={"recording": stem, **({"window": str(k)} if n_windows > 1 else {}),
                   **({"patient_id_from": "record"} if path.parent == root else {})},  # flat folder: no patient ids
        )
        for k in range(n_windows)
    ]


def _time(base: dt.datetime | None, fields: dict[str, str], offset_s: float) -> dt.datetime | None:
    """Start time of a window: the header's base time, else PTB's '# ECG date: dd/mm/yyyy' comment."""
    if base is None and "ecg date" in fields:
        try:
            base = dt.datetime.strptime(fields["ecg date"], "%d/%m/%Y")
        except ValueError:
            base = None
    return None if base is None else base + dt.timedelta(seconds=offset_s)
