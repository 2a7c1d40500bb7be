"""Each reader on real PhysioNet files (or, for MIMIC-IV-ECG, a tree written in its exact layout)."""

from __future__ import annotations

import ast

import numpy as np
import pandas as pd
import pytest
import scipy.io
import wfdb

from ecgtwin.data.readers import scan
from ecgtwin.data.record import LEADS, Record, Rejected
from ecgtwin.data.wfdb_io import write_wfdb


def read_all(source, root, **options):
    tasks, rejected = scan(source, root, **options)
    items = rejected + [item for task in tasks for item in task()]
    return [i for i in items if isinstance(i, Record)], [i for i in items if isinstance(i, Rejected)]


def test_ptbxl_100hz_reads_all_records_with_metadata(ptbxl_root):
    records, rejected = read_all("ptbxl", ptbxl_root, rate=100)
    table = pd.read_csv(ptbxl_root / "ptbxl_database.csv")
    assert len(records) == len(table) == 400 and not rejected
    first = next(r for r in records if r.record_id == "ptbxl-1")
    row = table[table.ecg_id == 1].iloc[0]
    assert first.patient_id == str(int(row.patient_id))
    assert first.labels == ast.literal_eval(row.scp_codes)  # SCP codes with likelihoods
    assert first.report == row.report.strip() and first.fold == row.strat_fold
    assert first.sex == "F" and first.age == 56 and first.recording_time.year == 1984
    assert "sinus rhythm" in first.extra["report_en"]
    assert first.signal.shape == (12, 1000) and first.fs == 100
    # The signal is the file's, in mV, in canonical order (the file spells AVR/AVL/AVF).
    raw = wfdb.rdrecord(str(ptbxl_root / row.filename_lr))
    names = [n.lower() for n in raw.sig_name]
    for i, lead in enumerate(LEADS):
        np.testing.assert_allclose(first.signal[i], raw.p_signal[:, names.index(lead.lower())], atol=1e-6)


def test_ptbxl_missing_500hz_files_are_clear_per_record_errors(ptbxl_root):
    records, rejected = read_all("ptbxl", ptbxl_root, rate=500)
    on_disk = len(list((ptbxl_root / "records500").rglob("*.hea")))
    assert len(records) == on_disk == 53
    assert len(rejected) == 400 - 53
    assert all(r.reason == "missing_file" and "_hr.hea" in r.message and "does not exist" in r.message for r in rejected)
    assert all(r.fs == 500 and r.signal.shape == (12, 5000) for r in records)


def test_challenge_reads_dx_age_sex_and_source_database(challenge_root):
    records, rejected = read_all("challenge", challenge_root)
    assert len(records) + len(rejected) == 50 and not rejected
    rec = next(r for r in records if r.record_id == "challenge-E07500")
    assert rec.age == 78 and rec.sex == "M" and rec.site == "Georgia"
    assert set(rec.labels) == {"67741000119109", "426177001"}
    assert "sinus bradycardia" in rec.report.lower()
    mat = scipy.io.loadmat(challenge_root / "E07500.mat")["val"]
    np.testing.assert_allclose(rec.signal, mat / 1000.0, atol=1e-6)  # 1000 adu/mV, already canonical order
    assert {r.site for r in records} == {"PTB-XL", "Georgia", "Chapman-Ningbo"}


def test_wfdb_folder_cuts_long_ptb_records_into_windows(ptbdb_root):
    records, rejected = read_all("wfdb", ptbdb_root, window_s=10.0)
    assert not rejected
    lengths = {h.stem: wfdb.rdheader(str(h.with_suffix(""))).sig_len for h in ptbdb_root.rglob("*.hea")}
    assert len(records) == sum(n // 10_000 for n in lengths.values())  # 1 kHz, 10 s windows
    assert {r.patient_id for r in records} == {"patient001"}
    assert all(r.signal.shape == (12, 10_000) for r in records)  # the Frank leads vx, vy, vz are dropped
    first = min(records, key=lambda r: r.recording_time)
    assert first.recording_time.strftime("%Y-%m-%d") == "1990-10-01" and first.sex == "F" and first.age == 81
    raw = wfdb.rdrecord(str(ptbdb_root / "patient001" / "s0010_re"), sampto=10_000)
    np.testing.assert_allclose(first.signal[3], raw.p_signal[:, raw.sig_name.index("avr")], atol=1e-6)


MIMIC_ORDER = ["I", "II", "III", "aVR", "aVF", "aVL", "V1", "V2", "V3", "V4", "V5", "V6"]  # as MIMIC-IV-ECG stores them


def write_mimic_tree(root, rng):
    """A small tree in MIMIC-IV-ECG's exact layout: files/pXXXX/pSUBJECT/sSTUDY/STUDY.{hea,dat}."""
    rows, measurements, signals = [], [], {}
    for subject, studies in {"10000032": ["40689238", "44458630"], "10000117": ["45090959"]}.items():
        for k, study in enumerate(studies):
            rel = f"files/p{subject[:4]}/p{subject}/s{study}"
            signal = rng.normal(0, 0.3, size=(12, 5000)).astype(np.float32)
            write_wfdb(root / rel, study, signal, 500, leads=tuple(MIMIC_ORDER))
            signals[study] = signal
            rows.append({"subject_id": subject, "study_id": study, "file_name": study,
                         "ecg_time": f"2180-07-2{k} 08:0{k}:00", "path": f"{rel}/{study}"})
            m = {"subject_id": subject, "study_id": study, "cart_id": "6848296", "ecg_time": rows[-1]["ecg_time"],
                 **{f"report_{i}": "" for i in range(18)}, "rr_interval": "750", "qrs_axis": "60"}
            m["report_0"], m["report_1"] = "Sinus rhythm", "Borderline T wave abnormalities"
            measurements.append(m)
    pd.DataFrame(rows).to_csv(root / "record_list.csv", index=False)
    pd.DataFrame(measurements).to_csv(root / "machine_measurements.csv", index=False)
    return signals


def test_mimic_iv_ecg_layout_round_trip(tmp_path):
    signals = write_mimic_tree(tmp_path, np.random.default_rng(0))
    records, rejected = read_all("mimic-iv-ecg", tmp_path)
    assert not rejected and len(records) == 3
    by_study = {r.extra["study_id"]: r for r in records}
    rec = by_study["40689238"]
    assert rec.patient_id == "10000032" and rec.report == "Sinus rhythm. Borderline T wave abnormalities"
    assert rec.hr == pytest.approx(80.0)  # 60000 / rr_interval 750 ms
    # aVL and aVF are swapped in MIMIC's storage order; the reader puts them back.
    written = signals["40689238"]
    np.testing.assert_allclose(rec.signal[LEADS.index("aVL")], written[MIMIC_ORDER.index("aVL")], atol=1e-3)
    np.testing.assert_allclose(rec.signal[LEADS.index("aVF")], written[MIMIC_ORDER.index("aVF")], atol=1e-3)


def test_mimic_record_list_pointing_at_a_missing_file(tmp_path):
    write_mimic_tree(tmp_path, np.random.default_rng(1))
    table = pd.read_csv(tmp_path / "record_list.csv", dtype=str)
    table.loc[len(table)] = ["10000117", "49999999", "49999999", "2180-08-01 00:00:00", "files/p1000/p10000117/s49999999/49999999"]
    table.to_csv(tmp_path / "record_list.csv", index=False)
    records, rejected = read_all("mimic-iv-ecg", tmp_path)
    assert len(records) == 3 and len(rejected) == 1
    assert rejected[0].reason == "missing_file" and "49999999" in rejected[0].source


def test_unknown_source_and_missing_root_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown source"):
        scan("edf", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        scan("ptbxl", tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="ptbxl_database.csv missing"):
        scan("ptbxl", tmp_path)
