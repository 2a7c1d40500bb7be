"""Does a twin follow the heart rate it is asked for? The HR part of the non-private ceiling.

For each checkpoint, guidance scale and request mode: twins of the earliest ECG of N patients of the given
stores, asked for each rate of REQUESTED_HR; the rate of every twin is measured from its R peaks (the evaluation's
detector) and regressed on the requested rate. A slope of 1 means the twin follows the request, 0 that it
ignores it. Two request modes tell the two conditioning paths apart:
  rate-only   the reference's own report and age/sex, only the HR of the patient vector changed;
  statement   a normal ECG's report in the sinus rhythm that agrees with the rate (marked
              sinus bradycardia / sinus bradycardia / sinus rhythm / sinus tachycardia) and that HR: how a
              clinician asks for a rate.

    python -m bench.hr_follow --checkpoint foundation=foundations/demo --checkpoint fine-tuned=CKPT \\
        --store STORE_A --store STORE_B --record
    python -m bench.hr_follow ... --which held-out --which training   # and the last checkpoint's own training
                                                                      # patients (does it underfit?)

Two diagnostics per checkpoint, on --probe-patients references: the HR error of the VAE's encode-decode alone,
and whether the IBE's base vector (the person, its condition removed) still predicts the reference's rate
(cross-validated R^2 of a ridge regression; near 0 = the rate is left to the condition, as ECGTwin intends).

--record writes bench/data/benchmarks/hr_follow.json; `python -m bench.tables` renders docs/benchmarks.md and
`python -m bench.hr_follow --plot` draws docs/hr_follow.png from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import RidgeCV
from sklearn.model_selection import cross_val_score

from ecgtwin.data.signal import heart_rate
from ecgtwin.data.split import split_patients
from ecgtwin.data.store import SiteStore
from ecgtwin.models import LATENT_SCALE
from ecgtwin.twin import Condition, Reference, TwinGenerator, reference_from_store

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data" / "benchmarks" / "hr_follow.json"
REQUESTED_HR = (45.0, 60.0, 75.0, 90.0, 110.0, 130.0)
MODES = ("rate-only", "statement")


def rhythm_statement(hr: float) -> str:
    """The synthetic population's own report for a normal ECG in sinus rhythm at this rate."""
    if hr < 50.0:
        return "Marked sinus bradycardia. Borderline ECG."
    if hr < 60.0:
        return "Sinus bradycardia. Otherwise normal ECG."
    if hr > 100.0:
        return "Sinus tachycardia. Otherwise normal ECG."
    return "Sinus rhythm. Normal ECG."


def request(reference: Reference, hr: float, mode: str) -> Condition:
    own = reference.condition
    report = own.report if mode == "rate-only" else rhythm_statement(hr)
    return Condition(report, hr, own.age, own.sex)


def references(stores: list[Path], patients: int, which: str, held_out_fraction: float, seed: int) -> list[Reference]:
    """The earliest ECG of up to `patients` patients, drawn evenly over the stores from one side of the split."""
    chosen: list[Reference] = []
    per_store = -(-patients // len(stores))
    for path in stores:
        store = SiteStore(path)
        train, held = split_patients(store.patients, held_out_fraction, seed)
        pool = held if which == "held-out" else train
        chosen += [reference_from_store(store, int(store.records_of(p)[0])) for p in pool[:per_store]]
    return chosen[:patients]


def follow(measured: np.ndarray, requested: np.ndarray, reference_hr: np.ndarray) -> dict:
    """How the measured rate depends on the requested one (slope) and on the reference's own rate
    (measured ~ a * requested + b * reference + c: a = follows the request, b = keeps the person's rate),
    the MAE, and the MAE a twin that kept its reference's rate would score."""
    ok = np.isfinite(measured) & np.isfinite(reference_hr)
    slope = np.polyfit(requested[ok], measured[ok], 1)[0] if ok.sum() >= 2 else np.nan
    design = np.column_stack([requested[ok], reference_hr[ok], np.ones(ok.sum())])
    (a, b, _), *_ = np.linalg.lstsq(design, measured[ok], rcond=None) if ok.sum() >= 3 else ((np.nan,) * 3,)
    by_rate = {f"{hr:g}": round(float(np.nanmedian(measured[requested == hr])), 1) for hr in np.unique(requested)
               if np.isfinite(measured[requested == hr]).any()}
    return {"slope": round(float(slope), 3), "follows_request": round(float(a), 3),
            "keeps_reference": round(float(b), 3),
            "hr_mae_bpm": round(float(np.abs(measured[ok] - requested[ok]).mean()), 2),
            "hr_mae_keep_reference_bpm": round(float(np.abs(reference_hr[ok] - requested[ok]).mean()), 2),
            "measured_share": round(float(np.isfinite(measured).mean()), 3), "median_measured_by_requested": by_rate,
            "twins": int(len(measured))}


def vae_round_trip(generator: TwinGenerator, refs: list[Reference]) -> dict:
    """HR error the VAE alone adds: the references' rate against the rate of their encode-decode."""
    with torch.no_grad():
        x = torch.tensor(np.stack([r.signal for r in refs]), dtype=torch.float32, device=generator.device)
        latents = generator.vae.encode(x)[0] * LATENT_SCALE
        decoded = generator.decode(latents)
    real = np.array([heart_rate(r.signal, r.fs) for r in refs])
    back = np.array([heart_rate(d, refs[0].fs) for d in decoded])
    ok = np.isfinite(real) & np.isfinite(back)
    return {"vae_round_trip_hr_mae_bpm": round(float(np.abs(real[ok] - back[ok]).mean()), 2)}


def base_vector_probe(generator: TwinGenerator, refs: list[Reference]) -> dict:
    """Does the IBE's base vector (the person, condition removed) still carry the reference's rate?
    Cross-validated R^2 of a ridge regression of the reference HR on the base vector."""
    hr = np.array([heart_rate(r.signal, r.fs) for r in refs])
    ok = np.isfinite(hr)
    bases = np.stack([generator.base_vector(r)[0].cpu().numpy() for r, keep in zip(refs, ok) if keep])
    scores = cross_val_score(RidgeCV(alphas=np.logspace(-3, 3, 13)), bases, hr[ok], cv=5, scoring="r2")
    return {"base_vector_hr_r2": round(float(np.mean(scores)), 3), "probe_references": int(ok.sum())}


def measure(generator: TwinGenerator, refs: list[Reference], mode: str, guidance: float, twins: int,
            rates: tuple[float, ...], batch_size: int, seed: int) -> dict:
    requests = [(ref, request(ref, hr, mode)) for ref in refs for hr in rates]
    started = time.perf_counter()
    out = generator.generate_batch(requests, n=twins, batch_size=batch_size, guidance_condition=guidance, seed=seed)
    seconds = time.perf_counter() - started
    fs = generator.preprocess.fs
    measured = np.array([heart_rate(t, fs) for arm in out for t in arm])
    requested = np.repeat([target.hr for _, target in requests], twins)
    reference_hr = np.array([heart_rate(ref.signal, ref.fs) for ref, _ in requests for _ in range(twins)])
    return {**follow(measured, requested, reference_hr), "twins_per_s": round(len(measured) / seconds, 2)}


def run(checkpoints: dict[str, Path], stores: list[Path], patients: int, sides: list[str], guidances: list[float],
        twins: int, rates: tuple[float, ...], batch_size: int, seed: int, probe_patients: int = 300) -> dict:
    rows = []
    split = TwinGenerator(list(checkpoints.values())[-1]).config.data  # one set of references for every checkpoint
    refs = {side: references(stores, patients, side, split.held_out_fraction, split.split_seed) for side in sides}
    probe_refs = references(stores, probe_patients, "held-out", split.held_out_fraction, split.split_seed)
    diagnostics = {}
    for name, path in checkpoints.items():
        generator = TwinGenerator(path)
        diagnostics[name] = {**vae_round_trip(generator, probe_refs), **base_vector_probe(generator, probe_refs)}
        print(name, diagnostics[name], file=sys.stderr, flush=True)
        for side in sides:
            for guidance in guidances:
                for mode in MODES:
                    row = {"checkpoint": name, "patients": side, "guidance": guidance, "mode": mode,
                           **measure(generator, refs[side], mode, guidance, twins, rates, batch_size, seed)}
                    print(row, file=sys.stderr, flush=True)
                    rows.append(row)
    return {"patients": patients, "sides": sides, "twins_per_request": twins, "requested_hr": list(rates),
            "checkpoints": {k: str(v) for k, v in checkpoints.items()}, "stores": [str(s) for s in stores],
            "sampler": "the checkpoint config's", "diagnostics": diagnostics, "rows": rows}


def plot(data: Path = DATA, png: Path = ROOT / "docs" / "hr_follow.png") -> Path:
    """Median measured against requested rate, one panel per checkpoint, one line per guidance (statement
    requests, held-out references), with the identity line a perfect twin would follow."""
    from ecgtwin.plot import new_figure

    result = json.loads(data.read_text())
    rows = [r for r in result["rows"] if r["mode"] == "statement" and r.get("patients", "held-out") == "held-out"]
    names = list(dict.fromkeys(r["checkpoint"] for r in rows))
    fig = new_figure(figsize=(4 * len(names), 4))
    axes = np.atleast_1d(fig.subplots(1, len(names), sharey=True))
    rates = np.array(result["requested_hr"])
    for ax, name in zip(axes, names):
        ax.plot(rates, rates, color="0.6", ls="--", lw=1, label="requested")
        for r in (r for r in rows if r["checkpoint"] == name):
            measured = [r["median_measured_by_requested"].get(f"{hr:g}", np.nan) for hr in rates]
            ax.plot(rates, measured, marker="o", label=f"guidance {r['guidance']:g}")
        ax.set(title=name, xlabel="requested HR, bpm")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("median measured HR of the twins, bpm")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    return png


def _named(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: write NAME=PATH")
    return name, Path(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hr_follow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=_named, action="append", help="NAME=PATH, repeatable")
    parser.add_argument("--store", type=Path, action="append", help="site store(s) of the references")
    parser.add_argument("--patients", type=int, default=24, help="references (default 24)")
    parser.add_argument("--which", choices=["held-out", "training"], action="append",
                        help="which side of the last checkpoint's patient split the references come from "
                             "(repeatable; default held-out)")
    parser.add_argument("--guidance", type=float, action="append", help="condition guidance scales (default 1, 2, 4)")
    parser.add_argument("--twins", type=int, default=2, help="twins per (reference, rate)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probe-patients", type=int, default=300,
                        help="references for the VAE round trip and the base-vector probe (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rates", type=lambda t: tuple(float(x) for x in t.split(",")), default=REQUESTED_HR,
                        help="requested rates, comma-separated (default " + ",".join(f"{r:g}" for r in REQUESTED_HR) + ")")
    parser.add_argument("--name", default="hr_follow", choices=("hr_follow", "hr_follow_range"),
                        help="the record: hr_follow (the default rates) or hr_follow_range (the issue's 40-150 bpm)")
    parser.add_argument("--record", action="store_true", help="write bench/data/benchmarks/NAME.json")
    parser.add_argument("--plot", action="store_true", help="only draw docs/hr_follow.png from the committed JSON")
    args = parser.parse_args(argv)
    if args.plot:
        print(plot())
        return 0
    if not args.checkpoint or not args.store:
        parser.error("--checkpoint and --store are required (unless --plot)")
    result = {"machine": {"machine": platform.machine(), "python": platform.python_version()},
              **run(dict(args.checkpoint), args.store, args.patients, args.which or ["held-out"], args.guidance or [1.0, 2.0, 4.0],
                    args.twins, args.rates, args.batch_size, args.seed, args.probe_patients)}
    if args.record:
        from bench.tables import record_benchmark

        print(f"recorded in {record_benchmark(args.name, result, ' '.join([parser.prog, *(argv or sys.argv[1:])]))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
