"""How much signal does a DP step of the twin stage carry? The per-step signal-to-noise ratio per fine-tuning mode.

A DP-SGD step moves the weights along the mean of the clipped per-patient gradients plus Gaussian noise. Its
expected signal is mu = E[clip(g_i)], of norm at most C; its noise is the DP noise (norm sigma C sqrt(d) / E
over d trainable coordinates and an expected batch E) plus the batch's own sampling noise
(sqrt(tr Sigma / E)). This tool measures mu and tr Sigma from the foundation's per-patient gradients, one
backward per patient through the same per-patient loss a DP pass uses (ecgtwin.train.private.private_stage),
clipped to the policy's C, and puts them next to the DP noise each recorded privacy-utility plan drew:

    python -m bench.dp_signal --store REFERENCE_STORE --out ds/ --record

--record writes bench/data/benchmarks/dp_signal.json; `python -m bench.tables` renders it in docs/privacy.md.
The store is the bench's public reference population (no site's patient is in it), so a clipping norm
chosen from these figures costs no site any privacy; a site's own store works too, for a developer.

|mu| is estimated without the bias of a finite sample: E|mean|^2 = |mu|^2 + tr Sigma / P, so
|mu|^2 ~ (P |mean|^2 - mean_i |g_i|^2) / (P - 1).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data" / "benchmarks" / "dp_signal.json"
ROWS = ROOT / "bench" / "data" / "privacy_utility.json"
CONFIG = ROOT / "configs" / "demo.yaml"
FOUNDATION = ROOT / "foundations" / "demo"
MODES = ("all", "modules", "condition", "bias", "lora")


def patient_gradients(stage, patients: int, step: int = 0) -> np.ndarray:
    """[P, d] the gradients of the first `patients` patients of `stage` (a PrivateStage), one record each, as a
    DP step with records_per_patient 1 computes them before clipping."""
    params = [p for p in stage.module.parameters() if p.requires_grad]
    stage.module.train()
    rows = []
    for pid, items in stage.units[:patients]:
        for p in params:
            p.grad = None
        loss, _ = stage.unit_loss([(pid, items[:1])], step)
        loss.sum().backward()
        rows.append(torch.cat([p.grad.reshape(-1) for p in params]).double().numpy())
    return np.stack(rows)


def clip_rows(grads: np.ndarray, clip: float) -> np.ndarray:
    """Each row scaled to norm at most `clip`, as the DP optimizer clips a patient's gradient."""
    norms = np.linalg.norm(grads, axis=1, keepdims=True)
    return grads * np.minimum(1.0, clip / np.maximum(norms, 1e-12))


def signal(grads: np.ndarray, clip: float) -> dict:
    """|mu| (unbiased), tr Sigma, the mean per-patient norm, in units of the gradients (already clipped)."""
    p = len(grads)
    mean = grads.mean(0)
    sq = float((grads ** 2).sum(1).mean())
    mu2 = max(0.0, (p * float(mean @ mean) - sq) / (p - 1))
    return {"signal_norm": math.sqrt(mu2), "trace_sigma": max(0.0, sq - mu2), "patients": p, "max_grad_norm": clip,
            "mean_clipped_norm": float(np.linalg.norm(grads, axis=1).mean())}


def plans(rows: dict) -> list[dict]:
    """The DP plans the 2,000-patient, 3-site privacy-utility rows drew: epsilon, expected batch, twin steps and
    the twin's noise on the mean update in units of C (sigma / E), one per distinct plan."""
    seen = {}
    for r in rows.values():
        row = r["row"]
        if row["patients_per_site"] != 2000 or row["epsilon"] is None or row.get("sites", 3) != 3 \
                or row.get("data", "synthetic") != "synthetic" or not r.get("noise_on_mean_update"):
            continue
        steps = r["rounds"][2] * r["local_steps"][2]
        key = (row["epsilon"], row["batch_patients"], steps, row.get("max_grad_norm", 1.0))
        # sigma / E: the plan's noise in units of C, whatever C its sites clipped at
        seen[key] = {"epsilon": row["epsilon"], "batch_patients": row["batch_patients"], "twin_steps": steps,
                     "max_grad_norm": row.get("max_grad_norm", 1.0),
                     "noise_on_mean": r["noise_on_mean_update"]["twin"] / row.get("max_grad_norm", 1.0)}
    return sorted(seen.values(), key=lambda p: (-p["max_grad_norm"], -p["epsilon"], p["batch_patients"]))


def snr(measured: dict, parameters: int, plan: dict | None, batch: int) -> float:
    """Signal over noise of one step's mean update: |mu| / sqrt(DP noise^2 + the batch's sampling noise^2)."""
    dp = 0.0 if plan is None else plan["noise_on_mean"] * measured["max_grad_norm"] * math.sqrt(parameters)
    return measured["signal_norm"] / math.sqrt(dp ** 2 + measured["trace_sigma"] / batch)


def run(store_path: Path, out: Path, patients: int, clips: list[float]) -> dict:
    from bench.weight_movement import chosen_modules
    from ecgtwin.checkpoint import Checkpoint
    from ecgtwin.config import STAGES, load_config
    from ecgtwin.data.store import SiteStore
    from ecgtwin.privacy import PrivacyPolicy
    from ecgtwin.train.private import private_stage
    from ecgtwin.train.randomness import PatientRandomness
    from ecgtwin.train.result import pass_rows
    from ecgtwin.weights import start_from

    store = SiteStore(store_path)
    policy = PrivacyPolicy(site="signal", epsilon=8.0, population=max(patients, 1), seed=0)
    recorded = plans(json.loads(ROWS.read_text())["rows"])
    foundation = {s: Checkpoint(FOUNDATION).load_arrays(s) for s in STAGES}
    rows = pass_rows(store, load_config(CONFIG), None)  # the same patients for every mode
    ids = store.records.patient_id.to_numpy()[rows]
    rows = rows[np.isin(ids, sorted(set(ids))[:patients])]
    results = []
    for mode in MODES:
        config = load_config(CONFIG)
        config.twin.trainable = mode
        config.twin.trainable_modules = chosen_modules("twin") if mode == "modules" else []
        weights = {s: start_from(s, config, foundation[s]) for s in STAGES}
        started = time.perf_counter()
        stage = private_stage("twin", config, store, rows, weights, policy, PatientRandomness.from_seed(0, "signal", "twin", 1),
                              out / "cache")
        d = sum(p.numel() for p in stage.module.parameters() if p.requires_grad)
        raw = patient_gradients(stage, patients)
        norms = np.linalg.norm(raw, axis=1)
        for clip in clips:
            measured = signal(clip_rows(raw, clip), clip)
            entry = {"mode": mode, "parameters": d, **measured, "median_norm_before_clipping": float(np.median(norms)),
                     "share_clipped": float((norms > clip).mean()), "seconds": round(time.perf_counter() - started, 1),
                     "snr_non_private_32": snr(measured, d, None, 32), "plans": []}
            for plan in (p for p in recorded if p["max_grad_norm"] == clip):
                step = snr(measured, d, plan, plan["batch_patients"])
                entry["plans"].append({**plan, "dp_noise_norm": plan["noise_on_mean"] * clip * math.sqrt(d),
                                       "snr_step": step, "snr_plan": step * math.sqrt(plan["twin_steps"])})
            results.append(entry)
            print(f"{mode} C {clip:g}: d={d} |mu|/C={measured['signal_norm'] / clip:.4f} "
                  f"median |g|/C={np.median(norms) / clip:.2f} clipped {entry['share_clipped']:.0%} "
                  + " ".join(f"eps{p['epsilon']:g}/b{p['batch_patients']}/T{p['twin_steps']}: {p['snr_plan']:.2f}"
                             for p in entry["plans"]), file=sys.stderr)
    return {"store": store_path.name, "patients": patients, "max_grad_norms": clips, "modes": results,
            "provenance": f"measured by `python -m bench.dp_signal --patients {patients}` on "
                          f"{time.strftime('%Y-%m-%d')}, {platform.machine()}, "
                          f"{torch.get_num_threads()} threads (written by --record)"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", type=Path, required=True,
                        help="a prepared store: the bench's public reference population (OUT/n2000/reference-store)")
    parser.add_argument("--out", type=Path, default=Path("dp-signal"))
    parser.add_argument("--patients", type=int, default=256)
    parser.add_argument("--max-grad-norm", type=lambda t: [float(x) for x in t.split(",")], default=[1.0, 0.3],
                        help="the clipping norms C to measure at, comma-separated (default 1,0.3: the rows' Cs)")
    parser.add_argument("--record", action="store_true", help=f"write {DATA.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if not (args.store / "manifest.json").is_file():
        parser.error(f"--store {args.store}: not a prepared store (no manifest.json)")
    if args.patients < 2:
        parser.error("--patients: at least 2 (the signal's estimate needs two)")
    args.out.mkdir(parents=True, exist_ok=True)
    result = run(args.store, args.out, args.patients, args.max_grad_norm)
    (args.out / "dp_signal.json").write_text(json.dumps(result, indent=2))
    if args.record:
        DATA.write_text(json.dumps(result, indent=2) + "\n")
        print(f"recorded in {DATA}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
