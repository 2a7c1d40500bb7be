"""The `ecgtwin` command line: one subcommand per job, `--json` for machine-readable summaries."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from ecgtwin import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        summary = args.run(args)
    except (FileNotFoundError, ValueError) as error:  # user errors: one clear line, no traceback
        print(f"ecgtwin {args.command}: error: {error}", file=sys.stderr)
        return 1
    emit(summary, args.json)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ecgtwin",
        description="Federated, differentially private ECG digital twins (ECGTwin + DiffuSETS).",
    )
    parser.add_argument("--version", action="version", version=f"ecgtwin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in (_add_synth, _add_prepare, _add_demo):
        register(sub)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (progress goes to stderr)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _add_synth(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write the built-in synthetic consortium (WFDB records + metadata.csv per site)",
        description="Simulate hospitals whose patients have persistent individual traits, each recorded "
        "several times under different conditions, with machine-style reports. See docs/synthetic.md.",
    )
    p.add_argument("--out", required=True, type=Path, help="folder to write; one sub-folder per site")
    p.add_argument("--sites", type=int, default=3, help="number of hospitals (default 3)")
    p.add_argument("--patients-per-site", type=int, default=20, help="patients at each hospital (default 20)")
    p.add_argument("--records-per-patient", type=int, default=3, help="recordings of each patient (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed; the same seed writes the same files")
    p.add_argument("--fs", type=float, default=500.0, help="sampling rate in Hz (default 500)")
    p.add_argument("--duration", type=float, default=10.0, help="record length in seconds (default 10)")
    _common(p)
    p.set_defaults(run=_run_synth)


def _run_synth(args: argparse.Namespace) -> dict:
    from ecgtwin.data.synthetic import synthesize_consortium

    for name in ("sites", "patients_per_site", "records_per_patient"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    return synthesize_consortium(
        args.out, sites=args.sites, patients_per_site=args.patients_per_site,
        records_per_patient=args.records_per_patient, seed=args.seed, fs=args.fs,
        duration_s=args.duration, progress=not args.no_progress,
    )


def _add_prepare(sub: argparse._SubParsersAction) -> None:
    from ecgtwin.data.readers import SOURCES

    p = sub.add_parser(
        "prepare",
        help="build a site store (training-ready arrays + metadata grouped by patient) from a dataset",
        description="Read a dataset, resample every record to the model representation, reject unusable "
        "records with a reason (one line each on stderr, all of them in STORE/rejected.csv), and write the "
        "store atomically: rerunning replaces it only once the new one is complete.",
    )
    p.add_argument("--source", required=True, choices=sorted(SOURCES), help="dataset layout of --root")
    p.add_argument("--root", required=True, type=Path, help="the dataset folder (for synthetic: a site folder or the consortium)")
    p.add_argument("--out", required=True, type=Path, help="the store folder to write")
    p.add_argument("--rate", type=int, default=500, choices=[100, 500], help="PTB-XL only: read records100 or records500")
    p.add_argument("--window", type=float, default=10.0, help="wfdb only: cut long records into windows of this many seconds")
    p.add_argument("--samples", type=int, default=1024, help="samples per record in the store (default 1024, as both papers)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per record in the store (default 10)")
    p.add_argument("--no-baseline-removal", action="store_true", help="keep baseline wander (default: 0.5 Hz zero-phase high-pass)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes (default: up to 4)")
    p.add_argument("--quiet-rejects", action="store_true", help="do not print each rejected record (they stay in rejected.csv)")
    _common(p)
    p.set_defaults(run=_run_prepare)


def _run_prepare(args: argparse.Namespace) -> dict:
    from ecgtwin.data.prepare import prepare_store
    from ecgtwin.data.preprocess import PreprocessConfig

    config = PreprocessConfig(n_samples=args.samples, duration_s=args.duration,
                              baseline_removal=not args.no_baseline_removal)
    options: dict[str, object] = {}
    if args.source == "ptbxl":
        options["rate"] = args.rate
    if args.source == "wfdb":
        options["window_s"] = args.window
    on_reject: Callable | None = (lambda item: None) if args.quiet_rejects else None
    return prepare_store(args.source, args.root, args.out, config=config, workers=args.workers,
                         progress=not args.no_progress, on_reject=on_reject, **options)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the embedded default end to end on the built-in synthetic consortium",
        description="Synthesize a small consortium, prepare each site's store, and write a report with "
        "figures to --out (what `make demo` runs).",
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    p.add_argument("--sites", type=int, default=3, help="hospitals in the consortium (default 3)")
    p.add_argument("--patients-per-site", type=int, default=20, help="patients per hospital (default 20)")
    p.add_argument("--records-per-patient", type=int, default=3, help="recordings per patient (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    _common(p)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> dict:
    from ecgtwin.demo import DemoConfig, run_demo

    config = DemoConfig(sites=args.sites, patients_per_site=args.patients_per_site,
                        records_per_patient=args.records_per_patient, seed=args.seed)
    report = run_demo(args.out, config, progress=not args.no_progress)
    if args.json:
        return report
    rows = {site: f"{s['records_kept']} kept / {s['records_read']} read, {s['patients']} patients "
                  f"({s['patients_with_multiple_records']} with several ECGs), rejected {s['rejected_total']}"
            for site, s in report["stores"].items()}
    return {**rows, "report": str(Path(args.out) / "report.json"), "figures": str(Path(args.out) / "figures")}


def emit(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary, indent=2, default=str))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "none"
        print(f"{key:>32}: {value}")


if __name__ == "__main__":
    raise SystemExit(main())
