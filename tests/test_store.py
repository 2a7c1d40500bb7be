"""The site store: grouped by patient and time, atomic, safe to rebuild."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ecgtwin.data import prepare, readers
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.preprocess import PreprocessConfig
from ecgtwin.data.store import SiteStore
from ecgtwin.errors import UserError


@pytest.fixture(scope="module")
def ptbxl_store(ptbxl_root, tmp_path_factory) -> Path:
    """PTB-XL's records at 100 Hz, prepared with 2 workers (read-only: tests that damage it copy it)."""
    out = tmp_path_factory.mktemp("store") / "s"
    prepare_store("ptbxl", ptbxl_root, out, rate=100, workers=2)
    return out


def test_store_groups_records_by_patient_earliest_first(ptbxl_root, ptbxl_store):
    store = SiteStore(ptbxl_store)
    table = pd.read_csv(ptbxl_root / "ptbxl_database.csv")
    assert len(store) == 400 and store.signals.shape == (400, 12, 1024)
    assert len(store.patients) == table.patient_id.nunique()
    for patient, group in table.groupby("patient_id"):
        rows = store.records.iloc[store.records_of(str(int(patient)))]
        assert sorted(rows.record_id) == sorted(f"ptbxl-{i}" for i in group.ecg_id)
        assert list(rows.recording_time) == sorted(rows.recording_time)
    manifest = json.loads((ptbxl_store / "manifest.json").read_text())
    assert manifest["representation"]["fs"] == pytest.approx(102.4)
    assert manifest["summary"]["patients_with_multiple_records"] == int((table.patient_id.value_counts() > 1).sum())


def test_rerun_replaces_the_store_and_an_interrupted_run_keeps_the_old_one(ptbxl_root, tmp_path):
    out = tmp_path / "s"
    first = prepare_store("ptbxl", ptbxl_root, out, rate=100)
    before = np.asarray(SiteStore(out).signals).copy()
    again = prepare_store("ptbxl", ptbxl_root, out, rate=100)
    assert again["records_kept"] == first["records_kept"]
    np.testing.assert_array_equal(np.asarray(SiteStore(out).signals), before)

    def interrupt(_):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a 500 Hz run rejects missing files: interrupt at the first one
        prepare_store("ptbxl", ptbxl_root, out, rate=500, on_reject=interrupt)
    np.testing.assert_array_equal(np.asarray(SiteStore(out).signals), before)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no staging folder left behind


def test_opening_something_that_is_not_a_store_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a site store"):
        SiteStore(tmp_path)


def test_two_workers_write_the_same_store_as_one(ptbxl_root, ptbxl_store, tmp_path):
    prepare_store("ptbxl", ptbxl_root, tmp_path / "one", rate=100, workers=1)
    one, two = SiteStore(tmp_path / "one"), SiteStore(ptbxl_store)
    np.testing.assert_array_equal(two.read(np.arange(len(two))[::-1]), np.asarray(one.signals)[::-1])
    pd.testing.assert_frame_equal(one.records, two.records)
    np.testing.assert_array_equal(np.asarray(one.signals), np.asarray(two.signals))


def test_parallel_prepare_keeps_a_bounded_number_of_records_in_flight(ptbxl_root):
    """A site of 100,000 records must not be queued (and its finished signals held) all at once."""
    tasks, _ = readers.scan("ptbxl", ptbxl_root, rate=100)
    taken = []

    def counted():
        for task in tasks:
            taken.append(task)
            yield task

    results = prepare._run(counted(), PreprocessConfig(), workers=2)
    next(results)
    assert len(taken) <= prepare.IN_FLIGHT_PER_WORKER * 2 < len(tasks)
    assert sum(1 for _ in results) == len(tasks) - 1  # and every record still comes out, once
    results.close()


def test_reading_rows_gives_them_in_the_order_asked_and_names_a_truncated_file(ptbxl_store, tmp_path):
    shutil.copytree(ptbxl_store, tmp_path / "s")
    store = SiteStore(tmp_path / "s")
    rows = np.array([399, 3, 3, 0, 250])
    np.testing.assert_array_equal(store.read(rows), np.asarray(store.signals[rows]))
    assert store.read(np.array([], dtype=int)).shape == (0, 12, 1024)
    path = tmp_path / "s" / "signals.npy"
    with open(path, "r+b") as f:  # cut the last record short, under an already opened store
        f.truncate(path.stat().st_size - 100)
    np.testing.assert_array_equal(store.read(np.array([3, 0])), np.asarray(store.signals[[3, 0]]))  # whole rows still read
    with pytest.raises(UserError, match=r"signals.npy: row 399 .*truncated"):
        store.read(rows)


def test_reading_ahead_gives_the_batch_asked_for_whatever_was_announced(ptbxl_store, tmp_path):
    """Training reads its next batches in reader threads while it computes: every read is store.read of the rows
    asked for, whether they were announced (read ahead), announced differently (a wrong guess) or never; and a
    truncated file's error reaches the caller."""
    from ecgtwin.data.store import ReadAhead

    store = SiteStore(ptbxl_store)
    rng = np.random.default_rng(0)
    batches = [rng.choice(len(store), size=9, replace=False) for _ in range(12)]
    reader = ReadAhead(store, workers=3, ahead=4)
    for k, rows in enumerate(batches):
        guess = batches[k + 1:k + 5] if k % 3 else [batches[(k + 7) % 12][::-1]]  # right, then a wrong guess
        np.testing.assert_array_equal(reader.read(rows, guess), np.asarray(store.signals[rows]))
        assert reader.in_flight() == len(guess)  # what is in flight is what was announced, no more
    reader.close()
    assert reader.in_flight() == 0
    shutil.copytree(ptbxl_store, tmp_path / "s")
    opened = ReadAhead(SiteStore(tmp_path / "s"))
    with open(tmp_path / "s" / "signals.npy", "r+b") as f:  # cut the last record short under the open store
        f.truncate((tmp_path / "s" / "signals.npy").stat().st_size - 100)
    opened.read(np.array([0]), [np.array([1, 399])])
    with pytest.raises(UserError, match=r"signals.npy: row 399 .*truncated"):
        opened.read(np.array([1, 399]))


def test_merged_stores_keep_every_record_and_two_databases_patients_apart(ptbxl_store, challenge_root, tmp_path):
    """A public corpus of two databases as one store: each part's rows and signals unchanged, ids named
    after the part (so the same patient id in two parts is two patients), one representation or a refusal."""
    from ecgtwin.data.store import merge_stores

    challenge = SiteStore(prepare_store("challenge", challenge_root, tmp_path / "c")["store"])
    ptbxl = SiteStore(ptbxl_store)
    merged = merge_stores({"ptbxl": ptbxl, "again": ptbxl, "challenge": challenge}, tmp_path / "m")
    assert len(merged) == 2 * len(ptbxl) + len(challenge)
    assert len(merged.patients) == 2 * len(ptbxl.patients) + len(challenge.patients)
    for name, part in (("ptbxl", ptbxl), ("again", ptbxl), ("challenge", challenge)):
        for patient in part.patients[:5]:
            rows, mine = part.records_of(patient), merged.records_of(f"{name}/{patient}")
            np.testing.assert_array_equal(merged.read(mine), part.read(rows))
            assert list(merged.records.iloc[mine].report) == list(part.records.iloc[rows].report)
    assert merged.manifest["summary"]["parts"] == {"ptbxl": 400, "again": 400, "challenge": len(challenge)}
    other = prepare_store("challenge", challenge_root, tmp_path / "c2", PreprocessConfig(n_samples=512))["store"]
    with pytest.raises(UserError, match="c2: signals of .* one representation"):
        merge_stores({"ptbxl": ptbxl, "short": SiteStore(other)}, tmp_path / "m2")
    assert not (tmp_path / "m2").exists()
