"""PTB-XL: ptbxl_database.csv + scp_statements.csv + records100/ or records500/."""

from __future__ import annotations

import ast
import datetime as dt
import functools
from pathlib import Path

from ecgtwin.data.readers.common import load_with_metadata, optional_float, read_table
from ecgtwin.data.record import Rejected, parse_age, parse_sex
from ecgtwin.errors import UserError, MissingInput

RATES = {100: "filename_lr", 500: "filename_hr"}
COLUMNS = ("ecg_id", "patient_id", "scp_codes", "recording_date", "age", "sex", "report", "site", "strat_fold")


def scan(root: Path, rate: int = 500, **_: object) -> tuple[list, list[Rejected]]:
    if rate not in RATES:
        raise UserError(f"PTB-XL comes at 100 or 500 Hz, not {rate}")
    database = root / "ptbxl_database.csv"
    if not database.is_file():
        raise MissingInput(f"{database}: not a PTB-XL folder (ptbxl_database.csv missing)")
    table = read_table(database, (*COLUMNS, RATES[rate]))
    statements = _statement_names(root / "scp_statements.csv")
    tasks, rejected = [], []
    for row in table.to_dict("records"):
        try:
            meta = _metadata(row, statements)
        except (ValueError, SyntaxError) as exc:
            rejected.append(Rejected(f"{database}:ecg_id={row.get('ecg_id')}", "bad_metadata", str(exc)))
            continue
        tasks.append(functools.partial(load_with_metadata, root / row[RATES[rate]], meta))
    return tasks, rejected


def _statement_names(path: Path) -> dict[str, str]:
    """SCP code -> English description, used for an English report next to the original text."""
    if not path.is_file():
        return {}
    table = read_table(path, ["description"], index_col=0)
    return {str(code): str(desc) for code, desc in table["description"].items()}


def _metadata(row: dict, statements: dict[str, str]) -> dict:
    codes = ast.literal_eval(row["scp_codes"]) if row["scp_codes"] else {}
    if not isinstance(codes, dict):
        raise UserError(f"scp_codes is not a mapping: {row['scp_codes']!r}")
    ecg_id = str(int(float(row["ecg_id"])))
    english = [statements[c] for c, p in sorted(codes.items(), key=lambda kv: -kv[1]) if c in statements]
    return dict(
        record_id=f"ptbxl-{ecg_id}",
        patient_id=str(int(float(row["patient_id"]))),
        recording_time=dt.datetime.fromisoformat(row["recording_date"]) if row["recording_date"] else None,
        age=parse_age(row["age"]),
        sex=parse_sex(row["sex"]),
        report=row["report"].strip(),
        labels={str(c): float(p) for c, p in codes.items()},
        site=str(int(float(row["site"]))) if optional_float(row["site"]) is not None else "",
        fold=int(float(row["strat_fold"])) if optional_float(row["strat_fold"]) is not None else None,
        extra={"report_en": ". ".join(english), "ecg_id": ecg_id},
    )
