"""The `ecgtwin` command line: one subcommand per job, `--json` for machine-readable summaries."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

from ecgtwin import __version__
from ecgtwin.errors import UserError, MissingInput


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    try:
        summary = args.run(args)
    except UserError as error:  # the user can fix it: one clear line; anything else is a bug and keeps its traceback
        if args.debug:
            raise
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
    parser.add_argument("--debug", action="store_true", help="show the traceback of user errors too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in (_add_synth, _add_prepare, _add_train, _add_generate, _add_cohort, _add_demo, _add_privacy,
                     _add_federate, _add_evaluate, _add_export, _add_pretrain):
        register(sub)
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the summary as JSON on stdout (progress goes to stderr)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


DISPLAY_FLAGS = ("--no-progress", "--json")  # change what is shown, never what is made


def _device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present, else the CPU) | cpu | cuda | cuda:N")


def _compute(p: argparse.ArgumentParser) -> None:
    from ecgtwin.compute import PRECISIONS

    p.add_argument("--precision", choices=PRECISIONS, help="the forward passes' precision (default: the "
                   "config's compute.precision, fp32); bf16 autocasts them, DP clipping and noise stay fp32")
    p.add_argument("--compile", action="store_true", default=None,
                   help="torch.compile the model (generation and non-private training; default: the config's)")


def _with_compute(config, args: argparse.Namespace):
    """The config with the command line's --precision / --compile over its compute section."""
    if args.precision is not None:
        config.compute.precision = args.precision
    if args.compile is not None:
        config.compute.compile = args.compile
    return config


def resolve_device(spec: str):
    from ecgtwin.device import resolve_device as resolve  # torch is imported only by commands that compute

    return resolve(spec)


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
            raise UserError(f"--{name.replace('_', '-')} must be at least 1")
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


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train one stage (vae, ibe, twin) on one site's store, non-private",
        description="Train a stage into a checkpoint folder: weights as safetensors, the config, loss curves "
        "(JSONL + PNG). Stages build on each other: vae first, then ibe (needs the VAE), then twin (needs both). "
        "Rerunning after an interruption resumes from the last checkpoint.",
    )
    p.add_argument("--config", required=True, type=Path, help="experiment YAML (e.g. configs/demo.yaml)")
    p.add_argument("--stage", required=True, choices=["vae", "ibe", "twin"], help="which model to train")
    p.add_argument("--store", required=True, type=Path, help="site store from `ecgtwin prepare`")
    p.add_argument("--out", required=True, type=Path, help="checkpoint folder (shared by the three stages)")
    p.add_argument("--steps", type=int, help="override the stage's number of optimiser steps")
    p.add_argument("--foundation", type=Path, help="start from this `ecgtwin pretrain` folder's weights (earlier "
                   "stages the checkpoint lacks are taken from it, frozen)")
    p.add_argument("--policy", type=Path, help="train with patient-level DP-SGD under this site privacy policy: the "
                   "policy's rounds x local steps of the stage, each round charged to the ledger beside it")
    _device(p)
    _compute(p)
    _common(p)
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> dict:
    from ecgtwin.config import load_config
    from ecgtwin.train.centralised import train_stage

    config = _with_compute(load_config(args.config), args)
    if args.steps is not None:
        if args.steps < 1:
            raise UserError("--steps must be at least 1")
        getattr(config, args.stage).steps = args.steps
    if args.policy is not None:
        if args.steps is not None:
            raise UserError("--steps: with --policy the site's privacy policy sets the local steps (its "
                            "stages.<stage>.local_steps); change them there")
        return _train_private(args, config)
    return train_stage(args.stage, config, args.store, args.out, progress=not args.no_progress,
                       foundation=args.foundation, device=resolve_device(args.device))


def _train_private(args: argparse.Namespace, config) -> dict:
    from ecgtwin.site import train_with_policy

    return train_with_policy(args.stage, config, args.store, args.policy, args.out, progress=not args.no_progress,
                             foundation=args.foundation, device=str(resolve_device(args.device)))


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from ecgtwin.models.diffusion import SAMPLERS

    p = sub.add_parser(
        "generate",
        help="generate digital twins of the person in a reference ECG under a target condition",
        description="Read a reference record (any WFDB record the readers understand), take the person from it "
        "and generate N twins showing the target report and patient information. Writes WFDB records and a PNG "
        "on ECG paper (25 mm/s, 10 mm/mV) with the reference beside the twins.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder with vae, ibe and twin weights")
    p.add_argument("--reference", required=True, type=Path, help="reference WFDB record (path without or with .hea)")
    p.add_argument("--reference-report", help="the reference's own report (default: its header's Report/Dx line)")
    p.add_argument("--report", help="target report; default: the reference's report with the edits below")
    p.add_argument("--add-statement", action="append", default=[], metavar="TEXT",
                   help="condition editing: add a statement to the reference's report (repeatable)")
    p.add_argument("--swap-statement", action="append", default=[], metavar="OLD=NEW",
                   help="condition editing: replace one of the reference's statements (repeatable)")
    p.add_argument("--remove-statement", action="append", default=[], metavar="TEXT",
                   help="condition editing: drop one of the reference's statements (repeatable)")
    p.add_argument("--hr", type=float, help="target heart rate in bpm (default: the reference's measured HR)")
    p.add_argument("--age", type=float, help="target age in years (default: the reference's)")
    p.add_argument("--sex", choices=["F", "M"], help="target sex (default: the reference's)")
    p.add_argument("-n", "--num", type=int, default=4, help="number of twins (default 4)")
    p.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: the config's, dpm++)")
    p.add_argument("--steps", type=int, help="sampling steps for ddim/dpm++ (default: the config's, 25)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale for the condition (1 = none)")
    p.add_argument("--person-guidance", type=float, help="classifier-free guidance scale for the person (1 = none)")
    p.add_argument("--out-fs", type=float, help="sampling rate of the written twins (default 500 Hz)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same twins")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _device(p)
    _compute(p)
    _common(p)
    p.set_defaults(run=_run_generate)


def _run_generate(args: argparse.Namespace) -> dict:
    from ecgtwin.twin import Condition, TwinGenerator, edit_report, read_reference, write_twins

    if args.num < 1:
        raise UserError("-n must be at least 1")
    generator = TwinGenerator(args.checkpoint, device=resolve_device(args.device), precision=args.precision,
                              compile=args.compile)
    reference = read_reference(args.reference, generator.preprocess, args.reference_report)
    ref = reference.condition
    report = args.report if args.report is not None else edit_report(
        ref.report, args.add_statement, args.swap_statement, args.remove_statement)
    target = Condition(report, args.hr if args.hr is not None else ref.hr,
                       args.age if args.age is not None else ref.age, args.sex or ref.sex).validate()
    twins = generator.generate(reference, target, n=args.num, sampler=args.sampler, steps=args.steps,
                               guidance_condition=args.guidance, guidance_person=args.person_guidance,
                               seed=args.seed, progress=not args.no_progress)
    settings = generator.config.generate
    notes = [f"Sampler: {args.sampler or settings.sampler}, {args.steps or settings.steps} steps, seed {args.seed}"]
    rows = write_twins(args.out, twins, generator.preprocess.fs, reference, target,
                       out_fs=args.out_fs or settings.out_fs, notes=notes)
    return {"reference": str(args.reference), "reference_report": ref.report, "target_report": target.report,
            "hr_requested": target.hr, "twins": rows, "picture": str(args.out / "twin.png")}


def _add_cohort(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "cohort",
        help="batch mode: twins of many patients of a site store under many target conditions",
        description="For each chosen patient of the store (its earliest ECG is the reference) and each target "
        "report, generate N twins. Writes OUT/<patient>/*.hea/.dat, a picture per patient and OUT/cohort.csv.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder with vae, ibe and twin weights")
    p.add_argument("--store", required=True, type=Path, help="the site store holding the reference ECGs")
    p.add_argument("--report", action="append", required=True, metavar="TEXT",
                   help="a target report (repeatable: one cohort arm per report)")
    p.add_argument("--patients", type=int, default=10, help="how many patients (default 10; the first by id)")
    p.add_argument("-n", "--num", type=int, default=2, help="twins per patient and report (default 2)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the config's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale for the condition")
    p.add_argument("--person-guidance", type=float, help="classifier-free guidance scale for the person (1 = none)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--batch-size", type=int, default=64,
                   help="twins sampled together, across patients and reports (default 64; larger on a GPU)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    _device(p)
    _compute(p)
    _common(p)
    p.set_defaults(run=_run_cohort)


def _run_cohort(args: argparse.Namespace) -> dict:
    from ecgtwin.twin import generate_cohort

    return generate_cohort(args.checkpoint, args.store, args.report, args.out, patients=args.patients,
                           n=args.num, steps=args.steps, guidance_condition=args.guidance,
                           guidance_person=args.person_guidance, seed=args.seed,
                           progress=not args.no_progress, device=resolve_device(args.device),
                           batch_size=args.batch_size, precision=args.precision, compile=args.compile)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run the embedded default end to end on the built-in synthetic consortium",
        description="Start from the public foundation (foundations/demo), synthesize a consortium, prepare each "
        "site's store and privacy policy (DP, epsilon 8), fine-tune the IBE and the twin model with DP-SGD "
        "federated in Flower's simulation engine (the VAE frozen), generate twins of a few patients of one site "
        "under new conditions, and write a report with figures to --out (what `make demo` runs).",
    )
    p.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default demo-output)")
    p.add_argument("--sites", type=int, default=3, help="hospitals in the consortium (default 3)")
    p.add_argument("--patients-per-site", type=int, default=200, help="patients per hospital (default 200)")
    p.add_argument("--records-per-patient", type=int, default=3, help="recordings per patient (default 3)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--config", type=Path, help="experiment YAML for the training (default: configs/demo.yaml)")
    p.add_argument("--foundation", type=Path, help="the public foundation to fine-tune (default: foundations/demo)")
    _common(p)
    p.set_defaults(run=_run_demo)


def _run_demo(args: argparse.Namespace) -> dict:
    from ecgtwin.demo import DemoConfig, run_demo

    config = DemoConfig(sites=args.sites, patients_per_site=args.patients_per_site,
                        records_per_patient=args.records_per_patient, seed=args.seed,
                        **({"config": args.config.resolve()} if args.config else {}),
                        **({"foundation": args.foundation.resolve()} if args.foundation else {}))
    report = run_demo(args.out, config, progress=not args.no_progress)
    if args.json:
        return report
    rows = {site: f"{s['records_kept']} kept / {s['records_read']} read, {s['patients']} patients "
                  f"({s['patients_with_multiple_records']} with several ECGs), rejected {s['rejected_total']}"
            for site, s in report["stores"].items()}
    epsilon = {site: f"{p['epsilon_spent']:.3f} of {p['epsilon_budget']:g}" for site, p in report["privacy"].items()}
    return {**rows, "epsilon_spent": epsilon, "twin_hr_mae_bpm": report["twin_hr_mae_bpm"],
            "personal": report["personal"],
            "report": str(Path(args.out) / "report.md"),
            "figures": str(Path(args.out) / "figures")}


def _add_privacy(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("privacy", help="a site's privacy budget: plan it, read its ledger, audit a model",
                       description="Differential privacy per PATIENT at a site; see docs/privacy.md.")
    cmds = p.add_subparsers(dest="privacy_command", metavar="ACTION", required=True)
    plan = cmds.add_parser("plan", help="noise multiplier and expected epsilon of each stage for a policy on a store",
                           description="Plan the site's budget: for the planned rounds and local steps of each "
                           "stage, the noise multiplier it needs and the epsilon spent after it. Refuses a plan "
                           "that cannot meet the budget.")
    plan.add_argument("--policy", required=True, type=Path, help="the site privacy policy (privacy.yaml)")
    plan.add_argument("--store", required=True, type=Path, help="the site store (its patient count sets the sampling rate)")
    plan.add_argument("--config", type=Path, help="experiment YAML (for the held-out split; default settings otherwise)")
    _common(plan)
    plan.set_defaults(run=_run_privacy_plan)
    ledger = cmds.add_parser("ledger", help="every release of the site with the epsilon spent so far, and a plot",
                             description="Read the append-only ledger DIR/ledger.jsonl and plot epsilon spent "
                             "over the site's DP-SGD steps (DIR/ledger.png).")
    ledger.add_argument("--site", required=True, type=Path, help="site folder holding privacy.yaml and ledger.jsonl")
    ledger.add_argument("--figure", type=Path, help="where to write the plot (default DIR/ledger.png)")
    _common(ledger)
    ledger.set_defaults(run=_run_privacy_ledger)
    audit = cmds.add_parser("audit", help="privacy audit: an empirical epsilon lower bound (canary) or a "
                            "membership-inference attack (loss)",
                            description="--method canary (default): put M crafted canary patients into the site's "
                            "training set, each with probability 1/2, train all three stages through the site with "
                            "DP-SGD at --epsilon and again without noise, and turn the guesses of which canaries "
                            "were in into an empirical epsilon lower bound at 95 %% confidence. --method loss: train "
                            "a VAE on half of the store's patients without DP (overfit) and with DP-SGD; attack both "
                            "(loss and calibrated loss); report ROC AUC and TPR at low FPR. The results are for the "
                            "privacy officer, not for release.")
    audit.add_argument("--method", choices=["canary", "loss"], default="canary", help="audit method (default canary)")
    audit.add_argument("--canaries", type=int, default=64, help="canary patients (canary method; default 64)")
    audit.add_argument("--store", required=True, type=Path, help="the site store to audit on")
    audit.add_argument("--out", required=True, type=Path, help="folder for the audit's models, report and ROC plot")
    audit.add_argument("--config", type=Path, default=Path("configs/demo.yaml"), help="experiment YAML (VAE size)")
    audit.add_argument("--epsilon", type=float, default=8.0, help="epsilon of the DP model (default 8)")
    audit.add_argument("--steps", type=int, default=300, help="VAE steps of each run (default 300)")
    audit.add_argument("--overfit-steps", type=int, default=600, help="non-private steps (default 600)")
    audit.add_argument("--seed", type=int, default=0, help="member split and training seed")
    _common(audit)
    audit.set_defaults(run=_run_privacy_audit)


def _run_privacy_plan(args: argparse.Namespace) -> dict:
    from ecgtwin.config import load_config
    from ecgtwin.privacy.reports import plan_report

    report = plan_report(args.policy, args.store, load_config(args.config) if args.config else None)
    if not args.json:
        print(f"privacy unit: {report['unit']}; sampling over the declared population of {report['population']} "
              f"(training patients in the store: {report['patients']})")
        print(f"{'stage':>5} {'rounds':>6} {'steps':>6} {'q':>7} {'sigma':>7} {'eps alone':>9} {'eps after':>9} "
              f"{'params':>10} {'noise/mean':>10} {'|noise|/C':>9}  regime (measured)")
        for s in report.pop("stages"):
            print(f"{s['stage']:>5} {s['rounds']:>6} {s['local_steps']:>6} {s['sample_rate']:>7.4f} "
                  f"{s['noise_multiplier']:>7.3f} {s['epsilon_alone']:>9.3f} {s['epsilon_after']:>9.3f} "
                  f"{s['parameters']:>10,} {s['noise_on_mean_update']:>10.4f} {s['noise_norm_over_clip']:>9.2f}  "
                  f"{s['regime']}")
    return report


def _run_privacy_ledger(args: argparse.Namespace) -> dict:
    from ecgtwin.privacy import Ledger
    from ecgtwin.privacy.reports import ledger_report
    from ecgtwin.site_folder import SiteFolder

    if args.site.is_dir():  # a site folder: its one ledger
        folder = SiteFolder.at(args.site)
        report = ledger_report(folder.ledger(), folder.policy, args.figure)
    else:  # a ledger file, its policy beside it
        report = ledger_report(Ledger(args.site), args.site.with_name("privacy.yaml"), args.figure)
    if not args.json:  # a readable table instead of the raw entries
        for e in report.pop("entries"):
            print(f"{e['time']}  {e['stage']:>4} round {e['round']:>3}  {e['steps']:>5} steps  q={e['sample_rate']:.4f}"
                  f"  sigma={e['noise_multiplier']:.3f}  C={e['max_grad_norm']:g}  epsilon={e['epsilon']:.3f}"
                  f"  delta={e['delta']:g}" + (f"  (distributed over {e['distributed_sites']} sites: this site's "
                  f"own sigma={e['noise_multiplier_site']:.3f}, epsilon without secure aggregation="
                  f"{e['epsilon_local']:.3f})" if "distributed_sites" in e else ""))
    return report


def _run_privacy_audit(args: argparse.Namespace) -> dict:
    import json as json_

    from ecgtwin.config import load_config
    from ecgtwin.audit import membership_audit

    if args.method == "canary":
        from ecgtwin.canary import canary_audit

        report = canary_audit(args.store, load_config(args.config), args.out, epsilon=args.epsilon,
                              canaries=args.canaries, steps=(args.steps, 5, 5), seed=args.seed)
        if not args.json:
            for name, run in report["runs"].items():
                print(f"{name}: epsilon claimed {run['epsilon_claimed']:.3g}, lower bound {run['epsilon_lower_bound']:.3f} "
                      f"({run['correct']}/{run['guesses']} guesses right, confidence {report['confidence']:g})")
    else:
        report = membership_audit(args.store, load_config(args.config), args.out, epsilon=args.epsilon,
                                  steps=args.steps, overfit_steps=args.overfit_steps, seed=args.seed,
                                  progress=not args.no_progress)
    (args.out / "audit.json").write_text(json_.dumps(report, indent=2))
    return report


def _add_federate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "federate",
        help="train the three stages federated over site folders, in Flower's simulation engine",
        description="One simulated SuperNode per site folder SITES/<site>/{store, privacy.yaml} (each site's own "
        "policy sets its DP steps and noise; its ledger goes to SITES/<site>/state). Writes the round checkpoint "
        "(resumed if present), metrics.jsonl/png and the global model (OUT/model, for `ecgtwin generate`) to --out. "
        "For a real deployment use `flwr run` (docs/federation.md).",
    )
    p.add_argument("--config", required=True, type=Path, help="experiment YAML (e.g. configs/demo.yaml)")
    p.add_argument("--sites-root", required=True, type=Path, help="folder with one sub-folder per site")
    p.add_argument("--out", required=True, type=Path, help="run folder (resumes from its checkpoint)")
    p.add_argument("--rounds", help="rounds per stage (default vae=1,ibe=1,twin=1; with --foundation vae=0,ibe=1,"
                   "twin=1: the public VAE used frozen, the IBE and the twin model fine-tuned)")
    p.add_argument("--strategy", help="fedavg | fedprox | fedadam | fedmedian | fedtrimmedavg (default fedavg; "
                   "fedadam with --secure-aggregation)")
    p.add_argument("--secure-aggregation", action="store_true",
                   help="every round through Flower's SecAgg+: the server sees only the sum of the sites' updates "
                        "(distributed DP where the sites' policies set distributed_sites; docs/privacy.md)")
    p.add_argument("--server-lr", type=float, help="FedAdam's learning rate (default 0.01)")
    p.add_argument("--foundation", type=Path, help="an `ecgtwin pretrain` folder: stages start from its weights; "
                   "a stage with 0 rounds (or trainable: frozen in the config) is used from it frozen (not trained, "
                   "not sent back, not charged); the config's trainable: all|condition|lora|bias|modules says what the others "
                   "fine-tune")
    p.add_argument("--min-nodes", type=int, default=2, help="fewest sites that must return weights per round")
    p.add_argument("--run-name", default="ecgtwin", help="name written into the sites' ledgers")
    p.add_argument("--timeout", type=float, help="stop the simulation after this many seconds")
    _common(p)
    p.set_defaults(run=_run_federate)


def _run_federate(args: argparse.Namespace) -> dict:
    from ecgtwin.config import STAGES, load_config
    from ecgtwin.coordinator.launch import simulate
    from ecgtwin.coordinator.settings import FederationSettings, simulation_settings

    load_config(args.config)  # a bad config fails here with one clear line
    rounds = {}
    spec = args.rounds or ("vae=0,ibe=1,twin=1" if args.foundation else "vae=1,ibe=1,twin=1")
    for part in filter(None, spec.split(",")):
        stage, _, value = part.partition("=")
        if stage.strip() not in STAGES or not value.strip().isdigit():
            raise UserError(f"--rounds: expected e.g. vae=2,ibe=1,twin=3, got {spec!r}")
        rounds[stage.strip()] = int(value)
    if not any(args.sites_root.glob("*/privacy.yaml")):
        raise MissingInput(f"{args.sites_root}: no <site>/privacy.yaml found")
    out = args.out.resolve()
    extra = {"server_lr": args.server_lr} if args.server_lr is not None else {}
    settings = simulation_settings(args.config, out, args.sites_root, rounds, args.foundation,
                                   strategy=args.strategy or ("fedadam" if args.secure_aggregation else "fedavg"),
                                   min_nodes=args.min_nodes, run_name=args.run_name,
                                   secure_aggregation=args.secure_aggregation, **extra)
    FederationSettings.from_run_config(settings.to_run_config())  # a bad combination fails here, in one line
    status = simulate(settings.to_run_config(), out / "simulation.log", progress=not args.no_progress,
                      timeout=args.timeout)
    if status.get("status") != "finished":
        raise UserError(f"federation failed: {status.get('message')} (log: {out / 'simulation.log'})")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1]) if lines else {"sites": {}}
    return {"status": status["status"], "model": str(out / "model"), "rounds": len(lines),
            "epsilon": {site: m.get("epsilon", "not private") for site, m in last["sites"].items()},
            "metrics": str(out / "metrics.jsonl"), "plot": str(out / "metrics.png")}


def _add_pretrain(sub: argparse._SubParsersAction) -> None:
    from ecgtwin.data.readers import SOURCES

    p = sub.add_parser(
        "pretrain",
        help="train a public foundation model (all three stages, non-private) on public ECGs",
        description="Non-private training of the VAE, the IBE and the twin model on public data, written as a "
        "checkpoint folder (what generate, train --foundation and federate --foundation read) with a model card "
        "(card.json, card.md: source, records, patients, steps and losses per stage, config, sha256 of each "
        "weight file, the command). --source synthetic needs no root: the simulator's public population, whose "
        "seed no site uses.",
    )
    p.add_argument("--config", required=True, type=Path, help="experiment YAML (sizes and steps per stage)")
    p.add_argument("--source", required=True, choices=sorted(SOURCES))
    p.add_argument("--root", type=Path, help="the public corpus' folder (not for synthetic)")
    p.add_argument("--out", required=True, type=Path, help="the foundation folder")
    p.add_argument("--patients", type=int, default=200, help="synthetic: patients of the public population")
    p.add_argument("--records-per-patient", type=int, default=3, help="synthetic: ECGs per patient")
    p.add_argument("--rate", type=int, choices=[100, 500], help="ptbxl: which copy of the records to read")
    p.add_argument("--corpus", action="append", default=[], metavar="SOURCE=FOLDER",
                   help="one more public database pooled with --source (repeat for several), e.g. "
                   "challenge=../shared/data/cinc2021")
    p.add_argument("--continue-from", type=Path, metavar="FOUNDATION",
                   help="start every stage from this foundation's weights (e.g. the simulator's, trained on "
                   "further on real public ECGs); the card names it")
    _device(p)
    _compute(p)
    _common(p)
    p.set_defaults(run=_run_pretrain)


def _run_pretrain(args: argparse.Namespace) -> dict:
    from ecgtwin.config import load_config
    from ecgtwin.foundation import Corpus, pretrain

    return pretrain(_with_compute(load_config(args.config), args), args.source, args.out, root=args.root, patients=args.patients,
                    records_per_patient=args.records_per_patient, rate=args.rate,
                    corpora=[Corpus.parse(text) for text in args.corpus], continue_from=args.continue_from,
                    command=["ecgtwin", *(a for a in sys.argv[1:] if a not in DISPLAY_FLAGS)] if sys.argv[1:] else None,
                    progress=not args.no_progress,
                    device=resolve_device(args.device))


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="write the shareable part of a checkpoint (weights, config, fixed normaliser, model card)",
        description="Copy only what is DP or public out of a checkpoint folder: the weights, the config and the fixed "
        "population normaliser, with card.json/card.md naming the policy and the epsilon and delta spent. The "
        "text-embedding cache, loss logs and optimiser states stay behind. docs/privacy.md says which folders "
        "never leave a site.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder (e.g. RUN/model)")
    p.add_argument("--out", required=True, type=Path, help="the bundle folder to write (must not exist)")
    p.add_argument("--policy", type=Path, help="the site's privacy policy the weights were trained under")
    p.add_argument("--ledger", type=Path, help="the site's ledger (epsilon spent)")
    _common(p)
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> dict:
    from ecgtwin.export import export_model

    return export_model(args.checkpoint, args.out, args.policy, args.ledger)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    from ecgtwin.models.diffusion import SAMPLERS

    p = sub.add_parser(
        "evaluate",
        help="benchmark a generator on a site's held-out patients (FID, P/R/F1, CLIP, HR MAE, personalisation)",
        description="Train (or reuse) an ECG-text evaluation encoder on real ECGs of patients the generator never "
        "trained on, generate twins of other held-out patients, and write OUT/metrics.json and OUT/report.html. "
        "See docs/evaluation.md.",
    )
    p.add_argument("--checkpoint", required=True, type=Path, help="checkpoint folder with vae, ibe and twin weights")
    p.add_argument("--store", required=True, type=Path, help="the site store (its held-out patients are used)")
    p.add_argument("--out", required=True, type=Path, help="output folder (metrics.json, report.html, figures)")
    p.add_argument("--twins-per-patient", type=int, default=4, help="twins per patient, over their later ECGs (default 4)")
    p.add_argument("--sampler", choices=SAMPLERS, help="sampler (default: the config's)")
    p.add_argument("--steps", type=int, help="sampling steps for ddim/dpm++ (default: the config's)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale for the condition (1 = none)")
    p.add_argument("--person-guidance", type=float, help="classifier-free guidance scale for the person (1 = none)")
    p.add_argument("--encoder-steps", type=int, help="training steps of the evaluation encoder (default 400)")
    p.add_argument("--encoder-cache", type=Path, help="folder of a cached evaluation encoder (default OUT/encoder)")
    p.add_argument("--encoder-store", type=Path, help="train the encoder on this other store instead")
    p.add_argument("--max-patients", type=int, help="at most this many twin patients (a seeded draw from all held-out patients)")
    p.add_argument("--no-downstream", action="store_true", help="skip the personalised-monitor experiment")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    _device(p)
    _compute(p)
    _common(p)
    p.set_defaults(run=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> dict:
    from ecgtwin.evaluate import run_evaluation

    result = run_evaluation(args.checkpoint, args.store, args.out, twins_per_patient=args.twins_per_patient,
                            sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                            guidance_person=args.person_guidance, encoder_steps=args.encoder_steps, encoder_cache=args.encoder_cache,
                            encoder_store=args.encoder_store, max_patients=args.max_patients,
                            downstream=not args.no_downstream, seed=args.seed, progress=not args.no_progress,
                            device=resolve_device(args.device), precision=args.precision, compile=args.compile)
    if args.json:
        return result
    keep = ("fid", "precision", "recall", "f1", "clip_score", "hr_mae", "condition_accuracy", "similarity",
            "silhouette", "identification_top1", "identification_top5")
    return {**{k: result.get(k) for k in keep}, "metrics": str(args.out / "metrics.json"), "report": result.get("report")}


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
