"""The `ecgtwin` command as a user runs it (subprocess, installed entry point semantics)."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import scipy.io


def ecgtwin(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ecgtwin.cli", *args], capture_output=True, text=True, check=check)


def test_help_explains_every_subcommand_and_option():
    top = ecgtwin("--help").stdout
    for command in ("synth", "prepare", "demo"):
        assert command in top
    prepare = ecgtwin("prepare", "--help").stdout
    for option in ("--source", "--root", "--out", "--json", "--rate", "--window", "--workers", "--no-baseline-removal"):
        assert option in prepare
    assert "mimic-iv-ecg" in prepare and "challenge" in prepare


def test_prepare_ptbxl_json_reports_records_and_patients_with_several_ecgs(ptbxl_root, tmp_path):
    done = ecgtwin("prepare", "--source", "ptbxl", "--root", str(ptbxl_root), "--out", str(tmp_path / "s"),
                   "--rate", "100", "--json", "--no-progress")
    summary = json.loads(done.stdout)
    table = pd.read_csv(ptbxl_root / "ptbxl_database.csv")
    counts = table.patient_id.value_counts()
    assert summary["records_read"] == 400 and summary["records_kept"] == 400
    assert summary["patients"] == len(counts)
    assert summary["patients_with_multiple_records"] == int((counts > 1).sum())
    for key in ("records_read", "records_kept", "rejected", "patients", "patients_with_multiple_records"):
        assert key in summary


def test_prepare_ptbxl_500hz_counts_missing_files(ptbxl_root, tmp_path):
    done = ecgtwin("prepare", "--source", "ptbxl", "--root", str(ptbxl_root), "--out", str(tmp_path / "s"),
                   "--rate", "500", "--json", "--no-progress", "--quiet-rejects")
    summary = json.loads(done.stdout)
    assert summary["records_read"] == 400 and summary["records_kept"] == 53
    assert summary["rejected"] == {"missing_file": 347}


def test_prepare_challenge_reads_all_50_and_names_the_zero_leads(challenge_root, tmp_path):
    done = ecgtwin("prepare", "--source", "challenge", "--root", str(challenge_root), "--out", str(tmp_path / "s"),
                   "--json", "--no-progress")
    summary = json.loads(done.stdout)
    assert summary["records_read"] == 50
    # Some real records carry an all-zero lead (read independently from the .mat files here):
    # each is rejected as missing_lead and named on stderr.
    zero_lead = sorted(p.stem for p in challenge_root.glob("*.mat")
                       if (~scipy.io.loadmat(p)["val"].any(axis=1)).any())
    assert zero_lead == ["JS20004", "JS20008"]
    assert summary["rejected"] == {"missing_lead": len(zero_lead)} and summary["records_kept"] == 50 - len(zero_lead)
    named = sorted(l.split("/")[-1].split(":")[0] for l in done.stderr.splitlines() if l.startswith("rejected"))
    assert named == zero_lead


def test_prepare_ptbdb_folder_windows_one_patient(ptbdb_root, tmp_path):
    summary = json.loads(ecgtwin("prepare", "--source", "wfdb", "--root", str(ptbdb_root), "--out",
                                 str(tmp_path / "s"), "--json", "--no-progress").stdout)
    assert summary["records_read"] == 3 and summary["segments_kept"] == 3 + 11 + 11
    assert summary["patients"] == 1 and summary["patients_with_multiple_records"] == 1


def test_user_errors_are_one_line_without_traceback(tmp_path):
    done = ecgtwin("prepare", "--source", "ptbxl", "--root", str(tmp_path / "missing"), "--out", str(tmp_path / "s"),
                   check=False)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "does not exist" in done.stderr
    done = ecgtwin("prepare", "--source", "edf", "--root", ".", "--out", "x", check=False)
    assert done.returncode == 2 and "invalid choice" in done.stderr


def test_user_errors_are_one_line_and_debug_shows_their_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("vae:\n  lr: -1\n")
    args = ["train", "--config", str(bad), "--stage", "vae", "--store", str(tmp_path), "--out", str(tmp_path / "c")]
    done = ecgtwin(*args, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [f"ecgtwin train: error: {bad}: vae.lr: must be > 0, got -1.0"]
    debug = ecgtwin("--debug", *args, check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_a_bug_keeps_its_traceback(monkeypatch):
    """An exception that is not a UserError (here a plain ValueError from inside a command) is not
    disguised as a user error: it propagates with its traceback."""
    import pytest

    from ecgtwin import cli

    def broken(args):
        raise ValueError("internal invariant violated")

    parser = cli.build_parser()
    real = parser.parse_args

    def parse(argv):
        args = real(argv)
        args.run = broken
        return args

    monkeypatch.setattr(parser, "parse_args", parse)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    with pytest.raises(ValueError, match="internal invariant violated"):
        cli.main(["synth", "--out", "x"])
