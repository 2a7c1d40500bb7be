"""The embedded default end to end, shortened: every part runs (synthesis, stores, site policies, the
federation in Flower's simulation engine, twins) and the report says what it did."""

import json
from pathlib import Path

from ecgtwin.config import load_config, save_config
from ecgtwin.demo import DEFAULT_CONFIG, DemoConfig, run_demo


def test_demo_runs_end_to_end_and_writes_its_report(tmp_path):
    config = load_config(DEFAULT_CONFIG)
    save_config(config, tmp_path / "short.yaml")
    demo = DemoConfig(sites=2, patients_per_site=4, records_per_patient=2, config=tmp_path / "short.yaml",
                      twin_patients=2, twins_per_condition=1, rounds=(1, 1, 1), local_steps=(2, 1, 2),
                      batch_patients=2)
    report = run_demo(tmp_path / "out", demo, progress=False)
    assert sorted(report["stores"]) == ["site_a", "site_b"]
    assert all(s["records_kept"] == 8 and s["patients_with_multiple_records"] == 4 for s in report["stores"].values())
    history = report["federation"]["history"]
    assert [(e["stage"], e["round"], sorted(e["sites"])) for e in history] == \
        [(s, 1, ["site_a", "site_b"]) for s in ("vae", "ibe", "twin")]
    for site, privacy in report["privacy"].items():  # each site's ledger: one DP pass per stage, within budget
        assert privacy["passes"] == 3 and 0 < privacy["epsilon_spent"] <= privacy["epsilon_budget"] * (1 + 1e-6)
        assert privacy["epsilon_spent"] == history[-1]["sites"][site]["epsilon"]
    assert len(report["twins"]) == 2 * 3 * 1  # patients x target conditions x twins
    assert json.loads((tmp_path / "out/report.json").read_text())["twin_hr_mae_bpm"] == report["twin_hr_mae_bpm"]
    markdown = (tmp_path / "out/report.md").read_text()
    assert "| site_a | 8 / 8 |" in markdown
    assert "| site_a | " in markdown.split("## Privacy spent")[1]
    plot = next(l for l in markdown.splitlines() if l.startswith("Loss and epsilon per site")).split(": ")[1]
    assert (tmp_path / "out" / plot).is_file()  # linked relative to the report
    figures = [Path(f) for f in report["figures"]]
    assert len(figures) == 2 + 2 * 3 + 1 and all(f.stat().st_size > 10_000 for f in figures)
