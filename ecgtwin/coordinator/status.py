"""out/status.json: how a run ended (running | finished | failed, with the reason), judged by callers
instead of an exit status."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import numpy as np

from ecgtwin.checkpoint import atomic_write


def write_status(out: str | Path, status: str, message: str = "", **extra: Any) -> None:
    atomic_write(Path(out) / "status.json",
                 json.dumps({"status": status, "message": message, "time": now(), **extra}, indent=2).encode())


def read_status(out: str | Path) -> dict | None:
    path = Path(out) / "status.json"
    return json.loads(path.read_text()) if path.is_file() else None


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def json_default(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    return str(value)
