"""A site store: the training-ready form of one site's records, grouped by patient.

Layout of STORE/ (written atomically: a new store replaces the old one only when complete):
    manifest.json   representation (leads, rate, length), source, preprocessing, summary
    signals.npy     float32 (n_records, 12, n_samples), rows sorted by patient then time
    records.csv     one row per signal: record_id, patient_id, recording_time, age, sex, report, labels, ...
    rejected.csv    every record that was refused: source file, reason code, message
    ledger-marker.json  (written by the site's ledger, not here) which ledger accounts this store's budget:
                    kept when the store is prepared again, so a re-prepared store never starts a new budget
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import os
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import pandas as pd

from ecgtwin.data.record import LEADS, Record, Rejected
from ecgtwin.errors import UserError, MissingInput

if TYPE_CHECKING:
    import torch

LEDGER_MARKER = "ledger-marker.json"
KEPT_ON_REPREPARE = (LEDGER_MARKER,)  # a store's files that outlive its data

FORMAT_VERSION = 1
RECORD_COLUMNS = (
    "record_id", "patient_id", "recording_time", "age", "sex", "report", "labels",
    "site", "fold", "hr", "hr_measured", "source", "extra",
)


def record_row(record: Record) -> dict:
    """The metadata of a record as one store row (labels and extra as JSON text)."""
    return {
        "record_id": record.record_id,
        "patient_id": record.patient_id,
        "recording_time": record.recording_time.isoformat() if record.recording_time else "",
        "age": record.age,
        "sex": record.sex or "",
        "report": record.report,
        "labels": json.dumps(record.labels, sort_keys=True),
        "site": record.site,
        "fold": record.fold,
        "hr": record.hr,
        "source": record.source,
        "extra": json.dumps(record.extra, sort_keys=True),
    }


class StoreWriter:
    """Collects preprocessed signals on disk (not in memory) and writes the final store atomically."""

    def __init__(self, out: str | Path, n_samples: int) -> None:
        self.out = Path(out)
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self._staging = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", dir=self.out.parent))
        self._staging.chmod(0o755)  # mkdtemp makes it owner-only; a store is shared with the site's trainers
        self._raw = open(self._staging / "signals.raw", "wb")
        self._shape = (len(LEADS), n_samples)
        self.rows: list[dict] = []
        self.rejected: list[Rejected] = []

    def add(self, row: dict, signal: np.ndarray) -> None:
        assert signal.shape == self._shape, signal.shape
        self._raw.write(np.ascontiguousarray(signal, dtype=np.float32).tobytes())
        self.rows.append(row)

    def reject(self, item: Rejected) -> None:
        self.rejected.append(item)

    def commit(self, manifest: dict) -> Path:
        """Sort by patient and time, write every file, then swap the finished store into place."""
        self._raw.close()
        table = pd.DataFrame(self.rows, columns=list(RECORD_COLUMNS))
        if not ids_are_records(table):  # refuse here what SiteStore would refuse to open
            check_patient_ids(table, self.out / "records.csv")
        order = table.sort_values(["patient_id", "recording_time", "record_id"], kind="stable").index.to_numpy()
        self._write_sorted(order)
        (self._staging / "signals.raw").unlink()
        table.iloc[order].to_csv(self._staging / "records.csv", index=False)
        pd.DataFrame([dataclasses.asdict(r) for r in self.rejected], columns=["source", "reason", "message"]).to_csv(
            self._staging / "rejected.csv", index=False)
        (self._staging / "manifest.json").write_text(json.dumps({"format_version": FORMAT_VERSION, **manifest}, indent=2))
        self._swap_into_place()
        return self.out

    def _write_sorted(self, order: np.ndarray) -> None:
        """signals.npy in `order`, copied a chunk at a time with plain reads and writes: memory stays flat,
        and no file-backed page is mapped (a memory map of a 5 GB site would count 5 GB in the RSS)."""
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False,
                  "shape": (len(order), *self._shape)}
        with open(self._staging / "signals.npy", "wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            for start in range(0, len(order), 1024):
                out.write(read_rows(self._staging / "signals.raw", 0, self._shape, order[start:start + 1024]).tobytes())

    def abort(self) -> None:
        self._raw.close()
        shutil.rmtree(self._staging, ignore_errors=True)

    def _swap_into_place(self) -> None:
        old = None
        if self.out.exists():
            for name in KEPT_ON_REPREPARE:
                if (self.out / name).is_file():
                    shutil.copy2(self.out / name, self._staging / name)
            old = self.out.with_name(f".{self.out.name}.old-{self._staging.name}")
            self.out.rename(old)
        self._staging.rename(self.out)
        if old is not None:
            shutil.rmtree(old)


class SiteStore:
    """Read access to a prepared site store; signals are memory-mapped, not loaded."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if not manifest.is_file():
            raise MissingInput(f"{self.path}: not a site store (no manifest.json); run `ecgtwin prepare` first")
        self.manifest = json.loads(manifest.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{self.path}: store format {self.manifest.get('format_version')}, "
                             f"this ecgtwin reads {FORMAT_VERSION}; prepare it again")
        self.signals = _open_signals(self.path / "signals.npy", self.manifest["representation"])
        self.records = _read_records(self.path / "records.csv")
        if len(self.records) != len(self.signals):
            raise UserError(f"{self.path}: records.csv has {len(self.records)} rows, signals.npy {len(self.signals)}; "
                             "the store is damaged, prepare it again")
        if not self.patient_ids_are_records:
            check_patient_ids(self.records, self.path / "records.csv")
        self._groups = {p: idx.to_numpy() for p, idx in self.records.groupby("patient_id", sort=True).groups.items()}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def patient_ids_are_records(self) -> bool:
        """True when the source had no patient ids and each recording stands for its own patient (the
        Challenge databases, a flat WFDB folder): patient-level DP is then only record-level DP."""
        return ids_are_records(self.records)

    @property
    def fs(self) -> float:
        return float(self.manifest["representation"]["fs"])

    @property
    def patients(self) -> list[str]:
        return list(self._groups)

    def records_of(self, patient_id: str) -> np.ndarray:
        """Row indices of a patient's records, earliest first."""
        return self._groups[patient_id]

    def read(self, rows: np.ndarray) -> np.ndarray:
        """The signals of `rows` (in that order) as an in-memory float32 array. Training reads a batch at a
        time through this: a large site's signals stay on disk (in the page cache, not in the RSS)."""
        return read_rows(self.path / "signals.npy", self.signals.offset, self.signals.shape[1:], rows)

    def rejected(self) -> pd.DataFrame:
        return pd.read_csv(self.path / "rejected.csv", keep_default_na=False)


class ReadAhead:
    """A store's batches read by reader threads before the training loop asks for them: read(rows, upcoming)
    hands back store.read(rows) (the prefetched copy when these rows were announced) and starts reading the
    `upcoming` batches. The positioned reads release the GIL, so the next batches come off disk while the
    caller computes on this one. An announced batch that is never asked for is dropped, so a wrong guess
    costs a read, never a wrong batch. pin=True hands back pinned CPU tensors, ready for an asynchronous
    copy to a GPU."""

    def __init__(self, store: SiteStore, workers: int = 2, ahead: int = 4, pin: bool = False) -> None:
        self.store, self.ahead, self.pin = store, ahead, pin
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers), thread_name_prefix="store-read")
        self._pending: dict[bytes, concurrent.futures.Future] = {}
        # a reader that is never closed (a stage's, kept with its step function) stops with its owner
        self._stop = weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop what is in flight and stop the reader threads."""
        self._pending.clear()
        self._stop()

    def in_flight(self) -> int:
        """Batches announced and not yet asked for."""
        return len(self._pending)

    def read(self, rows: np.ndarray, upcoming: Iterable[np.ndarray] = ()) -> np.ndarray | torch.Tensor:
        rows = np.asarray(rows, dtype=np.int64)
        found = self._pending.pop(rows.tobytes(), None)
        batch = found.result() if found is not None else self._load(rows)
        wanted = {}
        for later in itertools.islice(upcoming, self.ahead):
            later = np.asarray(later, dtype=np.int64)
            key = later.tobytes()
            wanted[key] = self._pending.pop(key, None) or self._pool.submit(self._load, later)
        for stale in self._pending.values():
            stale.cancel()
        self._pending = wanted
        return batch

    def _load(self, rows: np.ndarray) -> np.ndarray | torch.Tensor:
        batch = self.store.read(rows)
        if not self.pin:
            return batch
        import torch

        return torch.from_numpy(batch).pin_memory()


def merge_stores(parts: dict[str, SiteStore], out: str | Path) -> SiteStore:
    """One store made of prepared ones (a public corpus of several databases). Ids get their part's name in
    front, so two databases' patient "17" stay two patients; a part's records keep their rows and signals."""
    representations = {name: store.manifest["representation"] for name, store in parts.items()}
    first_name, first = next(iter(representations.items()))
    for name, representation in representations.items():
        if representation != first:
            raise UserError(f"{parts[name].path}: signals of {representation}, {parts[first_name].path} of {first}; "
                            "a merged store needs one representation")
    writer = StoreWriter(out, int(first["n_samples"]))
    try:
        for name, store in parts.items():
            table = store.records.reindex(columns=list(RECORD_COLUMNS), fill_value="")
            for column in ("record_id", "patient_id"):
                table[column] = f"{name}/" + table[column].astype(str)
            for start in range(0, len(store), 256):
                rows = np.arange(start, min(start + 256, len(store)))
                for row, signal in zip(table.iloc[rows].to_dict("records"), store.read(rows)):
                    writer.add(row, signal)
            for item in store.rejected().itertuples(index=False):
                writer.reject(Rejected(source=item.source, reason=item.reason, message=item.message))
        writer.commit({"source": "merged", "parts": {name: store.manifest for name, store in parts.items()},
                       "representation": first,
                       "summary": {"records": len(writer.rows), "parts": {n: len(s) for n, s in parts.items()}}})
    except BaseException:
        writer.abort()
        raise
    return SiteStore(out)


def read_rows(path: Path, offset: int, row_shape: tuple[int, ...], rows: np.ndarray) -> np.ndarray:
    """Rows of a C-ordered float32 array stored at `offset` of `path`, read with positioned reads in
    ascending order (sequential on disk) and returned in the order asked."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), *row_shape), np.float32)
    row_bytes = out[0].nbytes if len(rows) else 0
    fd = os.open(path, os.O_RDONLY)
    try:
        for i in np.argsort(rows, kind="stable"):
            view = memoryview(out[i]).cast("B")
            if os.preadv(fd, [view], offset + int(rows[i]) * row_bytes) != row_bytes:
                raise UserError(f"{path}: row {rows[i]} lies past the end of the file (truncated?); prepare it again")
    finally:
        os.close(fd)
    return out


def _open_signals(path: Path, representation: dict) -> np.ndarray:
    """Memory-map signals.npy; a damaged file is one line naming it (numpy's own message names no file)."""
    if not path.is_file():
        raise MissingInput(f"{path}: missing from the store; prepare it again")
    try:
        signals = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as exc:  # e.g. "mmap length is greater than file size": truncated
        raise UserError(f"{path}: unreadable or truncated ({exc}); prepare the store again") from exc
    expected = (len(representation["leads"]), int(representation["n_samples"]))
    if signals.ndim != 3 or signals.shape[1:] != expected:
        raise UserError(f"{path}: holds signals of shape {signals.shape}, the manifest says (n, {expected[0]}, "
                        f"{expected[1]}); prepare the store again")
    return signals


def _read_records(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise MissingInput(f"{path}: missing from the store; prepare it again")
    try:
        records = pd.read_csv(path, dtype={"patient_id": str, "record_id": str}, keep_default_na=False)
    except ValueError as exc:  # pandas' parser and empty-file errors are ValueErrors
        raise UserError(f"{path}: unreadable ({exc}); prepare the store again") from exc
    missing = [c for c in ("record_id", "patient_id", "extra") if c not in records.columns]
    if missing:
        raise UserError(f"{path}: missing column {', '.join(missing)}; prepare the store again")
    return records


def ids_are_records(records: pd.DataFrame) -> bool:
    """Whether a reader marked the records' patient ids as record ids (its source has no patient ids)."""
    return bool(records["extra"].astype(str).str.contains('"patient_id_from": "record"', regex=False).any())


def blank_id(value: object) -> bool:
    """True for an id that names nobody: empty, or what a missing value turns into as text."""
    return str(value).strip().lower() in {"", "nan", "none", "null"}


def check_patient_ids(records: pd.DataFrame, where: Path) -> None:
    """Refuse patient ids that would silently merge patients: the privacy unit and the held-out split are
    per patient, so a blank column must not count as one patient. One patient with many records is real (a
    PTB folder); one id across records of both sexes is a constant column, not a patient id."""
    if len(records) < 2:
        return
    blank = records["patient_id"].map(blank_id)
    if blank.any():
        first = records["record_id"][blank].iloc[0]
        raise UserError(f"{where}: {int(blank.sum())} of {len(records)} records have no patient_id "
                        f"(first: {first}); every record needs its patient's id")
    sexes = set(records["sex"]) - {""} if "sex" in records.columns else set()
    if records["patient_id"].nunique() == 1 and len(sexes) > 1:
        raise UserError(f"{where}: every record has patient_id {records['patient_id'].iloc[0]!r}, yet they are of "
                        f"both sexes: the patient_id column is not a patient id")
