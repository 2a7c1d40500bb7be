"""One row of docs/results.md per command (not run by the tests):

    python -m bench.results --setting centralised --out results/

Settings: centralised (non-private, one pooled store: the papers' setting) | federated (non-private,
Flower simulation, 3 sites) | dp8 | dp3 (federated, patient-level DP-SGD at epsilon 8 / 3 per site) |
adaln | cross (AdaX ablations, centralised) | ddpm (the centralised model sampled with DDPM-1000 instead
of DPM-Solver++ 25) | noguidance (the centralised model with condition guidance 1 instead of GUIDANCE).

Every setting shares, under --out: the synthetic consortium (3 sites, non-IID), the per-site stores, the
pooled store, and the evaluation encoder of site_a. Every model is evaluated the same way at site_a on its
held-out patients (held out by the same patient-id hash in every setting, so also from the pooled and
the federated training). Centralised runs take as many optimiser steps per stage as a federated run
takes rounds x local steps, so the rows compare equal work. The row is written to OUT/<setting>/row.md
and printed; the full metrics are in OUT/<setting>/eval/metrics.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path


from ecgtwin.checkpoint import STAGES
from ecgtwin.config import load_config, save_config
from ecgtwin.privacy.policy import save_policy, site_policy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.yaml"
SETTINGS = ("centralised", "federated", "dp8", "dp3", "adaln", "cross", "ddpm", "noguidance")
GUIDANCE = 2.0  # condition guidance of every row but `noguidance`
EVAL_SITE = "site_a"


@dataclasses.dataclass(frozen=True)
class Scale:
    sites: int = 3
    patients_per_site: int = 40
    records_per_patient: int = 3
    seed: int = 0
    rounds: tuple[int, int, int] = (2, 2, 3)  # as the demo (ecgtwin/demo.py)
    local_steps: tuple[int, int, int] = (40, 20, 300)
    batch_patients: int = 8
    budget_fractions: tuple[float, float, float] = (0.3, 0.2, 0.5)
    held_out_fraction: float = 0.3  # enough held-out patients at one site for an encoder and for twins
    twins_per_patient: int = 4
    encoder_steps: int = 400


def prepare(out: Path, scale: Scale) -> dict[str, Path]:
    """Consortium, per-site stores and the pooled store (reused when present)."""
    from ecgtwin.data.prepare import prepare_store
    from ecgtwin.data.synthetic import synthesize_consortium

    if not (out / "consortium").is_dir():
        synthesize_consortium(out / "consortium", sites=scale.sites, patients_per_site=scale.patients_per_site,
                              records_per_patient=scale.records_per_patient, seed=scale.seed, progress=False)
    stores = {}
    for site_dir in sorted(p.parent for p in (out / "consortium").glob("*/metadata.csv")):
        store = out / "sites" / site_dir.name / "store"
        if not (store / "manifest.json").is_file():
            prepare_store("synthetic", site_dir, store, on_reject=lambda r: None, progress=False)
        stores[site_dir.name] = store
    pooled = out / "pooled-store"
    if not (pooled / "manifest.json").is_file():
        prepare_store("synthetic", out / "consortium", pooled, on_reject=lambda r: None, progress=False)
    stores["pooled"] = pooled
    return stores


def experiment_config(scale: Scale, injector: str = "adax"):
    config = load_config(CONFIG)
    config.data.held_out_fraction = scale.held_out_fraction
    config.model.dit.injector = injector
    return config


def train_centralised(out: Path, store: Path, scale: Scale, injector: str = "adax") -> Path:
    from ecgtwin.train.runner import train_stage

    config = experiment_config(scale, injector)
    for stage, rounds, steps in zip(STAGES, scale.rounds, scale.local_steps):
        getattr(config, stage).steps = rounds * steps
        train_stage(stage, config, store, out, progress=False)  # resumes / returns at once when finished
    return out


def train_federated(out: Path, stores: dict[str, Path], scale: Scale, epsilon: float | None) -> Path:
    """Flower simulation over site folders (ecgtwin.federation.simulate, as `ecgtwin federate`)."""
    try:
        from ecgtwin.federation import simulate
    except ImportError as error:  # pragma: no cover - depends on the federation work
        raise NotImplementedError(f"federated settings need ecgtwin.federation.simulate: {error}") from error
    model = out / "federation" / "model"
    if (model / "twin.safetensors").is_file():
        return model
    sites_root = out / "sites"
    for site, store in stores.items():
        if site == "pooled":
            continue
        site_dir = sites_root / site
        site_dir.mkdir(parents=True, exist_ok=True)
        if not (site_dir / "store").exists():
            (site_dir / "store").symlink_to(store.resolve())
        save_policy(site_policy(site, scale.rounds, scale.local_steps, scale.batch_patients, scale.budget_fractions,
                                private=epsilon is not None, epsilon=epsilon or 8.0, delta=1e-5),
                    site_dir / "privacy.yaml")
    config_path = out / "config.yaml"
    save_config(experiment_config(scale), config_path)
    run_config = {"config": str(config_path.resolve()), "out": str((out / "federation").resolve()),
                  "sites-root": str(sites_root.resolve()), "run-name": out.name, "strategy": "fedavg",
                  "min-nodes": min(2, scale.sites), "node-wait": 120.0,
                  **{f"rounds-{s}": r for s, r in zip(STAGES, scale.rounds)}}
    status = simulate(run_config, out / "federation" / "simulation.log")
    if status.get("status") != "finished":
        raise RuntimeError(f"federated training failed: {status.get('message')} (log: {out / 'federation'})")
    return model


def row(setting: str, m: dict) -> str:
    def f(x, digits=3):
        return "n/a" if x is None else f"{x:.{digits}f}"

    return (f"| {setting} | {f(m['fid'], 2)} | {f(m['precision'], 2)} / {f(m['recall'], 2)} / {f(m['f1'], 2)} | "
            f"{f(m['clip_score'])} | {f(m['hr_mae'], 1)} | {f(m['condition_accuracy'], 2)} | "
            f"{f(m['similarity'])} | {f(m['identification_top1'], 2)} |")


def run(setting: str, out: Path, scale: Scale = Scale()) -> dict:
    from ecgtwin.evaluate import run_evaluation

    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r} (one of {', '.join(SETTINGS)})")
    out = Path(out)
    started = time.perf_counter()
    stores = prepare(out, scale)
    sampler, steps, guidance = None, None, GUIDANCE
    if setting in ("centralised", "ddpm", "noguidance"):
        checkpoint = train_centralised(out / "centralised" / "ckpt", stores["pooled"], scale)
        sampler = "ddpm" if setting == "ddpm" else None
        guidance = 1.0 if setting == "noguidance" else GUIDANCE
    elif setting in ("adaln", "cross"):
        checkpoint = train_centralised(out / setting / "ckpt", stores["pooled"], scale, injector=setting)
    else:
        epsilon = {"federated": None, "dp8": 8.0, "dp3": 3.0}[setting]
        checkpoint = train_federated(out / setting, stores, scale, epsilon)
    trained = time.perf_counter()
    metrics = run_evaluation(checkpoint, stores[EVAL_SITE], out / setting / "eval",
                             twins_per_patient=scale.twins_per_patient, sampler=sampler, steps=steps,
                             guidance=guidance, encoder_steps=scale.encoder_steps,
                             encoder_cache=out / f"encoder-{EVAL_SITE}", progress=False)
    line = row(setting, metrics)
    (out / setting).mkdir(parents=True, exist_ok=True)
    (out / setting / "row.md").write_text(line + "\n")
    summary = {"setting": setting, "row": line, "scale": dataclasses.asdict(scale),
               "train_seconds": round(trained - started, 1), "eval_seconds": metrics["seconds"],
               "metrics": str(out / setting / "eval" / "metrics.json")}
    (out / setting / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", required=True, choices=SETTINGS)
    parser.add_argument("--out", required=True, type=Path, help="shared folder for all settings")
    parser.add_argument("--patients-per-site", type=int, default=Scale.patients_per_site)
    parser.add_argument("--twin-local-steps", type=int, default=Scale.local_steps[2],
                        help="twin-stage local steps per round (x 3 rounds; centralised: the total); default 300")
    args = parser.parse_args()
    steps = (*Scale.local_steps[:2], args.twin_local_steps)
    summary = run(args.setting, args.out, Scale(patients_per_site=args.patients_per_site, local_steps=steps))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
