"""The built-in synthetic consortium: <site>/metadata.csv + WFDB records (see ecgtwin.data.synthetic).

`root` is one site's folder, or the consortium folder (then every site under it is read).
"""

from __future__ import annotations

import datetime as dt
import functools
from pathlib import Path

from ecgtwin.data.readers.common import load_with_metadata, optional_float, patient_id, read_table
from ecgtwin.data.record import Rejected, parse_age, parse_sex
from ecgtwin.errors import MissingInput

COLUMNS = ("record", "patient_id", "site", "conditions", "report", "hr", "age", "sex")


def scan(root: Path, **_: object) -> tuple[list, list[Rejected]]:
    tables = [root / "metadata.csv"] if (root / "metadata.csv").is_file() else sorted(root.glob("*/metadata.csv"))
    if not tables:
        raise MissingInput(f"{root}: no metadata.csv here or in its site folders (not a synthetic consortium)")
    tasks, rejected = [], []
    for table_path in tables:
        table = read_table(table_path, COLUMNS)
        for row in table.to_dict("records"):
            try:
                meta = _metadata(row)
            except ValueError as exc:
                rejected.append(Rejected(f"{table_path}:record={row['record']}", "bad_metadata", str(exc)))
                continue
            tasks.append(functools.partial(load_with_metadata, table_path.parent / row["record"], meta))
    return tasks, rejected


def _metadata(row: dict) -> dict:
    conditions = [c for c in row["conditions"].split(";") if c]
    time = row.get("recording_time", "")
    return dict(
        record_id=f"synth-{row['record']}",
        patient_id=patient_id(row["patient_id"]),
        site=row["site"],
        report=row["report"],
        labels={c: 100.0 for c in conditions},
        hr=optional_float(row["hr"]),
        age=parse_age(row["age"]),
        sex=parse_sex(row["sex"]),
        recording_time=dt.datetime.fromisoformat(time) if time else None,
    )
