"""One row of docs/results.md per command (not run by the tests):

    python -m bench.results --setting centralised --out results/
    python -m bench.results --setting all --out results/      # every row, then results/table.md and results.png

Settings: centralised (non-private, one pooled store: the papers' setting) | federated (non-private,
Flower simulation, 3 sites) | dp8 | dp3 (federated, patient-level DP-SGD at epsilon 8 / 3 per site) |
adaln | cross (AdaX ablations, centralised) | ddpm (the centralised model sampled with DDPM-1000 instead
of DPM-Solver++ 25) | noguidance (the centralised model with condition guidance 1 instead of GUIDANCE) |
ptbxl (the reader path: centralised on ../shared/data/ptbxl, evaluated on its held-out patients).

Every synthetic setting shares, under --out: the synthetic consortium (3 sites, non-IID), the per-site
stores, the pooled store, a reference population (another synthetic consortium, its own seed, never
trained on) and the evaluation encoder trained on it. Every model is evaluated the same way on the
held-out patients of all three sites together (held out by the same patient-id hash in every setting,
so also from the pooled and the federated training). Centralised runs take as many optimiser steps per
stage as a federated run takes rounds x local steps, so the rows compare equal numbers of updates. The
row is written to OUT/<setting>/row.md and printed; the full metrics are in OUT/<setting>/eval/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from ecgtwin.config import STAGES
from ecgtwin.config import load_config, save_config
from ecgtwin.data.store import SiteStore
from ecgtwin.privacy.policy import save_policy, site_policy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
PTBXL = ROOT.parent / "shared" / "data" / "ptbxl"
SETTINGS = ("centralised", "federated", "dp8", "dp3", "adaln", "cross", "ddpm", "noguidance", "ptbxl")
# Beyond the rows, remedies for client drift (same number of updates as `federated`):
# fedshort = 15 twin rounds x 200 local steps instead of 5 x 600; fedprox = FedProx, mu PROXIMAL_MU.
# vaelong = centralised with 4x the VAE steps (the VAE's reconstruction bounds every row's FID).
EXTRA_SETTINGS = ("fedshort", "fedprox", "vaelong")
PROXIMAL_MU = 0.1
GUIDANCE = 2.0  # condition guidance of every row but `noguidance`
REFERENCE_SEED = 101  # the reference population that trains the evaluation encoder (the consortium uses Scale.seed)


@dataclasses.dataclass(frozen=True)
class Scale:
    sites: int = 3
    patients_per_site: int = 60
    records_per_patient: int = 3
    seed: int = 0
    rounds: tuple[int, int, int] = (2, 2, 5)
    local_steps: tuple[int, int, int] = (100, 40, 600)
    batch_patients: int = 8
    budget_fractions: tuple[float, float, float] = (0.3, 0.2, 0.5)
    held_out_fraction: float = 0.3
    twins_per_patient: int = 4
    encoder_steps: int = 600
    max_grad_norm: float = 1.0  # the sites' per-patient clipping norm C (their policies')


def _store(source: str, root: Path, store: Path, **reader_options) -> Path:
    from ecgtwin.data.prepare import prepare_store

    if not (store / "manifest.json").is_file():
        prepare_store(source, root, store, on_reject=lambda r: print(f"rejected: {r}", file=sys.stderr),
                      progress=False, **reader_options)
    return store


def prepare(out: Path, scale: Scale) -> dict[str, Path]:
    """Consortium, per-site stores, the pooled store and the reference population (reused when present)."""
    from ecgtwin.data.synthetic import synthesize_consortium

    for name, seed in (("consortium", scale.seed), ("reference", REFERENCE_SEED)):
        if not (out / name).is_dir():
            synthesize_consortium(out / name, sites=scale.sites, patients_per_site=scale.patients_per_site,
                                  records_per_patient=scale.records_per_patient, seed=seed, progress=False)
    stores = {site_dir.name: _store("synthetic", site_dir, out / "sites" / site_dir.name / "store")
              for site_dir in sorted(p.parent for p in (out / "consortium").glob("*/metadata.csv"))}
    stores["pooled"] = _store("synthetic", out / "consortium", out / "pooled-store")
    stores["reference"] = _store("synthetic", out / "reference", out / "reference-store")
    return stores


def experiment_config(scale: Scale, injector: str = "adax", held_out_fraction: float | None = None):
    config = load_config(CONFIG)
    config.data.held_out_fraction = scale.held_out_fraction if held_out_fraction is None else held_out_fraction
    config.model.dit.injector = injector
    return config


def train_centralised(out: Path, store: Path, scale: Scale, injector: str = "adax",
                      held_out_fraction: float | None = None) -> Path:
    from ecgtwin.train.centralised import train_stage

    config = experiment_config(scale, injector, held_out_fraction)
    for stage, rounds, steps in zip(STAGES, scale.rounds, scale.local_steps):
        getattr(config, stage).steps = rounds * steps
        train_stage(stage, config, store, out, progress=False)  # resumes / returns at once when finished
    return out


def train_federated(out: Path, stores: dict[str, Path], scale: Scale, epsilon: float | None,
                    strategy: str = "fedavg", config: Path | None = None, foundation: Path | None = None,
                    distributed_sites: int | None = None, server_lr: float | None = None) -> Path:
    """Flower simulation over site folders (ecgtwin.coordinator.launch.simulate, as `ecgtwin federate`), with
    the experiment `config` (default: the demo's at this scale) and from `foundation` if given.
    `distributed_sites`: distributed DP (each site's policy; every round through SecAgg+, FedAdam at
    `server_lr` on the unmasked sum)."""
    from ecgtwin.coordinator.launch import simulate
    from ecgtwin.coordinator.settings import simulation_settings

    model = out / "federation" / "model"
    if (model / "twin.safetensors").is_file():
        return model
    sites_root = out / "sites"
    for site, store in stores.items():
        if not site.startswith("site_"):
            continue
        site_dir = sites_root / site
        site_dir.mkdir(parents=True, exist_ok=True)
        if not (site_dir / "store").exists():  # a copy: each run's ledger marker goes into its own store
            shutil.copytree(store.resolve(), site_dir / "store")
        save_policy(site_policy(site, scale.rounds, scale.local_steps, scale.batch_patients, scale.budget_fractions,
                                private=epsilon is not None, epsilon=epsilon, delta=1e-5,
                                population=len(SiteStore(store).patients), distributed_sites=distributed_sites,
                                max_grad_norm=scale.max_grad_norm),
                    site_dir / "privacy.yaml")
    config_path = config or out / "config.yaml"
    if config is None:
        save_config(experiment_config(scale), config_path)
    options = {"strategy": strategy, "min_nodes": min(2, scale.sites)}
    if distributed_sites is not None:  # every site in every SecAgg+ sum; the server steps on the unmasked mean
        options = {"strategy": "fedadam", "min_nodes": distributed_sites, "secure_aggregation": True,
                   "server_lr": server_lr or 1e-3}
    settings = simulation_settings(config_path, out / "federation", sites_root, scale.rounds, foundation,
                                   run_name=out.name, proximal_mu=PROXIMAL_MU, **options)
    status = simulate(settings.to_run_config(), out / "federation" / "simulation.log")
    if status.get("status") != "finished":
        raise RuntimeError(f"federated training failed: {status.get('message')} (log: {out / 'federation'})")
    return model


HEADER = ("| setting | FID | P/R/F1 | CLIP | HR MAE | cond. acc. | similarity | identification top-1 |\n"
          "|---|---|---|---|---|---|---|---|")


def row(setting: str, m: dict) -> str:
    def f(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    return (f"| {setting} | {f(m['fid'], 2)} | {f(m['precision'], 2)} / {f(m['recall'], 2)} / {f(m['f1'], 2)} | "
            f"{f(m['clip_score'])} | {f(m['hr_mae'], 1)} | {f(m['condition_accuracy'], 2)} | "
            f"{f(m['similarity'])} | {f(m['identification_top1'], 2)} |")


INTERVALS_HEADER = ("| setting | FID | CLIP | HR MAE | cond. acc. | similarity | identification top-1 |\n"
                    "|---|---|---|---|---|---|---|")
INTERVAL_KEYS = (("fid", 1), ("clip_score", 3), ("hr_mae", 1), ("condition_accuracy", 2), ("similarity", 3),
                 ("identification_top1", 2))


def intervals_row(setting: str, m: dict) -> str:
    """The 95 % patient-bootstrap intervals of a row (ecgtwin.evaluate.bootstrap)."""
    cells = []
    for key, digits in INTERVAL_KEYS:
        low_high = m.get("intervals", {}).get(key)
        cells.append("n/a" if not low_high else f"{low_high[0]:.{digits}f}-{low_high[1]:.{digits}f}")
    return f"| {setting} | " + " | ".join(cells) + " |"


def ceilings(m: dict) -> str:
    """What the same metrics give for real ECGs (and chance), to read a row against."""
    s = m["setup"]
    return (f"real ECGs: CLIP {m['clip_score_real']:.3f}, HR MAE {m['hr_mae_real']:.1f}, condition accuracy "
            f"{m['condition_accuracy_real']:.2f}; identification chance {m['identification_chance_top1']:.3f}; "
            f"{s['twins']} twins of {s['twin_patients']} patients against {s['real_targets']} real targets")


def run(setting: str, out: Path, scale: Scale = Scale()) -> dict:
    from ecgtwin.evaluate import run_evaluation

    if setting not in SETTINGS + EXTRA_SETTINGS:
        raise ValueError(f"unknown setting {setting!r} (one of {', '.join(SETTINGS + EXTRA_SETTINGS)})")
    out = Path(out)
    started = time.perf_counter()
    sampler, guidance, downstream = None, GUIDANCE, True
    evaluation = {}
    if setting == "ptbxl":
        if not (PTBXL / "ptbxl_database.csv").is_file():
            raise FileNotFoundError(f"{PTBXL}: PTB-XL records are not there (the ptbxl row needs ../shared/data/ptbxl)")
        store = _store("ptbxl", PTBXL, out / "ptbxl" / "store", rate=100)  # all 400 ECGs (500 Hz: only 53)
        # PTB-XL here has 400 ECGs and only 22 patients with two or more: hold half the patients out so
        # that some of those get twins; the held-out patients with one ECG train the encoder.
        checkpoint = train_centralised(out / "ptbxl" / "ckpt", store, scale, held_out_fraction=0.5)
        evaluation = {"store": store, "encoder_fraction": 0.2, "encoder_cache": out / "ptbxl" / "encoder"}
    else:
        stores = prepare(out, scale)
        evaluation = {"store": stores["pooled"], "encoder_store": stores["reference"],
                      "encoder_cache": out / "encoder-reference"}
        if setting in ("centralised", "ddpm", "noguidance"):
            checkpoint = train_centralised(out / "centralised" / "ckpt", stores["pooled"], scale)
            sampler = "ddpm" if setting == "ddpm" else None
            guidance = 1.0 if setting == "noguidance" else GUIDANCE
            downstream = setting != "ddpm"  # 1000-step sampling of the downstream twins would dominate the run
        elif setting in ("adaln", "cross"):
            checkpoint = train_centralised(out / setting / "ckpt", stores["pooled"], scale, injector=setting)
        elif setting == "vaelong":
            longer = dataclasses.replace(scale, local_steps=(4 * scale.local_steps[0], *scale.local_steps[1:]))
            checkpoint = train_centralised(out / setting / "ckpt", stores["pooled"], longer)
        elif setting == "fedshort":
            short = dataclasses.replace(scale, rounds=(*scale.rounds[:2], 3 * scale.rounds[2]),
                                        local_steps=(*scale.local_steps[:2], scale.local_steps[2] // 3))
            checkpoint = train_federated(out / setting, stores, short, None)
        elif setting == "fedprox":
            checkpoint = train_federated(out / setting, stores, scale, None, strategy="fedprox")
        else:
            epsilon = {"federated": None, "dp8": 8.0, "dp3": 3.0}[setting]
            checkpoint = train_federated(out / setting, stores, scale, epsilon)
    trained = time.perf_counter()
    metrics = run_evaluation(checkpoint, out=out / setting / "eval", twins_per_patient=scale.twins_per_patient,
                             sampler=sampler, guidance=guidance, encoder_steps=scale.encoder_steps,
                             downstream=downstream, progress=False, **evaluation)
    line = row(setting, metrics)
    (out / setting).mkdir(parents=True, exist_ok=True)
    (out / setting / "row.md").write_text(line + "\n")
    summary = {"setting": setting, "row": line, "intervals_row": intervals_row(setting, metrics),
               "ceilings": ceilings(metrics), "scale": dataclasses.asdict(scale),
               "train_seconds": round(trained - started, 1), "eval_seconds": metrics["seconds"],
               "metrics": str(out / setting / "eval" / "metrics.json")}
    (out / setting / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def table(out: Path) -> str:
    """The measured rows under OUT, in SETTINGS order, as markdown (also written to OUT/table.md)."""
    lines, intervals, notes = [HEADER], ["", "95 % patient-bootstrap intervals:", "", INTERVALS_HEADER], [""]
    for setting in SETTINGS + EXTRA_SETTINGS:
        summary = out / setting / "summary.json"
        if summary.is_file():
            s = json.loads(summary.read_text())
            lines.append(s["row"])
            intervals.append(s.get("intervals_row", f"| {setting} | not computed |"))
            notes.append(f"- {setting}: {s['ceilings']}; train {s['train_seconds']} s, evaluation {s['eval_seconds']} s")
    text = "\n".join(lines + intervals + notes) + "\n"
    (out / "table.md").write_text(text)
    return text


FIGURE_METRICS = (("fid", "FID (lower is better)"), ("f1", "k-NN F1"), ("clip_score", "CLIP score"),
                  ("hr_mae", "HR MAE, bpm (lower is better)"), ("condition_accuracy", "condition accuracy"),
                  ("identification_top1", "identification top-1"))


def figure(out: Path) -> Path | None:
    """OUT/results.png: one panel per metric, one bar per measured setting."""
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = {s: json.loads((out / s / "eval" / "metrics.json").read_text())
                for s in SETTINGS + EXTRA_SETTINGS if (out / s / "summary.json").is_file()}
    if not measured:
        return None
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    names = list(measured)
    # PTB-XL is another dataset with its own evaluation encoder: grey, not to be compared bar for bar
    colours = ["tab:grey" if s == "ptbxl" else "tab:blue" for s in names]
    for ax, (key, title) in zip(axes.flat, FIGURE_METRICS):
        values = np.array([np.nan if measured[s].get(key) is None else measured[s][key] for s in names], float)
        bounds = np.array([measured[s].get("intervals", {}).get(key) or [np.nan, np.nan] for s in names], float)
        errors = np.abs(np.stack([values - bounds[:, 0], bounds[:, 1] - values]))  # 95 % patient bootstrap
        ax.bar(range(len(values)), values, color=colours, yerr=np.nan_to_num(errors), capsize=3)
        ax.set_xticks(range(len(values)), names, rotation=45, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"ecgtwin results ({out.name}); bars: 95 % patient-bootstrap intervals; grey: PTB-XL, own encoder")
    fig.tight_layout()
    path = out / "results.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True, choices=(*SETTINGS, *EXTRA_SETTINGS, "all"))
    parser.add_argument("--out", required=True, type=Path, help="shared folder for all settings")
    parser.add_argument("--patients-per-site", type=int, default=Scale.patients_per_site)
    parser.add_argument("--twin-local-steps", type=int, default=Scale.local_steps[2],
                        help=f"twin-stage local steps per round (x {Scale.rounds[2]} rounds; centralised: the total)")
    parser.add_argument("--record", action="store_true",
                        help="also merge each measured row into bench/data/results.json (then: python -m bench.tables)")
    args = parser.parse_args()
    scale = Scale(patients_per_site=args.patients_per_site,
                  local_steps=(*Scale.local_steps[:2], args.twin_local_steps))
    for setting in SETTINGS if args.setting == "all" else (args.setting,):
        if args.setting == "all" and setting == "ptbxl" and not PTBXL.is_dir():
            print(f"ptbxl: skipped, {PTBXL} is not there", file=sys.stderr)
            continue
        try:
            summary = run(setting, args.out, scale)
            print(json.dumps(summary, indent=2), flush=True)
            if args.record:
                from bench.tables import record_result

                print(f"recorded in {record_result(summary, ' '.join([parser.prog, *sys.argv[1:]]))}")
        except (FileNotFoundError, ValueError, RuntimeError) as error:  # one line; the other settings go on
            print(f"{setting}: failed: {error}", file=sys.stderr)
    print(table(args.out))
    print(f"figure: {figure(args.out)}")


if __name__ == "__main__":
    main()
