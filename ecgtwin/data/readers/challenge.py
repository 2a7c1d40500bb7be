"""PhysioNet/CinC Challenge 2020/2021 format: .hea + .mat, '# Age', '# Sex', '# Dx: SNOMED codes'."""

from __future__ import annotations

import functools
from pathlib import Path

from ecgtwin.data.readers.common import read_table, try_load
from ecgtwin.data.record import Record, RecordError, Rejected, parse_age, parse_sex
from ecgtwin.data.wfdb_io import WfdbSignal, header_fields

# Record-name prefix -> the Challenge's source database; a natural split into sites.
DATABASES = {
    "A": "CPSC", "Q": "CPSC-Extra", "I": "StPetersburg", "S": "PTB",
    "HR": "PTB-XL", "E": "Georgia", "JS": "Chapman-Ningbo",
}


def scan(root: Path, **_: object) -> tuple[list, list[Rejected]]:
    headers = sorted(root.rglob("*.hea"))
    names = _dx_names(root)
    return [functools.partial(_load, h.with_suffix(""), names) for h in headers], []


def database_of(record_name: str) -> str:
    prefix = record_name.rstrip("0123456789")
    return DATABASES.get(prefix, prefix or "unknown")


def _dx_names(root: Path) -> dict[str, str]:
    """SNOMED code -> name from the Challenge's dx_mapping_*.csv files, where present."""
    names: dict[str, str] = {}
    for path in sorted(root.rglob("dx_mapping_*.csv")):
        table = read_table(path, ("SNOMEDCTCode", "Dx"), keep_default_na=True)
        names.update(zip(table["SNOMEDCTCode"], table["Dx"]))
    return names


def _load(path: Path, dx_names: dict[str, str]) -> list:
    def build(rec: WfdbSignal) -> Record:
        fields = header_fields(rec.comments)
        if "dx" not in fields:
            raise RecordError("bad_header", "no '# Dx:' line in the header")
        codes = [c.strip() for c in fields["dx"].split(",") if c.strip()]
        return Record(
            record_id=f"challenge-{path.name}",
            patient_id=path.name,  # the Challenge carries no patient ids: every record its own patient
            signal=rec.signal,
            fs=rec.fs,
            source=str(path),
            age=parse_age(fields.get("age")),
            sex=parse_sex(fields.get("sex")),
            report=". ".join(dx_names.get(c, f"SNOMED {c}") for c in codes),
            labels={c: 100.0 for c in codes},
            site=database_of(path.name),
            extra={"patient_id_from": "record"},  # read by the DP planner: a patient here is a recording
        )

    return try_load(path, build)
