"""Damaged copies of real records: each gets a one-line error naming the file, the rest goes on,
and the summary counts every rejection by reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import wfdb

from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.record import LEADS
from ecgtwin.data.store import SiteStore
from ecgtwin.data.wfdb_io import read_wfdb

REAL = "records500/00000/00012_hr"  # a real PTB-XL 500 Hz record


def copy_record(src: Path, dst_dir: Path, name: str) -> Path:
    """Copy a WFDB record under a new name (header lines renamed accordingly)."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    lines = src.with_suffix(".hea").read_text().splitlines()
    lines = [line.replace(src.name, name) for line in lines]
    (dst_dir / f"{name}.hea").write_text("\n".join(lines) + "\n")
    for data in src.parent.glob(f"{src.name}.*"):
        if data.suffix != ".hea":
            shutil.copy(data, dst_dir / f"{name}{data.suffix}")
    return dst_dir / name


def write_variant(dst_dir: Path, name: str, signal: np.ndarray, fs: float = 500.0, leads=LEADS) -> None:
    wfdb.wrsamp(name, fs=fs, units=["mV"] * len(leads), sig_name=list(leads), p_signal=signal.T,
                fmt=["16"] * len(leads), adc_gain=[1000.0] * len(leads), baseline=[0] * len(leads),
                write_dir=str(dst_dir))


@pytest.fixture()
def damaged_folder(ptbxl_root: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Two intact records and one damaged copy per failure mode; returns folder and name -> expected reason."""
    src = ptbxl_root / REAL
    folder = tmp_path / "site"
    real = read_wfdb(src).signal.astype(np.float64)  # (12, 5000) mV, canonical order in PTB-XL
    copy_record(src, folder, "intact_1")
    copy_record(ptbxl_root / "records500/00000/00017_hr", folder, "intact_2")
    expected = {}

    rec = copy_record(src, folder, "truncated")
    data = rec.with_suffix(".dat").read_bytes()
    rec.with_suffix(".dat").write_bytes(data[: len(data) // 3])
    expected["truncated"] = "corrupt_file"

    rec = copy_record(src, folder, "bad_header")
    lines = rec.with_suffix(".hea").read_text().splitlines()
    rec.with_suffix(".hea").write_text("\n".join(["bad_header twelve 500 5000", *lines[1:]]) + "\n")
    expected["bad_header"] = "bad_header"

    rec = copy_record(src, folder, "empty_header")
    rec.with_suffix(".hea").write_text("")
    expected["empty_header"] = "bad_header"

    rec = copy_record(src, folder, "no_data")
    rec.with_suffix(".dat").unlink()
    expected["no_data"] = "missing_file"

    eight = [0, 1, 6, 7, 8, 9, 10, 11]  # an 8-lead device: I, II, V1-V6
    write_variant(folder, "eight_leads", real[eight], leads=[LEADS[i] for i in eight])
    expected["eight_leads"] = "wrong_lead_count"

    write_variant(folder, "unknown_lead", real, leads=[*LEADS[:11], "X6"])
    expected["unknown_lead"] = "unmapped_leads"

    flat = real.copy(); flat[8] = 0.2
    write_variant(folder, "flat_v3", flat)
    expected["flat_v3"] = "flat_lead"

    zero = real.copy(); zero[7] = 0.0
    write_variant(folder, "zero_v2", zero)
    expected["zero_v2"] = "missing_lead"

    gap = real.copy(); gap[1, 1000:2000] = np.nan  # 20% of lead II lost
    write_variant(folder, "nan_gap", gap)
    expected["nan_gap"] = "nan_fraction"

    clipped = real.copy(); clipped[6] = np.clip(clipped[6], -0.05, 0.05)
    write_variant(folder, "clipped_v1", clipped)
    expected["clipped_v1"] = "saturation"

    write_variant(folder, "five_seconds", real[:, :2500])
    expected["five_seconds"] = "wrong_duration"
    return folder, expected


def test_prepare_rejects_each_damage_with_its_reason_and_keeps_the_rest(damaged_folder, tmp_path):
    folder, expected = damaged_folder
    lines: list[str] = []
    summary = prepare_store("wfdb", folder, tmp_path / "store", on_reject=lambda r: lines.append(r.line()))
    assert summary["records_read"] == len(expected) + 2
    assert summary["records_kept"] == 2 and summary["segments_kept"] == 2
    counts: dict[str, int] = {}
    for reason in expected.values():
        counts[reason] = counts.get(reason, 0) + 1
    assert summary["rejected"] == counts
    # one line per rejection, naming the file and the reason
    assert len(lines) == len(expected) and all("\n" not in line for line in lines)
    for name, reason in expected.items():
        assert any(f"{name}: {reason}:" in line for line in lines), (name, reason, lines)
    store = SiteStore(tmp_path / "store")
    assert sorted(Path(s).name for s in store.records.source) == ["intact_1", "intact_2"]
    rejected = store.rejected()
    assert sorted(Path(s).name for s in rejected.source) == sorted(expected)


def test_small_nan_gaps_are_interpolated_not_rejected(ptbxl_root, tmp_path):
    real = read_wfdb(ptbxl_root / REAL).signal.astype(np.float64)
    gap = real.copy(); gap[1, 1000:1050] = np.nan  # 1% of one lead
    (tmp_path / "site").mkdir()
    write_variant(tmp_path / "site", "small_gap", gap)
    assert np.isnan(read_wfdb(tmp_path / "site" / "small_gap").signal).any()  # WFDB really stored the gap
    summary = prepare_store("wfdb", tmp_path / "site", tmp_path / "store")
    assert summary["records_kept"] == 1 and summary["rejected"] == {}
    assert np.isfinite(np.asarray(SiteStore(tmp_path / "store").signals)).all()


def test_challenge_truncated_mat_is_rejected_and_the_rest_kept(challenge_root, tmp_path):
    site = tmp_path / "challenge"
    for name in ("E07500", "E07501", "HR06001"):
        copy_record(challenge_root / name, site, name)
    mat = site / "E07501.mat"
    mat.write_bytes(mat.read_bytes()[:4000])
    summary = prepare_store("challenge", site, tmp_path / "store", on_reject=lambda r: None)
    assert summary["records_read"] == 3 and summary["records_kept"] == 2
    assert summary["rejected"] == {"corrupt_file": 1}
    assert "E07501" in SiteStore(tmp_path / "store").rejected().source[0]


def test_ptbxl_bad_metadata_row_is_counted_and_the_rest_goes_on(ptbxl_root, tmp_path):
    root = tmp_path / "ptbxl"
    root.mkdir()
    (root / "records100").symlink_to(ptbxl_root / "records100")
    shutil.copy(ptbxl_root / "scp_statements.csv", root)
    table = pd.read_csv(ptbxl_root / "ptbxl_database.csv", dtype=str, keep_default_na=False).head(20)
    table.loc[3, "scp_codes"] = "{'NORM': 100.0"  # cut off mid-way
    table.to_csv(root / "ptbxl_database.csv", index=False)
    summary = prepare_store("ptbxl", root, tmp_path / "store", rate=100, on_reject=lambda r: None)
    assert summary["records_read"] == 20 and summary["records_kept"] == 19
    assert summary["rejected"] == {"bad_metadata": 1}
    assert "ecg_id=4" in SiteStore(tmp_path / "store").rejected().source[0]


def test_cli_prints_one_line_per_rejection_on_stderr_and_json_on_stdout(damaged_folder, tmp_path):
    folder, expected = damaged_folder
    done = subprocess.run(
        [sys.executable, "-m", "ecgtwin.cli", "prepare", "--source", "wfdb", "--root", str(folder),
         "--out", str(tmp_path / "store"), "--json", "--no-progress", "--workers", "2"],
        capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    assert summary["rejected_total"] == len(expected) and summary["records_kept"] == 2
    reject_lines = [line for line in done.stderr.splitlines() if line.startswith("rejected ")]
    assert len(reject_lines) == len(expected)
    assert all(str(folder) in line for line in reject_lines)
