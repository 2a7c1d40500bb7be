"""records on disk -> site store: read, preprocess, check quality, write; report what was kept and why not."""

from __future__ import annotations

import collections
import concurrent.futures as cf
import dataclasses
import datetime as dt
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from ecgtwin.data import readers
from ecgtwin.data.preprocess import PreprocessConfig, preprocess
from ecgtwin.data.record import LEADS, Record, RecordError, Rejected
from ecgtwin.data.store import StoreWriter, record_row
from ecgtwin.data.signal import heart_rate
from ecgtwin.errors import UserError

Kept = tuple[dict, np.ndarray, bool]  # store row, signal, was cropped
IN_FLIGHT_PER_WORKER = 16  # enough to hide the writer's pauses, few enough to bound memory (~50 kB each)


def prepare_store(
    source: str,
    root: str | Path,
    out: str | Path,
    config: PreprocessConfig = PreprocessConfig(),
    workers: int = 1,
    progress: bool = False,
    on_reject: Callable[[Rejected], None] | None = None,
    **reader_options: object,
) -> dict:
    """Build the site store at `out` from a dataset; returns the summary (also kept in the manifest).

    Every refused record is passed to `on_reject` (default: one line on stderr) and listed in
    rejected.csv; nothing is dropped without a reason.
    """
    on_reject = on_reject or (lambda item: print(f"rejected {item.line()}", file=sys.stderr))
    started = time.perf_counter()
    tasks, listing_rejects = readers.scan(source, root, **reader_options)
    writer = StoreWriter(out, config.n_samples)
    counts = _Counts()
    try:
        for item in listing_rejects:
            counts.add_rejected(item, writer, on_reject)
        bar = tqdm(total=len(tasks), desc=f"prepare {source}", unit="rec", disable=not progress, file=sys.stderr)
        for results in _run(tasks, config, workers):
            bar.update(1)
            for item in results:
                if isinstance(item, Rejected):
                    counts.add_rejected(item, writer, on_reject)
                else:
                    row, signal, cropped = item
                    writer.add(row, signal)
                    counts.add_kept(row, cropped)
        bar.close()
        if not writer.rows:  # an empty store would train nothing, and later fail far from the cause
            raise UserError(_nothing_usable(source, root, counts))
        summary = counts.summary(writer.rows, time.perf_counter() - started)
        writer.commit(_manifest(source, root, config, reader_options, summary))
    except BaseException:
        writer.abort()
        raise
    return {"store": str(out), **summary}


def process_task(task: readers.LoadTask, config: PreprocessConfig) -> list[Kept | Rejected]:
    """Load one source record (maybe several windows) and preprocess each; runs in a worker process."""
    out: list[Kept | Rejected] = []
    for item in task():
        if isinstance(item, Rejected):
            out.append(item)
            continue
        try:
            signal, cropped = preprocess(item, config)
        except RecordError as error:
            out.append(Rejected(_name(item), error.reason, str(error)))
            continue
        row = record_row(item)
        # Measured at the source rate, before resampling: the conditioning HR for sources that state none.
        row["hr_measured"] = round(heart_rate(item.signal[:, : int(config.duration_s * item.fs)], item.fs), 2)
        out.append((row, signal, cropped))
    return out


def _name(record: Record) -> str:
    window = record.extra.get("window")
    return record.source + (f" (window {window})" if window is not None else "")


def _run(tasks: list, config: PreprocessConfig, workers: int) -> Iterator[list]:
    """Results in task order. With workers, at most `IN_FLIGHT_PER_WORKER` tasks per worker are queued or
    done-but-unwritten at any time: memory stays flat however large the site (Executor.map would submit
    every task at once and could hold every finished signal while the writer catches up)."""
    if workers <= 1:
        yield from (process_task(t, config) for t in tasks)
        return
    window = collections.deque()
    with cf.ProcessPoolExecutor(max_workers=workers) as pool:
        for task in tasks:
            window.append(pool.submit(process_task, task, config))
            if len(window) >= IN_FLIGHT_PER_WORKER * workers:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


@dataclasses.dataclass
class _Counts:
    sources_seen: set = dataclasses.field(default_factory=set)
    sources_kept: set = dataclasses.field(default_factory=set)
    rejected: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    cropped: int = 0

    def add_rejected(self, item: Rejected, writer: StoreWriter, on_reject: Callable[[Rejected], None]) -> None:
        self.sources_seen.add(item.source.split(" (window")[0])
        self.rejected[item.reason] += 1
        writer.reject(item)
        on_reject(item)

    def add_kept(self, row: dict, cropped: bool) -> None:
        self.sources_seen.add(row["source"])
        self.sources_kept.add(row["source"])
        self.cropped += int(cropped)

    def summary(self, rows: list[dict], seconds: float) -> dict:
        per_patient = collections.Counter(r["patient_id"] for r in rows)
        return {
            "records_read": len(self.sources_seen),
            "records_kept": len(self.sources_kept),
            "segments_kept": len(rows),
            "rejected": dict(sorted(self.rejected.items())),
            "rejected_total": sum(self.rejected.values()),
            "cropped": self.cropped,
            "patients": len(per_patient),
            "patients_with_multiple_records": sum(1 for n in per_patient.values() if n > 1),
            "seconds": round(seconds, 3),
            "records_per_s": round(len(self.sources_seen) / seconds, 2) if seconds > 0 else None,
        }


def _nothing_usable(source: str, root: str | Path, counts: _Counts) -> str:
    if not counts.rejected:
        return f"{root}: no {source} records found there; no store written"
    reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(counts.rejected.items()))
    return (f"{root}: no usable {source} records, all {sum(counts.rejected.values())} rejected ({reasons}); "
            "no store written")


def _manifest(source: str, root: str | Path, config: PreprocessConfig, options: dict, summary: dict) -> dict:
    return {
        "source": source,
        "root": str(Path(root).resolve()),
        "reader_options": {k: v for k, v in options.items()},
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "representation": {"leads": list(LEADS), "n_samples": config.n_samples,
                           "duration_s": config.duration_s, "fs": config.fs, "units": "mV"},
        "preprocessing": dataclasses.asdict(config),
        "summary": summary,
    }
