"""Readers turn a dataset on disk into load tasks; each task yields Records or Rejected items.

A task is a picklable zero-argument callable, so `prepare` can run them in worker processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from ecgtwin.data.readers import challenge, mimic, ptbxl, synthetic, wfdb_folder
from ecgtwin.data.record import ReadResult, Rejected
from ecgtwin.errors import UserError, MissingInput

LoadTask = Callable[[], list[ReadResult]]
Scanner = Callable[..., tuple[list[LoadTask], list[Rejected]]]

SOURCES: dict[str, Scanner] = {
    "ptbxl": ptbxl.scan,
    "challenge": challenge.scan,
    "mimic-iv-ecg": mimic.scan,
    "wfdb": wfdb_folder.scan,
    "synthetic": synthetic.scan,
}


def scan(source: str, root: str | Path, **options: object) -> tuple[list[LoadTask], list[Rejected]]:
    """The load tasks of a dataset and the entries rejected while listing it (e.g. bad metadata rows)."""
    if source not in SOURCES:
        raise UserError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
    root = Path(root)
    if not root.exists():
        raise MissingInput(f"{root}: dataset root does not exist")
    return SOURCES[source](root, **options)
