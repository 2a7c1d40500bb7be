"""The embedded default run (`make demo`): the pipeline end to end on the built-in synthetic consortium.

Today: synthesize a consortium, prepare every site's store, train the three stages at one site
(single-site and non-private until the federation and privacy issues land), generate twins of a few
of that site's patients under new conditions, and write a report with pictures.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np

from ecgtwin.config import load_config
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.plot import plot_ecg_paper
from ecgtwin.train.runner import train_stage

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# New conditions for the twins: (report, requested HR)
TARGETS = (("Atrial fibrillation", 105.0), ("Sinus tachycardia", 120.0), ("Sinus bradycardia", 50.0))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    sites: int = 3
    patients_per_site: int = 20
    records_per_patient: int = 3
    seed: int = 0
    config: Path = DEFAULT_CONFIG
    twin_patients: int = 3
    twins_per_condition: int = 2


def run_demo(out: str | Path, demo: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """Run the demo into `out` and return its report (also written to out/report.json and report.md)."""
    out = Path(out)
    consortium = synthesize_consortium(
        out / "consortium", sites=demo.sites, patients_per_site=demo.patients_per_site,
        records_per_patient=demo.records_per_patient, seed=demo.seed, progress=progress)
    sites = sorted(p.parent.name for p in (out / "consortium").glob("*/metadata.csv"))
    stores = {}
    for site in sites:
        stores[site] = prepare_store("synthetic", out / "consortium" / site, out / "stores" / site, progress=progress)
        _plot_first_record(out / "stores" / site, out / "figures" / f"{site}_first_record.png")
    site = sites[0]
    config = load_config(demo.config)
    training = {stage: train_stage(stage, config, out / "stores" / site, out / "checkpoint", progress=progress)
                for stage in ("vae", "ibe", "twin")}
    twins = _twins(out, site, demo)
    report = {"config": {k: str(v) for k, v in dataclasses.asdict(demo).items()}, "consortium": consortium,
              "stores": stores, "training_site": site, "training": training, "twins": twins,
              "twin_hr_mae_bpm": _mae(twins), "figures": sorted(str(p) for p in (out / "figures").glob("*.png"))}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report, out))
    return report


def _twins(out: Path, site: str, demo: DemoConfig) -> list[dict]:
    """Twins of the first patients of the training site, from their earliest ECG, under new conditions."""
    from ecgtwin.twin import Condition, TwinGenerator, reference_from_store, write_twins

    generator = TwinGenerator(out / "checkpoint")
    store = SiteStore(out / "stores" / site)
    rows = []
    for patient in store.patients[: demo.twin_patients]:
        reference = reference_from_store(store, int(store.records_of(patient)[0]))
        own = reference.condition
        for k, (report, hr) in enumerate(TARGETS):
            target = Condition(report, hr, own.age, own.sex)
            made = generator.generate(reference, target, n=demo.twins_per_condition, seed=k)
            written = write_twins(out / "twins" / patient, made, store.fs, reference, target, prefix=f"condition{k}")
            rows += [{"patient_id": patient, "reference_report": own.report, **w} for w in written]
            (out / "figures").mkdir(exist_ok=True)
            (out / "figures" / f"twins_{patient}_condition{k}.png").write_bytes(
                (out / "twins" / patient / f"condition{k}.png").read_bytes())
    return rows


def _mae(rows: list[dict]) -> float | None:
    errors = [abs(r["hr_measured"] - r["hr_requested"]) for r in rows if r["hr_measured"] == r["hr_measured"]]
    return round(float(np.mean(errors)), 2) if errors else None


def _plot_first_record(store_path: Path, png: Path) -> None:
    """The store's first record as the model sees it (resampled, baseline removed), on ECG paper."""
    store = SiteStore(store_path)
    row = store.records.iloc[0]
    title = f"{store_path.name} / patient {row.patient_id}: {row.report} (store representation, {store.fs:g} Hz)"
    plot_ecg_paper([(title, np.asarray(store.signals[0]), store.fs)], png)


def _markdown(report: dict, out: Path) -> str:
    lines = ["# ecgtwin demo report", "", "## Sites", "", "| site | records kept / read | patients | rejected |",
             "|---|---|---|---|"]
    for site, s in report["stores"].items():
        lines.append(f"| {site} | {s['records_kept']} / {s['records_read']} | {s['patients']} | {s['rejected_total']} |")
    lines += ["", f"## Training at {report['training_site']} (single site, non-private)", "",
              "| stage | steps | first loss | final loss | seconds | curve |", "|---|---|---|---|---|---|"]
    for stage, t in report["training"].items():
        curve = os.path.relpath(t["loss_curve"], out)  # report.md sits in `out`
        lines.append(f"| {stage} | {t['steps']} | {t['first_loss']:.4g} | {t['final_loss']:.4g} | {t['seconds']} | {curve} |")
    lines += ["", "## Twins", "", f"Mean |requested - measured| HR: {report['twin_hr_mae_bpm']} bpm", "",
              "| patient | reference report | target report | HR requested | HR measured | record |",
              "|---|---|---|---|---|---|"]
    for t in report["twins"]:
        lines.append(f"| {t['patient_id']} | {t['reference_report']} | {t['report']} | {t['hr_requested']:g} | "
                     f"{t['hr_measured']} | {t['record']} |")
    lines += ["", "Pictures: `figures/` (records on ECG paper, reference beside its twins)."]
    return "\n".join(lines) + "\n"
