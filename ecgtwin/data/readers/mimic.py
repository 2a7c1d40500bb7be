"""MIMIC-IV-ECG: record_list.csv, machine_measurements.csv (report_0..report_17), files/pXXXX/pN/sM/M."""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path

from ecgtwin.data.readers.common import load_with_metadata, optional_float, patient_id, read_table
from ecgtwin.data.record import Rejected
from ecgtwin.errors import MissingInput

N_REPORT_COLUMNS = 18


def scan(root: Path, **_: object) -> tuple[list, list[Rejected]]:
    record_list = root / "record_list.csv"
    if not record_list.is_file():
        raise MissingInput(f"{record_list}: not a MIMIC-IV-ECG folder (record_list.csv missing)")
    records = read_table(record_list, ("study_id", "subject_id", "path"))
    measurements = _measurements(root / "machine_measurements.csv")
    tasks, rejected = [], []
    for row in records.to_dict("records"):
        study = row.get("study_id", "")
        try:
            meta = _metadata(row, measurements.get(study, {}))
        except (KeyError, ValueError) as exc:
            rejected.append(Rejected(f"{record_list}:study_id={study}", "bad_metadata", f"unusable row: {exc}"))
            continue
        tasks.append(functools.partial(load_with_metadata, root / row["path"], meta))
    return tasks, rejected


def _measurements(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    table = read_table(path, ["study_id"])
    return {row["study_id"]: row for row in table.to_dict("records")}


def _metadata(row: dict, measured: dict) -> dict:
    statements = [measured.get(f"report_{i}", "").strip() for i in range(N_REPORT_COLUMNS)]
    statements = [s.rstrip(".") for s in statements if s]
    rr_ms = optional_float(measured.get("rr_interval"))
    return dict(
        record_id=f"mimic-{row['study_id']}",
        patient_id=patient_id(row["subject_id"]),
        recording_time=dt.datetime.fromisoformat(row["ecg_time"]) if row.get("ecg_time") else None,
        report=". ".join(statements),
        hr=60000.0 / rr_ms if rr_ms and rr_ms > 0 else None,
        extra={"study_id": str(row["study_id"]), "statements": "|".join(statements)},
    )
