"""Bad input never trains a broken model: each refusal is one line naming the file (or folder) and the
reason, raised as a UserError so that the command line prints it and exits with status 1.

A tiny synthetic site (6 patients x 2 records, 256 samples per record, a tiny model) and real PTB-XL,
PTB and Challenge files from ../shared/data.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

from ecgtwin.cli import main
from ecgtwin.config import load_config, save_config
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.preprocess import PreprocessConfig
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.errors import UserError
from ecgtwin.train.centralised import train_stage

ROOT = Path(__file__).resolve().parents[1]
N_SAMPLES = 256
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_config(steps: int = 2):
    """The demo config shrunk to 256 samples and a tiny model (as in test_federation), every record in
    every VAE batch (so a damaged record is always seen) and a checkpoint every 2 steps."""
    config = load_config(ROOT / "configs" / "demo.yaml")
    config.data.n_samples, config.data.held_out_fraction = N_SAMPLES, 0.0
    config.model.vae.base_channels = 8
    for model in (config.model.ibe, config.model.dit):
        model.n_tokens, model.width, model.depth, model.heads, model.base_dim = N_SAMPLES // 8, 48, 1, 2, 32
    config.vae.steps, config.vae.batch_size, config.vae.checkpoint_every, config.vae.log_every = steps, 64, 2, 1
    return config


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_input")
    synthesize_consortium(root / "raw", sites=1, patients_per_site=6, records_per_patient=2, seed=3)
    raw = next(p for p in (root / "raw").iterdir() if p.is_dir())
    prepare_store("synthetic", raw, root / "store", config=PreprocessConfig(n_samples=N_SAMPLES),
                  on_reject=lambda r: None)
    return {"raw": raw, "store": root / "store"}


@pytest.fixture
def store(site, tmp_path) -> Path:
    """A fresh copy of the site's store, free to damage."""
    return Path(shutil.copytree(site["store"], tmp_path / "store"))


def cli(*args) -> tuple[int, str]:
    """The command line in-process: exit status and stderr."""
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, err.getvalue()


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    lines = [l for l in err.strip().splitlines() if not l.startswith("rejected ")]  # prepare lists rejections
    assert code == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert all(n in lines[0] for n in needles), (needles, lines[0])


def write_config(config, path: Path) -> Path:
    save_config(config, path)
    return path


def finite_weights(checkpoint: Path) -> bool:
    return all(np.isfinite(v).all() for v in load_file(str(checkpoint / "vae.safetensors")).values())


# 1. a non-finite loss or weights stop `ecgtwin train`; the last good checkpoint stays as it was

def put_nan(store: Path, row: int = 3) -> None:
    signals = np.load(store / "signals.npy", mmap_mode="r+")
    signals[row, 0, 10] = np.nan
    signals.flush()


def test_nan_in_a_record_stops_training_and_keeps_the_last_good_checkpoint(store, tmp_path):
    ckpt = tmp_path / "ckpt"
    train_stage("vae", tiny_config(steps=2), store, ckpt, progress=False)  # a good checkpoint at step 2
    before = (ckpt / "vae.safetensors").read_bytes()
    put_nan(store)
    with pytest.raises(UserError, match=r"train vae: step 3: the loss is nan") as error:
        train_stage("vae", tiny_config(steps=6), store, ckpt, progress=False)
    assert "\n" not in str(error.value) and "checkpoint of step 2" in str(error.value)
    assert (ckpt / "vae.safetensors").read_bytes() == before and finite_weights(ckpt)
    # the command line: one line, exit 1; a fresh folder gets no weights at all
    config = write_config(tiny_config(steps=4), tmp_path / "tiny.yaml")
    code, err = cli("train", "--config", config, "--stage", "vae", "--store", store, "--out", tmp_path / "fresh",
                    "--no-progress")
    assert_one_line_error(code, err, "ecgtwin train: error: train vae: step 1: the loss is nan")
    assert not (tmp_path / "fresh" / "vae.safetensors").exists()
    # the failed runs released the folder's lock: a rerun meets the same NaN, not a busy folder
    code, err = cli("train", "--config", config, "--stage", "vae", "--store", store, "--out", ckpt, "--no-progress")
    assert_one_line_error(code, err, "step 3: the loss is nan")


def test_weights_that_turn_non_finite_stop_training_before_they_are_saved(store, tmp_path):
    config = tiny_config(steps=2)
    config.vae.lr = float("inf")  # the loss of step 1 is finite, the weights after its update are not
    with pytest.raises(UserError, match=r"train vae: step 1: the weights are not finite"):
        train_stage("vae", config, store, tmp_path / "ckpt", progress=False)
    assert not (tmp_path / "ckpt" / "vae.safetensors").exists()


# 2. stores are validated when they are opened

def rewrite_records(store: Path, **columns) -> None:
    records = pd.read_csv(store / "records.csv", dtype=str, keep_default_na=False)
    for name, value in columns.items():
        records[name] = value
    records.to_csv(store / "records.csv", index=False)


def test_a_blank_patient_id_column_is_refused_not_counted_as_one_patient(store):
    rewrite_records(store, patient_id="")
    with pytest.raises(UserError, match=r"records.csv: 12 of 12 records have no patient_id"):
        SiteStore(store)


def test_one_patient_id_for_records_of_both_sexes_is_refused(site, store, tmp_path):
    assert set(SiteStore(store).records.sex) == {"F", "M"}, "the site must have both sexes for this test"
    rewrite_records(store, patient_id="1")
    with pytest.raises(UserError, match=r"records.csv: every record has patient_id '1'.*not a patient id"):
        SiteStore(store)
    raw = Path(shutil.copytree(site["raw"], tmp_path / "raw"))  # `prepare` refuses to write such a store
    table = pd.read_csv(raw / "metadata.csv", dtype=str, keep_default_na=False)
    table.assign(patient_id="1").to_csv(raw / "metadata.csv", index=False)
    with pytest.raises(UserError, match=r"not a patient id"):
        prepare_store("synthetic", raw, tmp_path / "out" / "store", config=PreprocessConfig(n_samples=N_SAMPLES))
    assert list((tmp_path / "out").iterdir()) == []


def test_stores_of_one_patient_or_of_record_ids_still_open(ptbdb_root, challenge_root, tmp_path):
    """A real one-patient folder (PTB patient001, long records in windows) and Challenge records (each
    its own patient) are what they look like, not damage."""
    prepare_store("wfdb", ptbdb_root, tmp_path / "ptbdb", on_reject=lambda r: None)
    ptbdb = SiteStore(tmp_path / "ptbdb")
    assert ptbdb.patients == ["patient001"] and len(ptbdb) > 1 and not ptbdb.patient_ids_are_records
    site = tmp_path / "challenge"
    site.mkdir()
    for name in ("E07500", "E07501", "HR06001"):
        for part in challenge_root.glob(f"{name}.*"):
            shutil.copy(part, site)
    prepare_store("challenge", site, tmp_path / "cinc", on_reject=lambda r: None)
    challenge = SiteStore(tmp_path / "cinc")
    assert challenge.patient_ids_are_records and len(challenge.patients) == len(challenge) == 3


def test_metadata_rows_must_match_the_signals(store):
    lines = (store / "records.csv").read_text().splitlines()
    (store / "records.csv").write_text("\n".join(lines[:5]) + "\n")
    with pytest.raises(UserError, match=r"records.csv has 4 rows, signals.npy 12"):
        SiteStore(store)


def test_a_truncated_signals_file_is_one_line_naming_it(store, tmp_path):
    signals = store / "signals.npy"
    signals.write_bytes(signals.read_bytes()[: signals.stat().st_size // 2])
    with pytest.raises(UserError, match=r"signals.npy: unreadable or truncated") as error:
        SiteStore(store)
    assert str(signals) in str(error.value) and "\n" not in str(error.value)
    config = write_config(tiny_config(), tmp_path / "tiny.yaml")
    code, err = cli("train", "--config", config, "--stage", "vae", "--store", store, "--out", tmp_path / "c",
                    "--no-progress")
    assert_one_line_error(code, err, str(signals), "truncated")


# 3. `prepare` with no usable record writes no store

def test_prepare_of_an_empty_folder_writes_no_store(site, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: no wfdb records found"):
        prepare_store("wfdb", tmp_path / "empty", tmp_path / "out" / "store")
    assert list((tmp_path / "out").iterdir()) == []  # no store, no staging folder
    shutil.copytree(site["store"], tmp_path / "old")  # an earlier store stays as it was
    code, err = cli("prepare", "--source", "wfdb", "--root", tmp_path / "empty", "--out", tmp_path / "old",
                    "--no-progress")
    assert_one_line_error(code, err, "ecgtwin prepare: error:", "no wfdb records found")
    assert len(SiteStore(tmp_path / "old")) == 12


def test_prepare_where_every_record_is_rejected_writes_no_store(site, tmp_path):
    """Blank patient ids are bad metadata rows: each is rejected with its reason, and with none left the
    preparation fails instead of writing an empty store."""
    root = tmp_path / "site"
    root.mkdir()
    table = pd.read_csv(site["raw"] / "metadata.csv", dtype=str, keep_default_na=False)
    table["patient_id"] = ""
    table.to_csv(root / "metadata.csv", index=False)
    rejected = []
    with pytest.raises(UserError, match=r"no usable synthetic records, all 12 rejected \(bad_metadata: 12\)"):
        prepare_store("synthetic", root, tmp_path / "out" / "store", on_reject=rejected.append)
    assert len(rejected) == 12 and all("no patient_id" in r.message for r in rejected)
    assert list((tmp_path / "out").iterdir()) == []


# 4. a dataset CSV without a column the reader needs

def ptbxl_copy(ptbxl_root: Path, root: Path, drop: str | None = None, drop_statement: str | None = None) -> Path:
    root.mkdir()
    (root / "records100").symlink_to(ptbxl_root / "records100")
    table = pd.read_csv(ptbxl_root / "ptbxl_database.csv", dtype=str, keep_default_na=False).head(5)
    table.drop(columns=[drop] if drop else []).to_csv(root / "ptbxl_database.csv", index=False)
    statements = pd.read_csv(ptbxl_root / "scp_statements.csv", dtype=str, keep_default_na=False)
    statements.drop(columns=[drop_statement] if drop_statement else []).to_csv(root / "scp_statements.csv", index=False)
    return root


def test_ptbxl_csv_missing_a_column_names_the_file_and_the_column(ptbxl_root, tmp_path):
    root = ptbxl_copy(ptbxl_root, tmp_path / "ptbxl", drop="filename_lr")
    with pytest.raises(UserError, match=r"ptbxl_database.csv: missing column filename_lr$"):
        prepare_store("ptbxl", root, tmp_path / "s", rate=100)
    code, err = cli("prepare", "--source", "ptbxl", "--rate", "100", "--root", root, "--out", tmp_path / "s",
                    "--no-progress")
    assert_one_line_error(code, err, str(root / "ptbxl_database.csv"), "missing column filename_lr")
    assert not (tmp_path / "s").exists()
    root = ptbxl_copy(ptbxl_root, tmp_path / "ptbxl_statements", drop_statement="description")
    with pytest.raises(UserError, match=r"scp_statements.csv: missing column description$"):
        prepare_store("ptbxl", root, tmp_path / "s", rate=100)


# 5. a config that does not fit the store

def test_a_config_that_does_not_fit_the_store_names_the_store_and_the_key(store, tmp_path):
    config = tiny_config()
    config.model.vae.in_channels = 3
    with pytest.raises(UserError, match=r"store holds 12-lead records, the config's model.vae.in_channels is 3"):
        train_stage("vae", config, store, tmp_path / "c", progress=False)
    code, err = cli("train", "--config", write_config(config, tmp_path / "three.yaml"), "--stage", "vae",
                    "--store", store, "--out", tmp_path / "c", "--no-progress")
    assert_one_line_error(code, err, str(store), "model.vae.in_channels")
    config = tiny_config()
    config.model.dit.n_tokens = 64
    with pytest.raises(UserError, match=r"make 32 latent tokens, the config's model.dit.n_tokens is 64"):
        train_stage("vae", config, store, tmp_path / "c", progress=False)


# 6. one training at a time per checkpoint folder

HOLD_LOCK = ("import sys\nfrom ecgtwin.checkpoint import Checkpoint\n"
             "with Checkpoint(sys.argv[1]).lock():\n    print('locked', flush=True)\n    sys.stdin.read()\n")


def test_a_checkpoint_folder_held_by_another_process_is_refused(store, tmp_path):
    ckpt = tmp_path / "ckpt"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(ckpt)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=r"ckpt: another training is writing this checkpoint folder \(pid "
                                            f"{holder.pid} holds"):
            train_stage("vae", tiny_config(), store, ckpt, progress=False)
        code, err = cli("train", "--config", write_config(tiny_config(), tmp_path / "tiny.yaml"), "--stage", "vae",
                        "--store", store, "--out", ckpt, "--no-progress")
        assert_one_line_error(code, err, str(ckpt), "another training")
        assert not (ckpt / "config.yaml").exists()  # refused before it wrote anything
    finally:
        holder.kill()  # a training that dies (here: SIGKILL) frees the folder: the OS drops its flock
        holder.wait()
    assert train_stage("vae", tiny_config(), store, ckpt, progress=False)["steps"] == 2
    assert finite_weights(ckpt)
