"""The embedded default run (`make demo`): the pipeline end to end on the built-in synthetic consortium.

Synthesize a consortium of hospitals, prepare every site's store, write each site's privacy policy
(patient-level DP, epsilon 8), train the three stages federated in Flower's simulation engine (one
simulated SuperNode per site; only weights and allowlisted metrics leave a site), then at one site
generate twins of a few of its patients under new conditions from the global model, and write a report
with pictures, the per-site privacy spent and the twins' measured heart rates.

    OUT/sites/<site>/{store, privacy.yaml, state/ledger.jsonl}   each hospital's side
    OUT/federation/{metrics.jsonl, metrics.png, state.npz, model/, simulation.log}   the coordinator's side
    OUT/twins/, OUT/figures/, OUT/report.md, OUT/report.json
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
from ecgtwin.coordinator.launch import simulate
from ecgtwin.plot import plot_ecg_paper
from ecgtwin.config import STAGES
from ecgtwin.privacy import Ledger, load_policy
from ecgtwin.privacy.policy import save_policy, site_policy

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
# New conditions for the twins: (report, requested HR)
TARGETS = (("Atrial fibrillation", 105.0), ("Sinus tachycardia", 120.0), ("Sinus bradycardia", 50.0))


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    sites: int = 3
    patients_per_site: int = 40
    records_per_patient: int = 3
    seed: int = 0
    config: Path = DEFAULT_CONFIG
    twin_patients: int = 3
    twins_per_condition: int = 2
    # federation: rounds per stage (the server) and each site's policy (local DP steps per round, expected
    # patients per step, budget). Sized to finish in about 10 minutes on 2 CPU cores (docs/federation.md).
    # With 36 training patients per site and 8 expected per step, epsilon 8 over all 1020 steps needs noise
    # multipliers of about 2.7 (VAE), 2.8 (IBE) and 5.4 (twin); many more steps or fewer patients push them
    # past the policy's limit (20), and the site refuses to train.
    rounds: tuple[int, int, int] = (2, 2, 3)
    local_steps: tuple[int, int, int] = (40, 20, 300)
    budget_fractions: tuple[float, float, float] = (0.3, 0.2, 0.5)
    batch_patients: int = 8
    epsilon: float = 8.0
    delta: float = 1e-5
    strategy: str = "fedavg"


def run_demo(out: str | Path, demo: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """Run the demo into `out` and return its report (also written to out/report.json and report.md)."""
    out = Path(out)
    consortium = synthesize_consortium(
        out / "consortium", sites=demo.sites, patients_per_site=demo.patients_per_site,
        records_per_patient=demo.records_per_patient, seed=demo.seed, progress=progress)
    sites = sorted(p.parent.name for p in (out / "consortium").glob("*/metadata.csv"))
    stores = {}
    for site in sites:
        stores[site] = prepare_store("synthetic", out / "consortium" / site, out / "sites" / site / "store",
                                     progress=progress)
        _write_policy(out / "sites" / site, site, demo)
        _plot_first_record(out / "sites" / site / "store", out / "figures" / f"{site}_first_record.png")
    load_config(demo.config)  # fail here, not in the simulation, on a bad config
    federation = _federate(out, demo, progress)
    (out / "figures" / "federation_metrics.png").write_bytes(Path(federation["metrics_plot"]).read_bytes())
    site = sites[0]
    twins = _twins(out, site, demo)
    privacy = {s: _privacy(out / "sites" / s) for s in sites}
    report = {"config": {k: str(v) for k, v in dataclasses.asdict(demo).items()}, "consortium": consortium,
              "stores": stores, "training_site": site, "federation": federation, "privacy": privacy,
              "twins": twins, "twin_hr_mae_bpm": _mae(twins),
              "figures": sorted(str(p) for p in (out / "figures").glob("*.png"))}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report, out))
    return report


def _write_policy(site_dir: Path, site: str, demo: DemoConfig) -> None:
    save_policy(site_policy(site, demo.rounds, demo.local_steps, demo.batch_patients, demo.budget_fractions,
                            epsilon=demo.epsilon, delta=demo.delta, population=demo.patients_per_site),
                site_dir / "privacy.yaml")


def _federate(out: Path, demo: DemoConfig, progress: bool) -> dict:
    run_config = {"config": str(Path(demo.config).resolve()), "out": str(out / "federation"),
                  "sites-root": str(out / "sites"), "run-name": "demo", "strategy": demo.strategy,
                  "min-nodes": min(2, demo.sites), "node-wait": 120.0,
                  **{f"rounds-{s}": r for s, r in zip(STAGES, demo.rounds)}}
    status = simulate(run_config, out / "federation" / "simulation.log", progress=progress)
    if status.get("status") != "finished":
        raise RuntimeError(f"federated training failed: {status.get('message')} "
                           f"(log: {out / 'federation' / 'simulation.log'})")
    history = [json.loads(l) for l in (out / "federation" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {"strategy": demo.strategy, "rounds": dict(zip(STAGES, demo.rounds)),
            "local_steps": dict(zip(STAGES, demo.local_steps)), "history": history,
            "model": str(out / "federation" / "model"), "metrics_plot": str(out / "federation" / "metrics.png")}


def _privacy(site_dir: Path) -> dict:
    entries = Ledger(site_dir / "state" / "ledger.jsonl").entries()
    policy = load_policy(site_dir / "privacy.yaml")
    return {"epsilon_spent": entries[-1]["epsilon"] if entries else 0.0, "epsilon_budget": policy.epsilon,
            "delta": policy.delta, "passes": len(entries),
            "noise_multiplier": {e["stage"]: round(e["noise_multiplier"], 3) for e in entries}}


def _twins(out: Path, site: str, demo: DemoConfig) -> list[dict]:
    """Twins of the first patients of the training site, from their earliest ECG, under new conditions."""
    from ecgtwin.twin import Condition, TwinGenerator, reference_from_store, write_twins

    generator = TwinGenerator(out / "federation" / "model")
    store = SiteStore(out / "sites" / site / "store")
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


def _closing(report: dict) -> str:
    """What the run shows, in figures taken from the run itself."""
    fed, config = report["federation"], report["config"]
    steps = sum(fed["rounds"][s] * fed["local_steps"][s] for s in fed["rounds"])
    patients = sorted({s["patients"] for s in report["stores"].values()})
    per_site = f"{patients[0]}" if len(patients) == 1 else f"{patients[0]}-{patients[-1]}"
    return (f"Each site trained {steps} DP-SGD steps over all stages on {per_site} patients at epsilon "
            f"{float(config['epsilon']):g}; the twins' heart rate misses the requested one by "
            f"{report['twin_hr_mae_bpm']} bpm on average. At this size private training from random weights does "
            "not give usable twins: the demo shows the pipeline, not the quality reachable with more patients "
            "per site and a public foundation model.")


def _markdown(report: dict, out: Path) -> str:
    lines = ["# ecgtwin demo report", "", "## Sites", "", "| site | records kept / read | patients | rejected |",
             "|---|---|---|---|"]
    for site, s in report["stores"].items():
        lines.append(f"| {site} | {s['records_kept']} / {s['records_read']} | {s['patients']} | {s['rejected_total']} |")
    fed = report["federation"]
    plot = os.path.relpath(fed["metrics_plot"], out)  # report.md sits in `out`
    lines += ["", f"## Federated training ({fed['strategy']}, Flower simulation engine, patient-level DP at every site)",
              "", "| stage | round | sites | mean loss | refused | failed | seconds |", "|---|---|---|---|---|---|---|"]
    for e in fed["history"]:
        loss = f"{e['loss']:.4g}" if e["loss"] is not None else "n/a"
        lines.append(f"| {e['stage']} | {e['round']} | {len(e['sites'])} | {loss} | {len(e['refused'])} | "
                     f"{len(e['failed'])} | {e['seconds']} |")
    lines += ["", f"Loss and epsilon per site and round: {plot}", "",
              "## Privacy spent (each site's own ledger)", "",
              "| site | epsilon spent / budget | delta | DP passes | noise multiplier per stage |", "|---|---|---|---|---|"]
    for site, p in report["privacy"].items():
        sigma = ", ".join(f"{k} {v}" for k, v in p["noise_multiplier"].items())
        lines.append(f"| {site} | {p['epsilon_spent']:.3f} / {p['epsilon_budget']:g} | {p['delta']:g} | "
                     f"{p['passes']} | {sigma} |")
    lines += ["", f"## Twins at {report['training_site']} (from the global model)", "",
              f"Mean |requested - measured| HR: {report['twin_hr_mae_bpm']} bpm", "",
              "| patient | reference report | target report | HR requested | HR measured | record |",
              "|---|---|---|---|---|---|"]
    for t in report["twins"]:
        lines.append(f"| {t['patient_id']} | {t['reference_report']} | {t['report']} | {t['hr_requested']:g} | "
                     f"{t['hr_measured']} | {t['record']} |")
    lines += ["", "Pictures: `figures/` (records on ECG paper, reference beside its twins).", _closing(report)]
    return "\n".join(lines) + "\n"
