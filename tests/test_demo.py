"""The embedded default end to end, shortened: every part runs (synthesis, stores, site policies, DP
fine-tuning of the shipped public foundation in Flower's simulation engine, twins) and the report says what it
did; the twins keep the person; the shipped foundation is the one its card describes."""

import hashlib
import itertools
import json
from pathlib import Path

import numpy as np
import wfdb
from scipy.signal import find_peaks

from ecgtwin.config import load_config, save_config, to_dict
from ecgtwin.data.record import LEADS
from ecgtwin.demo import DEFAULT_CONFIG, DEFAULT_FOUNDATION, FOUNDATION_COMMAND, TARGETS, DemoConfig, run_demo


def test_demo_runs_end_to_end_and_writes_its_report(tmp_path):
    config = load_config(DEFAULT_CONFIG)
    save_config(config, tmp_path / "short.yaml")
    demo = DemoConfig(sites=2, patients_per_site=6, records_per_patient=2, config=tmp_path / "short.yaml",
                      twin_patients=3, twins_per_condition=2, rounds=(0, 1, 1), local_steps=(1, 1, 2),
                      batch_patients=2)
    report = run_demo(tmp_path / "out", demo, progress=False)
    assert sorted(report["stores"]) == ["site_a", "site_b"]
    assert all(s["records_kept"] == 12 and s["patients_with_multiple_records"] == 6 for s in report["stores"].values())
    history = report["federation"]["history"]  # the VAE is the foundation's, frozen: never sent back
    assert [(e["stage"], e["round"], sorted(e["sites"])) for e in history] == \
        [(s, 1, ["site_a", "site_b"]) for s in ("ibe", "twin")]
    for site, privacy in report["privacy"].items():  # each site's ledger: one DP pass per fine-tuned stage
        assert privacy["passes"] == 2 and 0 < privacy["epsilon_spent"] <= privacy["epsilon_budget"] * (1 + 1e-6)
        assert privacy["epsilon_spent"] == history[-1]["sites"][site]["epsilon"]
        assert set(privacy["noise_multiplier"]) == {"ibe", "twin"}
    frozen = (DEFAULT_FOUNDATION / "vae.safetensors").read_bytes()
    from safetensors.numpy import load as load_bytes
    final = load_bytes((tmp_path / "out" / "federation" / "model" / "vae.safetensors").read_bytes())
    assert all(np.array_equal(v, final[k]) for k, v in load_bytes(frozen).items())
    assert len(report["twins"]) == 3 * len(TARGETS) * 2  # patients x target conditions x twins
    assert json.loads((tmp_path / "out/report.json").read_text())["twin_hr_mae_bpm"] == report["twin_hr_mae_bpm"]
    markdown = (tmp_path / "out/report.md").read_text()
    assert "| site_a | 12 / 12 |" in markdown and "public foundation" in markdown
    assert "| site_a | " in markdown.split("## Privacy spent")[1]
    plot = next(l for l in markdown.splitlines() if l.startswith("Loss and epsilon per site")).split(": ")[1]
    assert (tmp_path / "out" / plot).is_file()  # linked relative to the report
    for image in ("figures/twin_heart_rate.png", "figures/twin_median_beats.png"):
        assert f"]({image})" in markdown and (tmp_path / "out" / image).stat().st_size > 10_000
    figures = [Path(f) for f in report["figures"]]
    assert len(figures) == 2 + 3 * len(TARGETS) + 3 and all(f.stat().st_size > 10_000 for f in figures)
    twins_differ_by_person(tmp_path / "out" / "twins", report)


def median_beat_ii_v2(path: Path) -> np.ndarray:
    """An independent median beat: scipy's peak finder on lead II, leads II and V2 cut around the peaks."""
    record = wfdb.rdrecord(str(path))
    fs, x = record.fs, record.p_signal.T
    ii = x[LEADS.index("II")] - np.median(x[LEADS.index("II")])
    peaks, _ = find_peaks(np.abs(ii), distance=int(0.3 * fs), height=0.5 * np.percentile(np.abs(ii), 99))
    lo, hi = int(0.25 * fs), int(0.45 * fs)
    peaks = peaks[(peaks >= lo) & (peaks + hi <= x.shape[1])]
    assert len(peaks) >= 3, f"{path}: fewer than 3 beats"
    return np.median([x[[LEADS.index("II"), LEADS.index("V2")], p - lo:p + hi] for p in peaks], axis=0)


def twins_differ_by_person(twins: Path, report: dict) -> None:
    """Twins of two patients under one condition differ by more than two twins of one patient (two noise
    draws), over the demo's conditions and patients; the demo's own measure says the same."""
    patients = sorted({t["patient_id"] for t in report["twins"]})
    rms = lambda a, b: float(np.sqrt(np.mean((a - b) ** 2)))  # noqa: E731
    within, between = [], []
    for k in range(len(TARGETS)):
        beats = {p: [median_beat_ii_v2(twins / p / f"condition{k}_{i:03d}") for i in range(2)] for p in patients}
        within += [rms(*beats[p]) for p in patients]
        between += [rms(a, b) for p, q in itertools.combinations(patients, 2) for a in beats[p] for b in beats[q]]
    assert np.mean(between) > np.mean(within), (within, between)
    assert report["personal"]["ratio"] > 1


def test_the_shipped_foundation_is_the_one_its_card_describes():
    """foundations/demo: the hashes in its card are its files', its model is the demo's, and the card's
    command is the one the demo documents (the test suite runs that command's short form in
    test_federation's foundation fixture)."""
    card = json.loads((DEFAULT_FOUNDATION / "card.json").read_text())
    for name, digest in card["sha256"].items():
        assert hashlib.sha256((DEFAULT_FOUNDATION / name).read_bytes()).hexdigest() == digest, name
    foundation = load_config(DEFAULT_FOUNDATION / "config.yaml")
    assert to_dict(foundation.model) == to_dict(load_config(DEFAULT_CONFIG).model)
    assert card["source"] == "synthetic" and card["command"] == FOUNDATION_COMMAND
    assert (DEFAULT_FOUNDATION / "card.md").read_text().count(FOUNDATION_COMMAND) == 1
