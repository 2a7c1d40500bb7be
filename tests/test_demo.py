"""The embedded default end to end, shortened: every part runs and the report says what it did."""

import json
from pathlib import Path

from ecgtwin.config import load_config, save_config
from ecgtwin.demo import DEFAULT_CONFIG, DemoConfig, run_demo


def test_demo_runs_end_to_end_and_writes_its_report(tmp_path):
    config = load_config(DEFAULT_CONFIG)
    config.vae.steps, config.ibe.steps, config.twin.steps = 5, 3, 5
    save_config(config, tmp_path / "short.yaml")
    demo = DemoConfig(sites=2, patients_per_site=4, records_per_patient=2, config=tmp_path / "short.yaml",
                      twin_patients=2, twins_per_condition=1)
    report = run_demo(tmp_path / "out", demo, progress=False)
    assert sorted(report["stores"]) == ["site_a", "site_b"]
    assert all(s["records_kept"] == 8 and s["patients_with_multiple_records"] == 4 for s in report["stores"].values())
    assert [report["training"][s]["steps"] for s in ("vae", "ibe", "twin")] == [5, 3, 5]
    assert len(report["twins"]) == 2 * 3 * 1  # patients x target conditions x twins
    assert json.loads((tmp_path / "out/report.json").read_text())["twin_hr_mae_bpm"] == report["twin_hr_mae_bpm"]
    markdown = (tmp_path / "out/report.md").read_text()
    assert "| site_a | 8 / 8 |" in markdown
    for line in markdown.splitlines():  # every loss curve the report links exists, relative to the report
        if "_loss.png" in line:
            assert (tmp_path / "out" / line.split("|")[-2].strip()).is_file()
    figures = [Path(f) for f in report["figures"]]
    assert len(figures) == 2 + 2 * 3 and all(f.stat().st_size > 10_000 for f in figures)
