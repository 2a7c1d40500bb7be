"""The result and benchmark tables of docs/ from the committed JSON in bench/data/:

    python -m bench.tables            # rewrite the marked regions of docs/results.md and docs/benchmarks.md
    python -m bench.tables --check    # one line per stale region and exit 1; writes nothing

A region is the text between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; everything else in the
docs is written by hand. bench/data/results.json holds, per setting, the summary.json and metrics.json
that `python -m bench.results` writes; bench/data/benchmarks/NAME.json holds what `python -m bench`
writes to bench-results/NAME.json. A run with `--record` merges its output there, so the path from a
run to the docs is: run with --record, then `python -m bench.tables`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data"
DOCS = ROOT / "docs"
REGION = re.compile(r"^([ \t]*)<!-- table:([\w-]+) -->\n(.*?)^[ \t]*<!-- /table:\2 -->", re.M | re.S)


# formatting ----------------------------------------------------------------------------------------------

def f(x, digits: int) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def plain(x) -> str:
    """The value as stored (the bench commands round their own output), with thousands separators."""
    return "n/a" if x is None else format(x, ",")


def sig3(x: float) -> str:
    """Three significant figures: 1.56, 11.5, 15.0."""
    return f(x, max(0, 2 - math.floor(math.log10(abs(x)))) if x else 2)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return "\n".join([lines[0], "|" + "---|" * len(header), *lines[1:]])


# docs/results.md -----------------------------------------------------------------------------------------

SETTINGS = ("centralised", "federated", "dp8", "dp3", "adaln", "cross", "ddpm", "noguidance", "ptbxl")
EXTRA_SETTINGS = ("fedshort", "fedprox", "vaelong")
LABELS = {"centralised": "centralised, non-private (the papers' setting)",
          "federated": "federated, non-private (FedAvg)",
          "dp8": "federated DP, epsilon 8 per site",
          "dp3": "federated DP, epsilon 3 per site (site_b refused: 2 sites)",
          "adaln": "AdaX ablation: adaLN only",
          "cross": "AdaX ablation: cross-attention only",
          "ddpm": "DDPM-1000 (centralised model)",
          "noguidance": "no guidance (centralised model, guidance 1)",
          "ptbxl": "PTB-XL reader path (own split and encoder, see below)"}
EXTRA_LABELS = {"federated": "federated, FedAvg 5 x 600 (from the table above)",
                "fedshort": "fedshort: FedAvg 15 x 200",
                "fedprox": "fedprox: FedProx mu 0.1, 5 x 600",
                "vaelong": "vaelong: centralised, VAE 4 x 200 = 800 steps"}
METRICS_HEADER = ["setting", "FID", "P/R/F1", "CLIP", "HR MAE", "cond. acc.", "similarity", "identification top-1"]
INTERVALS = (("fid", "FID", 1), ("clip_score", "CLIP", 3), ("hr_mae", "HR MAE", 1),
             ("condition_accuracy", "cond. acc.", 2), ("similarity", "similarity", 3),
             ("identification_top1", "identification top-1", 2))


def metrics(results: dict, setting: str) -> dict:
    return results["settings"][setting]["metrics"]


def measured(results: dict, settings=SETTINGS + EXTRA_SETTINGS) -> list[str]:
    return [s for s in settings if s in results["settings"]]


def metrics_row(label: str, m: dict) -> list[str]:
    """The columns of bench.results.row (docs/evaluation.md defines the metrics)."""
    return [label, f(m["fid"], 2), f"{f(m['precision'], 2)} / {f(m['recall'], 2)} / {f(m['f1'], 2)}",
            f(m["clip_score"], 3), f(m["hr_mae"], 1), f(m["condition_accuracy"], 2), f(m["similarity"], 3),
            f(m["identification_top1"], 2)]


def results_main(results: dict) -> str:
    return table(METRICS_HEADER, [metrics_row(LABELS[s], metrics(results, s)) for s in measured(results, SETTINGS)])


def results_intervals(results: dict) -> str:
    def cell(interval, digits):
        return "n/a" if not interval else f"{interval[0]:.{digits}f}-{interval[1]:.{digits}f}"

    rows = [[LABELS[s]] + [cell(metrics(results, s).get("intervals", {}).get(key), digits)
                           for key, _, digits in INTERVALS] for s in measured(results, SETTINGS)]
    return table(["setting"] + [name for _, name, _ in INTERVALS], rows)


def results_ceilings(results: dict) -> str:
    m = metrics(results, "centralised")
    return "\n".join([
        f"- CLIP score of real ECGs with their own reports: {m['clip_score_real']:.3f}.",
        "- HR MAE of the R-peak detector on the real targets against their stated rates: "
        f"{m['hr_mae_real']:.1f} bpm.",
        f"- A twin that simply kept its reference's rate would score an HR MAE of {m['hr_mae_keep_reference']:.1f} "
        "bpm (`hr_mae_keep_reference`).",
        "- Condition accuracy of the encoder's condition head on the real targets: "
        f"{m['condition_accuracy_real']:.2f}.",
        f"- Identification chance: 1/{m['setup']['twin_patients']} = {m['identification_chance_top1']:.3f} (top-1)."])


def results_time(results: dict) -> str:
    rows = []
    for s in measured(results):
        summary = results["settings"][s]["summary"]
        rows.append([f"`{s}`", plain(summary.get("train_seconds")), plain(summary.get("eval_seconds"))])
    return table(["setting", "training, s", "evaluation, s"], rows)


def results_vae_error(results: dict) -> str:
    groups: dict[str, list[str]] = {}  # settings with the same value share a row, in the order they come
    for s in measured(results):
        value = metrics(results, s).get("vae_relative_error")
        if value is not None:
            groups.setdefault(f(value, 2), []).append(f"`{s}`")
    return table(["checkpoint", "`vae_relative_error`"], [[", ".join(names), v] for v, names in groups.items()])


def results_extra(results: dict) -> str:
    return table(METRICS_HEADER, [metrics_row(EXTRA_LABELS[s], metrics(results, s))
                                  for s in measured(results, ("federated",) + EXTRA_SETTINGS)])


def results_extra_intervals(results: dict) -> str:
    digits = {"fid": 0, "clip_score": 2, "hr_mae": 1, "condition_accuracy": 2, "similarity": 2,
              "identification_top1": 2}
    lines = []
    for s in measured(results, EXTRA_SETTINGS):
        intervals, cells = metrics(results, s).get("intervals", {}), []
        for key, name, _ in INTERVALS:
            if intervals.get(key):
                low, high = intervals[key]
                cells.append(f"{name} {low:.{digits[key]}f}-{high:.{digits[key]}f}")
        lines.append(f"- `{s}`: " + (", ".join(cells) or "n/a") + ".")
    return "\n".join(lines)


def results_targets(results: dict) -> str:
    central, dp = metrics(results, "centralised"), metrics(results, "dp8")

    def points(key):
        diff = round(100 * (dp[key] - central[key]))
        return diff, f"{abs(diff)} points {'lower' if diff < 0 else 'higher'}"

    ratio = dp["fid"] / central["fid"]
    cond, cond_text = points("condition_accuracy")
    ident, ident_text = points("identification_top1")
    hr = {s: metrics(results, s)["hr_mae"] for s in measured(results) if metrics(results, s)["hr_mae"] is not None}
    best = min(hr, key=hr.get)
    met = [f"`{s}`" for s, v in hr.items() if v < 5]
    hr_result = f"met by {', '.join(met)}" if met else f"missed in every row (lowest: `{best}` {hr[best]:.1f})"
    return table(["target", "centralised", "DP epsilon 8", "result"], [
        ["FID of DP at epsilon 8 within 1.5x the centralised FID", f(central["fid"], 2),
         f"{f(dp['fid'], 2)} ({ratio:.1f}x)", "met" if ratio <= 1.5 else "missed"],
        ["condition accuracy within 10 points of the centralised model", f(central["condition_accuracy"], 2),
         f"{f(dp['condition_accuracy'], 2)} ({cond_text})", "met" if abs(cond) <= 10 else "missed"],
        ["identification rate within 10 points", f(central["identification_top1"], 2),
         f"{f(dp['identification_top1'], 2)} ({ident_text})", "met" if abs(ident) <= 10 else "missed"],
        ["twins' HR MAE under 5 bpm", f(central["hr_mae"], 1), f(dp["hr_mae"], 1), hr_result]])


def results_ptbxl(results: dict) -> str:
    m = metrics(results, "ptbxl")
    setup, down = m["setup"], m["downstream"]
    return table(["", "PTB-XL row"], [
        ["patients held out", plain(setup["held_out_patients"])],
        ["held-out patients with one ECG, which train the evaluation encoder (their ECGs)",
         f"{setup['encoder_patients']} ({setup['encoder_records']})"],
        ["patients with twins", plain(setup["twin_patients"])],
        ["twins / real targets / real gallery",
         f"{setup['twins']} / {setup['real_targets']} / {setup['real_gallery']}"],
        ["condition accuracy of the encoder on the real targets", f(m["condition_accuracy_real"], 2)],
        ["HR MAE of the real targets (their conditioning HR is measured by the same detector)",
         f(m["hr_mae_real"], 2)],
        ["HR MAE of a twin that kept its reference's rate", f(m["hr_mae_keep_reference"], 1)],
        ["identification top-1 / top-5", f"{f(m['identification_top1'], 2)} / {f(m['identification_top5'], 2)}"],
        ["identification chance top-1 / top-5",
         f"{f(m['identification_chance_top1'], 3)} / {f(m['identification_chance_top5'], 2)}"],
        ["downstream macro F1: none / personalised / non-personalised (test ECGs)",
         " / ".join(f(down[arm]["macro_f1"], 2) for arm in ("none", "personalised", "non_personalised"))
         + f" ({down['none']['n_test']})"]])


# docs/benchmarks.md --------------------------------------------------------------------------------------

def bench_data(d: dict) -> str:
    prepare = d["prepare"] if isinstance(d["prepare"], dict) else {}

    def rate(key):
        return plain(prepare[key]["records_per_s"]) if key in prepare else ""

    rows = []
    if "ptbxl_100hz_workers1" in prepare:
        rows.append(["`prepare` PTB-XL 100 Hz (`records100`)", plain(prepare["ptbxl_100hz_workers1"]["records_kept"]),
                     rate("ptbxl_100hz_workers1"), rate("ptbxl_100hz_workers2")])
    if "ptbxl_500hz_workers1" in prepare:
        kept = prepare["ptbxl_500hz_workers1"]["records_kept"]
        rows.append([f"`prepare` PTB-XL 500 Hz (only {kept} files present; the missing ones are rejected in the "
                     "same pass)", f"{kept} kept", rate("ptbxl_500hz_workers1"), rate("ptbxl_500hz_workers2")])
    rows.append(["`prepare` synthetic 500 Hz", plain(prepare["synthetic_500hz_workers1"]["records_kept"]),
                 rate("synthetic_500hz_workers1"), ""])
    synth = d["synth"]
    rows.append([f"`synth` (write WFDB, {synth['fs']} Hz, {synth['duration_s']} s)", plain(synth["records"]),
                 plain(synth["records_per_s"]), ""])
    return table(["what", "records", "records/s, 1 worker", "records/s, 2 workers"], rows)


def bench_training(d: dict) -> str:
    rows = [[config, stage, plain(m["params"]), plain(m["step_s"]), plain(m["peak_rss_mb"])]
            for config in ("demo", "paper") for stage in ("vae", "ibe", "twin")
            for m in [d[f"{config}_{stage}"]]]
    return table(["configuration", "stage", "parameters", "s/step", "peak RSS MB"], rows)


SAMPLERS = {"ddpm_1000": "DDPM, 1000 steps", "ddim_50": "DDIM, 50", "ddim_25": "DDIM, 25",
            "dpm++_50": "DPM-Solver++, 50", "dpm++_25": "DPM-Solver++, 25",
            "dpm++_25_guided": "DPM-Solver++, 25, condition guidance 2"}


def bench_generation(d: dict) -> str:
    rows = [[label, plain(d[key]["twins_per_s"]), plain(d[key]["speedup_vs_ddpm"]), plain(d[key]["hr_mae_bpm"]),
             plain(d[key]["rhythm_accuracy"])] for key, label in SAMPLERS.items() if key in d]
    return table(["sampler", "twins/s", "speed-up vs DDPM-1000", "HR error, median bpm", "rhythm accuracy"], rows)


def bench_privacy(d: dict) -> str:
    rows = []
    for stage, label in (("vae", "VAE"), ("ibe", "IBE (DP objective)"), ("twin", "twin")):
        cells = [label, f"{d[f'{stage}_none']['step_s']:.3f} s"]
        for mode in ("hooks", "functorch", "ghost"):
            m = d.get(f"{stage}_{mode}")
            cells.append(f"{m['step_s']:.3f} s ({m['vs_non_private']:.2f}x)" if m
                         else "n/a (rows ≠ patients)" if stage == "ibe" else "n/a")
        cells.append(f"{d[f'{stage}_none']['peak_rss_mb']:.0f} → {d[f'{stage}_hooks']['peak_rss_mb']:.0f} MB")
        rows.append(cells)
    header = ["stage", "non-private", "hooks", "functorch", "ghost clipping", "peak RSS (non-DP → hooks)"]
    return table(header, rows)


def bench_privacy_ibe(d: dict) -> str:
    ibe = d["ibe"]
    labels = {"untrained": "untrained", "infonce_non_private": "InfoNCE, in-batch negatives (paper, non-private)",
              "public_negatives_non_private": "public negatives, non-private",
              "public_negatives_dp": f"public negatives, DP-SGD at epsilon {ibe['dp_epsilon']:.2f} "
                                     f"(sigma {ibe['dp_noise_multiplier']:.2f})"}
    rows = [[label, f(ibe[key]["margin"], 2), f(ibe[key]["identification_top1"], 2)] for key, label in labels.items()]
    return table(["objective", "margin", "top-1"], rows)


def bench_privacy_twin(d: dict) -> str:
    draws = sorted(d["twin"], key=lambda key: int(key.rsplit("_", 1)[1]))
    return table(["noise draws per patient per step", "held-out loss", "time"],
                 [[key.rsplit("_", 1)[1], f(d["twin"][key]["held_out_loss"], 3), f"{d['twin'][key]['seconds']:.0f} s"]
                  for key in draws])


def bench_federation(d: dict) -> str:
    rows = []
    for key in sorted((k for k in d if k.startswith("sites_")), key=lambda k: d[k]["sites"]):
        first, second = d[key]["rounds"][:2]
        overhead = second.get("overhead_beyond_queueing_s", second["round_s"] - second["queueing_bound_s"])
        rows.append([str(d[key]["sites"]), f"{sig3(first['round_s'])} s", f"{sig3(second['round_s'])} s",
                     f"{f(second['slowest_site_s'], 2)} s", f"{f(second['queueing_bound_s'], 2)} s",
                     f"{f(overhead, 2)} s", f"{d[key]['peak_rss_children_mb']:.0f} MB"])
    return table(["sites", "round 1 (Ray actors start)", "round 2", "slowest site", "queueing bound",
                  "overhead beyond queueing (round 2)", "peak RSS"], rows)


def bench_scale_prepare(d: dict) -> str:
    rows = []
    for run in d["runs"]:
        for key, r in run["prepare"].items():
            source, workers = key.rsplit("_workers", 1)
            rows.append([f"`{source}`", workers, plain(r["records_kept"]), plain(r["patients"]),
                         f"{r['seconds'] / 60:.1f} min", f(r["records_per_s"], 1), plain(round(r["peak_rss_mb"])),
                         "" if r.get("worker_peak_rss_mb") is None else plain(round(r["worker_peak_rss_mb"]))])
    return table(["layout", "workers", "records", "patients", "time", "records/s", "peak RSS MB",
                  "largest worker MB"], rows)


def bench_scale_train(d: dict) -> str:
    def stage(r: dict, name: str) -> str:
        return f"{r[name]['setup_s']:.0f} s / {r[name]['s_per_step']:.2f} s" if name in r else "not run"

    rows = []
    for run in d["runs"]:
        for source, r in run["train"].items():
            rows.append([f"`{source}`", plain(r["records"]), f"{r['open_s']:.1f} s", plain(round(r["open_peak_rss_mb"])),
                         stage(r, "vae"), stage(r, "twin"), plain(round(r["peak_rss_mb"])),
                         "yes" if r["peak_rss_mb"] < run["limit_mb"] else "NO"])
    return table(["layout", "records", "open", "RSS after open MB", "DP VAE pass: set-up / step",
                  "DP twin pass: set-up / step", "peak RSS MB", "under 2,048 MB"], rows)


def bench_deployment(d: dict) -> str:
    rows = []
    for r in d["runs"]:
        later = r["later_rounds"]
        slowest = sorted(x["slowest_site_s"] for x in later)[len(later) // 2]
        rows.append([str(r["sites"]), r["mode"], f"{sig3(r['first_round']['round_s'])} s",
                     f"{sig3(r['later_round_s_median'])} s", f"{f(slowest, 2)} s",
                     f"{r['later_overhead_share_median']:.0%}"])
    return table(["SuperNodes", "ClientApp", "round 1", "later rounds (median)", "slowest site (median)",
                  "overhead share (median)"], rows)


def bench_device_training(d: dict) -> str:
    """`python -m bench.gpu --record`: seconds per step per stage, precision and Opacus mode on one device."""
    rows = []
    for key, stages in d.items():
        if not key.startswith("training_"):
            continue
        config, _, precision = key.removeprefix("training_").partition("_")
        for stage, r in stages.items():
            modes = " / ".join(f"{m} {f(r.get(f'step_s_dp_{m}'), 3)}" if f"step_s_dp_{m}" in r else f"{m} n/a"
                               for m in ("hooks", "functorch", "ghost"))
            rows.append([config, precision or "fp32", stage, str(r["batch"]), f(r["step_s_non_dp"], 3), modes,
                         r["fastest_dp_mode"], f(r["dp_over_non_dp"], 2)])
    return table(["configuration", "precision", "stage", "batch", "non-DP s/step",
                  "DP s/step: hooks / functorch / ghost", "fastest DP mode", "DP / non-DP"], rows)


def bench_device_generation(d: dict) -> str:
    def variant(key: str) -> str:  # generation_paper_dpm25[_bf16][_compiled]
        words = key.removeprefix("generation_paper_dpm25").split("_")[1:]
        precision = next((w for w in words if w != "compiled"), "fp32")
        return precision + (", torch.compile" if "compiled" in words else "")

    rows = [[variant(key), name.replace("_", " "),
             plain(r["twins"]), plain(r["twins_per_s"])]
            for key, runs in d.items() if key.startswith("generation_") for name, r in runs.items()]
    return table(["precision", "guidance", "twins in the batch", "twins/s"], rows)


# the regions: name -> (doc, JSON file under the data folder without .json, rendering) ----------------------

# docs/privacy.md ----------------------------------------------------------------------------------------

def bench_hr_follow(d: dict) -> str:
    rates = [f"{hr:g}" for hr in d["requested_hr"]]
    rows = [[r["checkpoint"], r["patients"], f(r["guidance"], 0), r["mode"], f(r["follows_request"], 2),
             f(r["keeps_reference"], 2), f(r["hr_mae_bpm"], 1), f(r["hr_mae_keep_reference_bpm"], 1),
             " / ".join(f(r["median_measured_by_requested"].get(k), 0) for k in rates), f(r["measured_share"], 2)]
            for r in d["rows"]]
    follow = table(["checkpoint", "references", "guidance", "request", "follows request", "keeps reference",
                    "HR MAE", "keep-reference MAE", f"median measured at {' / '.join(rates)} bpm", "measured share"],
                   rows)
    diagnostics = table(["checkpoint", "VAE round-trip HR error, bpm", "base vector -> reference HR, R^2",
                         "probe references"],
                        [[name, f(x["vae_round_trip_hr_mae_bpm"], 1), f(x["base_vector_hr_r2"], 2),
                          str(x["probe_references"])] for name, x in d["diagnostics"].items()])
    return follow + "\n\n" + diagnostics


def privacy_canary(d: dict) -> str:
    """The canary audit's runs: `ecgtwin privacy audit --method canary --json` as committed."""
    rows = []
    for name, label in (("non_private", "without noise"), ("dp", "DP-SGD")):
        run = d["runs"][name]
        claimed = "none (no DP)" if run["epsilon_claimed"] is None else f(run["epsilon_claimed"], 2)
        rows.append([label, claimed, f"{run['correct']} / {run['guesses']}", f(run["epsilon_lower_bound"], 2)])
    return table(["run", "epsilon claimed", "guesses right", f"epsilon lower bound ({d['confidence']:.0%})"], rows)


def twin_parameters(trainable: str, modules: list[str] = ()) -> int:
    """The twin stage's trainable parameters in the privacy-utility rows' model (configs/demo.yaml); `modules`
    are those a `modules` row trained (recorded with the row)."""
    from ecgtwin.config import load_config
    from ecgtwin.weights import parameter_count

    config = load_config(ROOT / "configs" / "demo.yaml")
    config.twin.trainable, config.twin.trainable_modules = trainable, list(modules)
    return parameter_count("twin", config)


def minutes(seconds: float | None) -> str:
    return f(None if seconds is None else seconds / 60, 1)


def recipe(row: dict) -> str:
    """A privacy-utility row's fine-tuning recipe and sampling, where not the default."""
    label = row["trainable"] + ("" if row.get("precision", "fp32") == "fp32" else f", {row['precision']}")
    default_batch = 8 if row.get("data") == "ptbxl" else 32
    label += "" if row["batch_patients"] == default_batch else f", {row['batch_patients']} a step"
    label += "" if not row.get("local_steps") else f", {row['local_steps'][0]}+{row['local_steps'][1]} steps"
    label += "" if row["finetune_lr"] == 2e-4 else f", lr {row['finetune_lr']:g}"
    label += "" if row.get("noise_draws", 1) == 1 else f", {row['noise_draws']} noise draws"
    label += ", distributed DP (SecAgg+)" if row.get("distributed") else ""
    label += "" if row.get("sites", 3) == 3 else f", {row['sites']} sites"
    label += "" if row.get("max_grad_norm", 1.0) == 1.0 else f", C {row['max_grad_norm']:g}"
    label += "" if row.get("ibe", "dp") == "dp" else f", IBE {row['ibe']}"
    label += "" if row.get("guidance", 2.0) == 2.0 else f", guidance {row['guidance']:g}"
    return label + ("" if row.get("guidance_person", 2.0) == 2.0 else f", person guidance {row['guidance_person']:g}")


def privacy_gap(d: dict) -> str:
    """bench.privacy_utility.gap_closed: what share of the public-only -> non-private gap each DP row closes."""
    from bench.privacy_utility import gap_closed, unseen_code

    code, rows = unseen_code(), []
    pct = lambda x: "n/a" if x is None else f"{x:.0%}"  # noqa: E731
    for g in sorted(gap_closed(list(d["rows"].values())),
                    key=lambda g: (g["row"]["patients_per_site"], -g["row"]["epsilon"], recipe(g["row"]),
                                   g["encoder"] or 0)):
        shares = [g["fid_share"], g["condition_accuracy_share"], g["per_condition_share"].get(code)]
        met = "n/a" if g["target"] is None else "unmeasured" if shares[2] is None and all(
            x is not None and x >= g["target"] for x in shares[:2]) else \
            "yes" if all(x is not None and x >= g["target"] for x in shares) else "no"
        rows.append([str(g["row"]["patients_per_site"]), f"{g['row']['epsilon']:g}", recipe(g["row"]),
                     f(g["fid"], 1), pct(shares[0]), f(g["condition_accuracy"], 2), pct(shares[1]),
                     f(g["per_condition"].get(code), 2), pct(shares[2]), pct(g["target"]), met, f(g["encoder"], 3)])
    return table(["patients / site", "epsilon", "IBE + twin train", "FID", "FID gap closed", "cond. acc.",
                  "cond. acc. gap closed", f"{code} recognised", f"{code} gap closed", "target", "met",
                  "cond. acc. of real ECGs"], rows)


def privacy_utility(d: dict) -> str:
    """The privacy-utility rows: `python -m bench.privacy_utility ... --record` as committed."""
    rows = []
    starts = {"public-only": 0, "foundation": 1, "scratch": 2}
    order = lambda r: (r["row"].get("data", "synthetic") == "ptbxl", r["row"].get("public", "simulator"), r["row"]["patients_per_site"], starts.get(r["row"]["start"], 3), r["row"]["vae"],  # noqa: E731
                       r["row"]["trainable"], r["row"].get("precision", "fp32") != "fp32", r["row"]["batch_patients"],
                       r["row"]["finetune_lr"], r["row"].get("guidance", 2.0), r["row"].get("guidance_person", 2.0),
                       -(r["row"]["epsilon"] or 1e9))
    for r in sorted(d["rows"].values(), key=order):
        row, m, ci = r["row"], r["metrics"] or {}, r.get("intervals", {})

        def cell(key, digits):
            if key not in m:  # the sites refused the plan: nothing was trained
                return f"refused: {r['refused']}" if key == "fid" else "n/a"
            low_high = ci.get(key)
            return f(m[key], digits) + (f" ({low_high[0]:.{digits}f}-{low_high[1]:.{digits}f})" if low_high else "")

        eps = "no DP" if row["epsilon"] is None else f"{row['epsilon']:g}"
        noise = r.get("noise_on_mean_update", {}).get("twin")
        trainable = recipe(row)
        size = "PTB-XL" if row.get("data") == "ptbxl" else str(row["patients_per_site"])
        vae = "trained" if row["vae"] == "dp" and row["epsilon"] is None else row["vae"]  # no DP, no noise
        start = row["start"] + (" (real DBs)" if row.get("public", "simulator") != "simulator" else "")
        rows.append([size, eps, start, vae, trainable,
                     cell("fid", 1), cell("hr_mae", 1), cell("condition_accuracy", 2), cell("identification_top1", 2),
                     f(r.get("real", {}).get("identification_real_top1"), 2),
                     # the evaluation encoder's fingerprint: rows with another figure here are not comparable
                     f(r.get("real", {}).get("condition_accuracy_real"), 3),
                     "n/a" if noise is None else f(noise, 4),
                     "n/a" if noise is None else
                     f(noise / row.get("max_grad_norm", 1.0)  # in units of the row's own C
                       * twin_parameters(row["trainable"], r.get("trainable_modules", {}).get("twin", ())) ** 0.5, 1),
                     minutes(r["train_wall_s"]),
                     # rows measured before the process-tree meter counted only the bench process, not Ray's workers
                     minutes(r["train_cpu_s"]) if "cpu_measured_by" in r else "n/a"])
    return table(["patients / site", "epsilon", "start", "VAE", "IBE + twin train", "FID", "HR MAE",
                  "cond. acc.", "id. top-1", "id. top-1 of real ECGs", "cond. acc. of real ECGs", "twin noise / mean",
                  "twin noise norm / C", "train wall min", "train CPU min"], rows)


def privacy_ptbxl(d: dict) -> str:
    """Issue 24 part 2: per public foundation, what DP fine-tuning at the PTB-XL sites buys over the
    foundation alone, on FID of held-out PTB-XL patients (lower is better; 95 % intervals)."""
    from bench.privacy_utility import same_evaluation

    rows = [r for r in d["rows"].values() if r["row"].get("data") == "ptbxl" and r["metrics"] is not None
            and r["row"]["start"] != "scratch" and r["row"]["vae"] == "frozen"]
    out = []
    for public in ("simulator", "real"):
        mine = [r for r in rows if r["row"].get("public", "simulator") == public]
        alone = next((r for r in mine if r["row"]["start"] == "public-only"), None)
        if alone is None:
            continue
        for r in sorted(mine, key=lambda r: (r["row"]["start"] != "public-only", -(r["row"]["epsilon"] or 1e9),
                                             recipe(r["row"]))):
            ci = r.get("intervals", {}).get("fid")
            fid = f(r["metrics"]["fid"], 1) + (f" ({ci[0]:.1f}-{ci[1]:.1f})" if ci else "")
            private = r["row"]["start"] == "foundation" and r["row"]["epsilon"] is not None
            beats = ("n/a" if not private else "not comparable" if not same_evaluation(r, alone) else
                     "yes" if r["metrics"]["fid"] < alone["metrics"]["fid"] else "no")
            eps = "no DP" if r["row"]["epsilon"] is None else f"{r['row']['epsilon']:g}"
            out.append([PUBLIC_CORPUS[public], r["row"]["start"], eps, recipe(r["row"]), fid,
                        f(r["metrics"].get("hr_mae"), 1), beats])
    return table(["foundation pretrained on", "start", "epsilon", "IBE + twin train", "FID", "HR MAE",
                  "beats public-only"], out)


PUBLIC_CORPUS = {"simulator": "the simulator", "real": "the simulator, then real DBs + simulator"}


def privacy_person_guidance(d: dict) -> str:
    """The models evaluated at more than one person guidance (condition guidance 2): does a twin keep the
    person, by the evaluation encoder and in the generator's own person space (IBE)?"""
    import dataclasses

    from bench.privacy_utility import Row

    defaults = {k: v for k, v in dataclasses.asdict(Row()).items() if k not in ("patients_per_site", "foundation")}
    groups: dict[str, list[dict]] = {}
    for r in d["rows"].values():
        row = r["row"]
        if r["metrics"] is None or row.get("guidance", 2.0) != 2.0:
            continue
        key = {k: v for k, v in {**defaults, **row}.items() if k != "guidance_person"}  # rows older than a field
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(r)
    rows = []
    for members in groups.values():
        if len({m["row"].get("guidance_person", 2.0) for m in members}) < 2:
            continue
        for r in sorted(members, key=lambda m: m["row"].get("guidance_person", 2.0)):
            row, m, real = r["row"], r["metrics"], r.get("real", {})
            rows.append([f"{row['patients_per_site']}", "no DP" if row["epsilon"] is None else f"{row['epsilon']:g}",
                         row["start"], f(row.get("guidance_person", 2.0), 0),
                         f(m["identification_top1"], 3), f(real.get("identification_real_top1"), 3),
                         f(m.get("identification_ibe_top1"), 3), f(real.get("identification_ibe_real_top1"), 3),
                         f(m.get("identification_person_top1"), 3), f(real.get("identification_person_real_top1"), 3),
                         f(real.get("identification_chance_top1"), 4),
                         f(m["fid"], 1), f(m["condition_accuracy"], 2), f(m["hr_mae"], 1),
                         f(real.get("condition_accuracy_real"), 3)])
    return table(["patients / site", "epsilon", "start", "person guidance", "id. top-1", "id. top-1 of real ECGs",
                  "id. top-1, IBE", "id. top-1 of real ECGs, IBE", "id. top-1, person encoder",
                  "id. top-1 of real ECGs, person encoder", "chance", "FID", "cond. acc.", "HR MAE",
                  "cond. acc. of real ECGs"], rows)


def privacy_weight_movement(d: dict) -> str:
    """bench.weight_movement: per stage, the modules chosen for `trainable: modules` and what they hold."""
    rows = []
    for stage, e in d["stages"].items():
        top = ", ".join(f"{r['module']} ({r['share']:.0%})" for r in e["modules"] if r["module"] in e["chosen"])
        rows.append([stage, str(e["steps"]), top, f"{e['chosen_parameters']:,} of {e['all_parameters']:,}",
                     f"{e['chosen_share']:.0%}"])
    return table(["stage", "public fine-tuning steps", "chosen modules (share of the squared change)",
                  "parameters", "share held"], rows)


def privacy_dp_signal(d: dict) -> str:
    """bench.dp_signal: per fine-tuning mode and clipping norm, the per-patient gradients' size, the step's
    signal, and its signal-to-noise ratio over each recorded plan."""
    rows = []
    for e in d["modes"]:
        c = e["max_grad_norm"]
        by_plan = "; ".join(f"eps {p['epsilon']:g}, {p['batch_patients']} a step, {p['twin_steps']} steps: "
                            f"{p['snr_plan']:.2f}" for p in e["plans"] if p["batch_patients"] in (32, 128, 512))
        rows.append([e["mode"], f"{c:g}", f"{e['parameters']:,}", f"{e['median_norm_before_clipping'] / c:.2f}",
                     f"{e['share_clipped']:.0%}", f"{e['signal_norm'] / c:.3f}", by_plan or "n/a"])
    return table(["trainable", "C", "parameters", "median patient gradient / C", "patients clipped",
                  "signal |mu| / C", "signal / noise over the plan's twin steps"], rows)


REGIONS = {
    "results-main": ("results.md", "results", results_main),
    "results-intervals": ("results.md", "results", results_intervals),
    "results-ceilings": ("results.md", "results", results_ceilings),
    "results-time": ("results.md", "results", results_time),
    "results-vae-error": ("results.md", "results", results_vae_error),
    "results-extra": ("results.md", "results", results_extra),
    "results-extra-intervals": ("results.md", "results", results_extra_intervals),
    "results-targets": ("results.md", "results", results_targets),
    "results-ptbxl": ("results.md", "results", results_ptbxl),
    "bench-data-path": ("benchmarks.md", "benchmarks/data", bench_data),
    "bench-training": ("benchmarks.md", "benchmarks/training", bench_training),
    "bench-generation": ("benchmarks.md", "benchmarks/generation", bench_generation),
    "bench-privacy": ("benchmarks.md", "benchmarks/privacy", bench_privacy),
    "bench-privacy-ibe": ("benchmarks.md", "benchmarks/privacy_quality", bench_privacy_ibe),
    "bench-privacy-twin": ("benchmarks.md", "benchmarks/privacy_quality", bench_privacy_twin),
    "bench-federation": ("benchmarks.md", "benchmarks/federation", bench_federation),
    "bench-deployment": ("benchmarks.md", "benchmarks/deployment", bench_deployment),
    "bench-scale-prepare": ("benchmarks.md", "benchmarks/scale", bench_scale_prepare),
    "bench-scale-train": ("benchmarks.md", "benchmarks/scale", bench_scale_train),
    "bench-device-cpu-training": ("benchmarks.md", "benchmarks/device-cpu", bench_device_training),
    "bench-device-cpu-generation": ("benchmarks.md", "benchmarks/device-cpu", bench_device_generation),
    "bench-hr-follow": ("benchmarks.md", "benchmarks/hr_follow", bench_hr_follow),
    "bench-hr-follow-range": ("benchmarks.md", "benchmarks/hr_follow_range", bench_hr_follow),
    "privacy-canary": ("privacy.md", "audits/canary", privacy_canary),
    "privacy-utility": ("privacy.md", "privacy_utility", privacy_utility),
    "privacy-person-guidance": ("privacy.md", "privacy_utility", privacy_person_guidance),
    "privacy-gap": ("privacy.md", "privacy_utility", privacy_gap),
    "privacy-ptbxl": ("privacy.md", "privacy_utility", privacy_ptbxl),
    "privacy-weight-movement": ("privacy.md", "benchmarks/weight_movement", privacy_weight_movement),
    "privacy-dp-signal": ("privacy.md", "benchmarks/dp_signal", privacy_dp_signal),
}


def render(data: Path = DATA) -> dict[str, str]:
    """Every region's markdown, rendered from the JSON under `data`."""
    loaded: dict[str, dict] = {}
    out = {}
    for name, (_, source, function) in REGIONS.items():
        if source not in loaded:
            loaded[source] = json.loads((Path(data) / f"{source}.json").read_text())
        out[name] = function(loaded[source])
    return out


def update(docs: Path = DOCS, data: Path = DATA, write: bool = True) -> tuple[list[str], list[str]]:
    """Rewrite the stale regions of results.md, benchmarks.md and privacy.md under `docs` (unless write is False).
    Returns one line per stale region, and one per region that is missing or unknown."""
    rendered, stale, errors = render(data), [], []
    for doc in sorted({doc for doc, _, _ in REGIONS.values()}):
        path = Path(docs) / doc
        shown, text, found = os.path.relpath(path), path.read_text(), set()

        def replace(match: re.Match) -> str:
            indent, name, body = match.groups()
            found.add(name)
            if REGIONS.get(name, ("",))[0] != doc:
                errors.append(f"{shown}: unknown table region {name}")
                return match.group(0)
            fresh = "".join(f"{indent}{line}\n" if line else "\n" for line in rendered[name].split("\n"))
            if body != fresh:
                stale.append(f"{shown}: table {name} is stale")
            return f"{indent}<!-- table:{name} -->\n{fresh}{indent}<!-- /table:{name} -->"

        new = REGION.sub(replace, text)
        errors += [f"{shown}: no region <!-- table:{name} --> ... <!-- /table:{name} -->"
                   for name, (d, _, _) in REGIONS.items() if d == doc and name not in found]
        if write and new != text:
            path.write_text(new)
    return stale, errors


# --record: a fresh run's output into bench/data ---------------------------------------------------------

def _provenance(command: str) -> str:
    return (f"measured by `{command}` on {datetime.date.today().isoformat()}, {platform.machine()}, "
            f"{os.cpu_count()} CPU cores (written by --record)")


def record_result(summary: dict, command: str, data: Path = DATA) -> Path:
    """Merge one bench.results setting (its summary.json and metrics.json) into DATA/results.json."""
    path = Path(data) / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {"provenance": "written by --record",
                                                                    "settings": {}}
    metrics_json = json.loads(Path(summary["metrics"]).read_text())
    results["settings"][summary["setting"]] = {"provenance": _provenance(command), "summary": summary,
                                               "metrics": metrics_json}
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


def record_benchmark(name: str, result: dict, command: str, data: Path = DATA) -> Path:
    """Replace DATA/benchmarks/NAME.json with what `python -m bench` wrote to bench-results/NAME.json."""
    path = Path(data) / "benchmarks" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"provenance": _provenance(command), **result}, indent=2, ensure_ascii=False) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tables", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="report stale regions (exit 1) and write nothing")
    parser.add_argument("--data", type=Path, default=DATA, help="folder of the JSON (default bench/data)")
    parser.add_argument("--docs", type=Path, default=DOCS, help="folder of results.md, benchmarks.md and privacy.md")
    args = parser.parse_args(argv)
    stale, errors = update(args.docs, args.data, write=not args.check)
    for line in errors:
        print(line, file=sys.stderr)
    for line in stale:
        print(f"{line} (run `python -m bench.tables`)" if args.check else f"rewrote: {line}",
              file=sys.stderr if args.check else sys.stdout)
    if not args.check and not stale:
        print("the docs' tables are up to date")
    return 1 if errors or (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
