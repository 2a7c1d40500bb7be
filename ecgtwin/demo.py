"""The embedded default run (`make demo`): what exists of the pipeline, end to end, on synthetic data.

Today: synthesize a consortium, prepare every site's store, plot one record per site, write a report.
Federated training and twin generation join here as they land.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.plot import plot_ecg_paper


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    sites: int = 3
    patients_per_site: int = 20
    records_per_patient: int = 3
    seed: int = 0


def run_demo(out: str | Path, config: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """Run the demo into `out` and return its report (also written to out/report.json)."""
    out = Path(out)
    consortium = synthesize_consortium(
        out / "consortium", sites=config.sites, patients_per_site=config.patients_per_site,
        records_per_patient=config.records_per_patient, seed=config.seed, progress=progress)
    sites = sorted(p.parent.name for p in (out / "consortium").glob("*/metadata.csv"))
    stores = {}
    for site in sites:
        stores[site] = prepare_store("synthetic", out / "consortium" / site, out / "stores" / site, progress=progress)
        _plot_first_record(out / "stores" / site, out / "figures" / f"{site}_first_record.png")
    report = {"config": dataclasses.asdict(config), "consortium": consortium, "stores": stores,
              "figures": sorted(str(p) for p in (out / "figures").glob("*.png"))}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def _plot_first_record(store_path: Path, png: Path) -> None:
    """The store's first record as the model sees it (resampled, baseline removed), on ECG paper."""
    store = SiteStore(store_path)
    row = store.records.iloc[0]
    title = f"{store_path.name} / patient {row.patient_id}: {row.report} (store representation, {store.fs:g} Hz)"
    plot_ecg_paper([(title, np.asarray(store.signals[0]), store.fs)], png)
