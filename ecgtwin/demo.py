"""The embedded default run (`make demo`): private fine-tuning of a public foundation, end to end, on the
built-in synthetic consortium.

The demo starts from foundations/demo, a foundation pretrained without DP on the simulator's PUBLIC
population (another seed, another condition mix, never a left bundle branch block; reproduced by the command
in its card.md). It synthesizes a consortium of hospitals, prepares every site's store, writes each site's
privacy policy (patient-level DP, epsilon 8, spent on the two fine-tuned stages only), and federates in
Flower's simulation engine: the VAE is used frozen (never trained, never sent back, no privacy cost), the IBE
and the twin model are fine-tuned with DP-SGD at every site (only their noisy weights and allowlisted metrics
leave a site). Then, at one site, it generates twins of a few of its patients under new conditions (one of
them unseen in the public data), measures them, and writes a report with pictures.

    OUT/sites/<site>/{store, privacy.yaml, state/ledger.jsonl}   each hospital's side
    OUT/federation/{metrics.jsonl, metrics.png, state.npz, model/, simulation.log}   the coordinator's side
    OUT/fine-tune.yaml   the experiment the sites ran (demo.yaml with the fine-tuning settings)
    OUT/twins/, OUT/figures/, OUT/report.md, OUT/report.json
"""

from __future__ import annotations

import dataclasses
import json
import os
from itertools import combinations
from pathlib import Path

import numpy as np

from ecgtwin.config import STAGES, load_config, save_config
from ecgtwin.coordinator.launch import simulate
from ecgtwin.coordinator.settings import simulation_settings
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.signal import beat_distance, median_beat
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.errors import MissingInput
from ecgtwin.plot import new_figure, plot_ecg_paper
from ecgtwin.privacy import load_policy
from ecgtwin.site_folder import SiteFolder
from ecgtwin.privacy.policy import save_policy, site_policy

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = ROOT / "configs" / "demo.yaml"
DEFAULT_FOUNDATION = ROOT / "foundations" / "demo"
FOUNDATION_COMMAND = ("ecgtwin pretrain --config configs/demo-foundation.yaml --source synthetic --patients 1000 "
                      "--records-per-patient 3 --out foundations/demo")
# New conditions for the twins: (report, requested HR), written as the sites' machine reports write them
# (docs/synthetic.md: a rhythm, the findings, a summary statement). A bare statement the model never saw as
# a whole report is followed less well: "Sinus tachycardia" at 120 bpm gave twins about 30 bpm too slow,
# "Sinus tachycardia. Otherwise normal ECG." about 13 (measured, the same model). The public population
# never shows the last one.
TARGETS = (("Atrial fibrillation with rapid ventricular response. Abnormal ECG.", 105.0),
           ("Sinus tachycardia. Otherwise normal ECG.", 120.0),
           ("Sinus bradycardia. Otherwise normal ECG.", 50.0),
           ("Normal sinus rhythm. Left bundle branch block. Abnormal ECG.", 70.0))
UNSEEN_IN_PUBLIC = "Left bundle branch block"


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    sites: int = 3
    patients_per_site: int = 200
    records_per_patient: int = 3
    seed: int = 0
    config: Path = DEFAULT_CONFIG
    foundation: Path = DEFAULT_FOUNDATION
    twin_patients: int = 3
    twins_per_condition: int = 2
    # federation: rounds per stage (the server) and each site's policy (local DP steps per round, expected
    # patients per step, budget). The VAE is frozen (0 rounds: no budget share); the budget goes to the IBE
    # and the twin model. Many patients per site give a low sampling rate, so little noise is needed.
    rounds: tuple[int, int, int] = (0, 1, 2)
    local_steps: tuple[int, int, int] = (1, 40, 120)  # the VAE's 1 is never used: it has no rounds
    budget_fractions: tuple[float | None, float, float] = (None, 0.3, 0.7)
    batch_patients: int = 32
    epsilon: float = 8.0
    delta: float = 1e-5
    strategy: str = "fedavg"
    # what the fine-tuned stages train (ecgtwin.models.finetune) and their learning rate: small, so that the
    # DP noise does not walk the foundation's weights away
    trainable: tuple[str, str] = ("all", "all")
    finetune_lr: float = 2e-4
    # person guidance (ECGTwin's classifier-free guidance on the base vector) when generating: at 1 the twins
    # of different patients are hardly told apart; 2 keeps the person at no cost in HR error (measured)
    guidance_person: float = 2.0
    # condition guidance: 4 follows the requested condition best on this model (bench.privacy_utility --guidance
    # at 2,000 patients per site: condition accuracy and FID better than at 1, 2 or 6, HR error as at 2)
    guidance_condition: float = 4.0


def run_demo(out: str | Path, demo: DemoConfig = DemoConfig(), progress: bool = True) -> dict:
    """Run the demo into `out` and return its report (also written to out/report.json and report.md)."""
    out = Path(out)
    if not (Path(demo.foundation) / "card.json").is_file():
        raise MissingInput(f"{demo.foundation}: the demo's public foundation is missing; make it with "
                           f"{FOUNDATION_COMMAND}")
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
    config_path = _fine_tune_config(out, demo)
    federation = _federate(out, demo, config_path, progress)
    (out / "figures" / "federation_metrics.png").write_bytes(Path(federation["metrics_plot"]).read_bytes())
    site = sites[0]
    twins, beats = _twins(out, site, demo)
    personal = _personal(beats)
    _plot_hr(twins, out / "figures" / "twin_heart_rate.png")
    _plot_beats(beats, out / "figures" / "twin_median_beats.png")
    privacy = {s: _privacy(out / "sites" / s) for s in sites}
    card = json.loads((Path(demo.foundation) / "card.json").read_text())
    report = {"config": {k: str(v) for k, v in dataclasses.asdict(demo).items()}, "consortium": consortium,
              "foundation": {"path": str(demo.foundation), "source": card["source"], "seed": card["seed"],
                             "patients": card["patients"], "records": card["records"], "command": FOUNDATION_COMMAND,
                             "unseen_in_public": UNSEEN_IN_PUBLIC},
              "stores": stores, "training_site": site, "federation": federation, "privacy": privacy,
              "twins": twins, "twin_hr_mae_bpm": _mae(twins), "twin_hr_mae_by_condition": _mae_by_condition(twins),
              "personal": personal,
              "figures": sorted(str(p) for p in (out / "figures").glob("*.png"))}
    (out / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "report.md").write_text(_markdown(report, out))
    return report


def _fine_tune_config(out: Path, demo: DemoConfig) -> Path:
    """demo.yaml with what the fine-tuned stages train, their learning rate and the person and condition
    guidance of the twins: the experiment the sites run and the global model keeps."""
    config = load_config(demo.config)  # fail here, not in the simulation, on a bad config
    for stage, mode in zip(("ibe", "twin"), demo.trainable):
        config.stage(stage).trainable = mode
        config.stage(stage).lr = demo.finetune_lr
    config.vae.trainable = "frozen"
    config.generate.guidance_person = demo.guidance_person
    config.generate.guidance_condition = demo.guidance_condition
    path = out / "fine-tune.yaml"
    save_config(config, path)
    return path


def _write_policy(site_dir: Path, site: str, demo: DemoConfig) -> None:
    save_policy(site_policy(site, demo.rounds, demo.local_steps, demo.batch_patients, demo.budget_fractions,
                            epsilon=demo.epsilon, delta=demo.delta, population=demo.patients_per_site),
                site_dir / "privacy.yaml")


def _federate(out: Path, demo: DemoConfig, config_path: Path, progress: bool) -> dict:
    settings = simulation_settings(config_path, out / "federation", out / "sites", demo.rounds, demo.foundation,
                                   run_name="demo", strategy=demo.strategy, min_nodes=min(2, demo.sites))
    status = simulate(settings.to_run_config(), out / "federation" / "simulation.log", progress=progress)
    if status.get("status") != "finished":
        raise RuntimeError(f"federated training failed: {status.get('message')} "
                           f"(log: {out / 'federation' / 'simulation.log'})")
    history = [json.loads(l) for l in (out / "federation" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return {"strategy": demo.strategy, "rounds": dict(zip(STAGES, demo.rounds)),
            "local_steps": dict(zip(STAGES, demo.local_steps)), "history": history,
            "model": str(out / "federation" / "model"), "metrics_plot": str(out / "federation" / "metrics.png")}


def _privacy(site_dir: Path) -> dict:
    entries = SiteFolder.at(site_dir).ledger().entries()
    policy = load_policy(site_dir / "privacy.yaml")
    return {"epsilon_spent": entries[-1]["epsilon"] if entries else 0.0, "epsilon_budget": policy.epsilon,
            "delta": policy.delta, "passes": len(entries),
            "noise_multiplier": {e["stage"]: round(e["noise_multiplier"], 3) for e in entries}}


def _twins(out: Path, site: str, demo: DemoConfig) -> tuple[list[dict], dict]:
    """Twins of the first patients of the training site, from their earliest ECG, under new conditions; and
    the median beat of each twin ((patient, condition) -> beats), to see whether the person is kept."""
    from ecgtwin.twin import Condition, TwinGenerator, reference_from_store, to_rate, write_twins

    generator = TwinGenerator(out / "federation" / "model")
    store = SiteStore(out / "sites" / site / "store")
    rows, beats = [], {}
    for patient in store.patients[: demo.twin_patients]:
        reference = reference_from_store(store, int(store.records_of(patient)[0]))
        own = reference.condition
        for k, (report, hr) in enumerate(TARGETS):
            target = Condition(report, hr, own.age, own.sex)
            made = generator.generate(reference, target, n=demo.twins_per_condition, seed=k)
            written = write_twins(out / "twins" / patient, made, store.fs, reference, target, prefix=f"condition{k}")
            rows += [{"patient_id": patient, "reference_report": own.report, **w} for w in written]
            beats[(patient, k)] = [b for b in (median_beat(x, 500.0) for x in to_rate(made, store.fs, 500.0))
                                   if b is not None]
            (out / "figures").mkdir(exist_ok=True)
            (out / "figures" / f"twins_{patient}_condition{k}.png").write_bytes(
                (out / "twins" / patient / f"condition{k}.png").read_bytes())
    return rows, beats


def _personal(beats: dict) -> dict:
    """Is the person kept? The RMS distance (mV) between median beats of twins of ONE patient under one
    condition (different noise), against twins of DIFFERENT patients under the same condition."""
    within, between = [], []
    keys = sorted(beats)
    for key in keys:
        within += [beat_distance(a, b) for a, b in combinations(beats[key], 2)]
    for (p1, k1), (p2, k2) in combinations(keys, 2):
        if k1 == k2 and p1 != p2:
            between += [beat_distance(a, b) for a in beats[(p1, k1)] for b in beats[(p2, k2)]]
    mean = lambda v: round(float(np.mean(v)), 4) if v else None  # noqa: E731
    w, b = mean(within), mean(between)
    return {"within_patient_mv": w, "between_patients_mv": b,
            "ratio": round(b / w, 2) if w and b else None, "pairs": {"within": len(within), "between": len(between)}}


def _plot_hr(rows: list[dict], png: Path) -> None:
    fig = new_figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    requested = np.array([r["hr_requested"] for r in rows], float)
    measured = np.array([r["hr_measured"] for r in rows], float)
    ax.plot([40, 140], [40, 140], color="0.6", lw=1, label="measured = requested")
    ax.scatter(requested, measured, s=18)
    ax.set(xlabel="requested HR (bpm)", ylabel="measured HR (bpm, R-peak detector)",
           title=f"twins: mean |error| {_mae(rows)} bpm")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def _plot_beats(beats: dict, png: Path) -> None:
    """Median beats (leads II and V2) of every twin, one colour per patient, one panel per condition."""
    from ecgtwin.data.record import LEADS

    conditions = sorted({k for _, k in beats})
    patients = sorted({p for p, _ in beats})
    fig = new_figure(figsize=(3.2 * len(conditions), 5))
    axes = fig.subplots(2, len(conditions), squeeze=False)
    colours = ["C0", "C1", "C2", "C3", "C4", "C5"]
    for j, k in enumerate(conditions):
        for i, lead in enumerate(("II", "V2")):
            ax = axes[i][j]
            for n, patient in enumerate(patients):
                for m, beat in enumerate(beats.get((patient, k), [])):
                    t = (np.arange(beat.shape[1]) / 500.0 - 0.25) * 1000
                    ax.plot(t, beat[LEADS.index(lead)], color=colours[n % 6], lw=1,
                            label=patient if (m == 0 and i == 0 and j == 0) else None)
            ax.set_title(f"{TARGETS[k][0].removesuffix(' Abnormal ECG.')[:44]} / {lead}", fontsize=7)
            ax.set_xlabel("ms from R", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("median beats of the twins: one colour per patient (same colour = same person)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def _mae(rows: list[dict]) -> float | None:
    errors = [abs(r["hr_measured"] - r["hr_requested"]) for r in rows if r["hr_measured"] == r["hr_measured"]]
    return round(float(np.mean(errors)), 2) if errors else None


def _mae_by_condition(rows: list[dict]) -> dict:
    return {report: _mae([r for r in rows if r["report"] == report]) for report, _ in TARGETS}


def _plot_first_record(store_path: Path, png: Path) -> None:
    """The store's first record as the model sees it (resampled, baseline removed), on ECG paper."""
    store = SiteStore(store_path)
    row = store.records.iloc[0]
    title = f"{store_path.name} / patient {row.patient_id}: {row.report} (store representation, {store.fs:g} Hz)"
    plot_ecg_paper([(title, np.asarray(store.signals[0]), store.fs)], png)


def _closing(report: dict) -> str:
    """What the run shows, in figures taken from the run itself."""
    fed, config, personal = report["federation"], report["config"], report["personal"]
    steps = sum(fed["rounds"][s] * fed["local_steps"][s] for s in fed["rounds"])
    patients = sorted({s["patients"] for s in report["stores"].values()})
    per_site = f"{patients[0]}" if len(patients) == 1 else f"{patients[0]}-{patients[-1]}"
    return (f"Each site fine-tuned the public foundation with {steps} DP-SGD steps (IBE and twin model; the VAE "
            f"frozen) on {per_site} patients at epsilon {float(config['epsilon']):g}. The twins' heart rate misses "
            f"the requested one by {report['twin_hr_mae_bpm']} bpm on average, and twins of different patients "
            f"differ {personal['ratio']}x more than twins of one patient under different noise "
            f"({personal['between_patients_mv']} vs {personal['within_patient_mv']} mV RMS between median beats).")


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
    f = report["foundation"]
    lines[2:2] = ["## Start: a public foundation", "",
                  f"`{f['path']}`: pretrained without DP on the simulator's public population ({f['patients']} "
                  f"patients, {f['records']} records, seed {f['seed']}: no site's patient; its condition mix differs "
                  f"from every site's and it never shows a {f['unseen_in_public'].lower()}). Reproduce: `{f['command']}`.",
                  ""]
    personal = report["personal"]
    lines += ["", f"## Twins at {report['training_site']} (from the global model)", "",
              f"Mean |requested - measured| HR: {report['twin_hr_mae_bpm']} bpm (R-peak detector on the twins); "
              "per condition: " + ", ".join(f"{k[:40]} {v}" for k, v in report["twin_hr_mae_by_condition"].items()),
              "", "![heart rate](figures/twin_heart_rate.png)", "",
              f"Personal: median beats of twins of different patients differ by {personal['between_patients_mv']} mV "
              f"RMS, of one patient under different noise by {personal['within_patient_mv']} mV "
              f"({personal['ratio']}x).", "", "![median beats](figures/twin_median_beats.png)", "",
              "| patient | reference report | target report | HR requested | HR measured | record |",
              "|---|---|---|---|---|---|"]
    for t in report["twins"]:
        lines.append(f"| {t['patient_id']} | {t['reference_report']} | {t['report']} | {t['hr_requested']:g} | "
                     f"{t['hr_measured']} | {t['record']} |")
    lines += ["", "Pictures: `figures/` (records on ECG paper, reference beside its twins).", _closing(report)]
    return "\n".join(lines) + "\n"
