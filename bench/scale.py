"""A hospital-sized site: prepare, open and DP-train 100,000 records on the CPU, with time and peak memory.

    python -m bench.scale 100000:2:mimic-iv-ecg:vae 10000:1,2:synthetic,mimic-iv-ecg:vae,twin [--record]

Two source trees of the same size are written first: the synthetic consortium's layout and MIMIC-IV-ECG's
(files/pXXXX/pSUBJECT/sSTUDY/STUDY.{hea,dat}, record_list.csv, machine_measurements.csv). Writing
100,000 distinct simulated ECGs would take half an hour, so each tree repeats 200 simulated recordings
(distinct headers and names, the signal file hard-linked): `prepare` reads, checks and resamples every
record in full all the same. Each measurement runs in its own process, so its peak RSS is its own; a
prepare with workers also reports the largest worker's.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import shutil
import tempfile
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = 200
RECORDS_PER_PATIENT = 5  # MIMIC-IV-ECG: about 800,000 records of 160,000 patients
TRAIN_STEPS = 5
LIMIT_MB = 2048  # the bound on the CPU path


def _peak_mb(who: int = resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux reports kB


def _templates(folder: Path) -> list[dict]:
    from ecgtwin.data.synthetic import synthesize_consortium

    synthesize_consortium(folder, sites=1, patients_per_site=TEMPLATES // 5, records_per_patient=5, seed=3)
    site = next(p for p in folder.iterdir() if (p / "metadata.csv").is_file())
    rows = pd.read_csv(site / "metadata.csv", dtype=str, keep_default_na=False).to_dict("records")
    return [{**row, "hea": (site / f"{row['record']}.hea").read_text(), "dat": site / f"{row['record']}.dat"}
            for row in rows]


def _copy_record(template: dict, directory: Path, name: str) -> None:
    """A new record `name`: the template's header under the new name, its signal file hard-linked."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.hea").write_text(template["hea"].replace(template["record"], name))
    os.link(template["dat"], directory / f"{name}.dat")


def write_synthetic_tree(root: Path, n: int, templates: list[dict]) -> None:
    rows = []
    for i in range(n):
        t = templates[i % len(templates)]
        name = f"r{i:06d}"
        _copy_record(t, root / "site" / f"d{i // 1000:03d}", name)
        rows.append({**{k: t[k] for k in ("site", "conditions", "report", "hr", "age", "sex", "recording_time")},
                     "record": f"d{i // 1000:03d}/{name}", "patient_id": f"P{i // RECORDS_PER_PATIENT:06d}"})
    pd.DataFrame(rows).to_csv(root / "site" / "metadata.csv", index=False)


def write_mimic_tree(root: Path, n: int, templates: list[dict]) -> None:
    records, measurements = [], []
    for i in range(n):
        t = templates[i % len(templates)]
        subject, study = f"{20000000 + i // RECORDS_PER_PATIENT}", f"{40000000 + i}"
        rel = f"files/p{subject[:4]}/p{subject}/s{study}"
        _copy_record(t, root / rel, study)
        when = f"2180-01-01 08:00:00" if i % RECORDS_PER_PATIENT == 0 else f"2180-0{1 + i % RECORDS_PER_PATIENT}-01 08:00:00"
        records.append({"subject_id": subject, "study_id": study, "file_name": study, "ecg_time": when,
                        "path": f"{rel}/{study}"})
        statements = [s for s in t["report"].split(". ") if s][:18]
        measurements.append({"subject_id": subject, "study_id": study, "ecg_time": when,
                             **{f"report_{k}": (statements[k] if k < len(statements) else "") for k in range(18)},
                             "rr_interval": f"{60000 / float(t['hr']):.0f}"})
    pd.DataFrame(records).to_csv(root / "record_list.csv", index=False)
    pd.DataFrame(measurements).to_csv(root / "machine_measurements.csv", index=False)


def _prepare(source: str, root: str, out: str, workers: int, queue: mp.Queue) -> None:
    from ecgtwin.data.prepare import prepare_store

    summary = prepare_store(source, root, out, workers=workers, on_reject=lambda _: None)
    queue.put({"records_kept": summary["segments_kept"], "patients": summary["patients"],
               "rejected": summary["rejected_total"], "seconds": summary["seconds"],
               "records_per_s": round(summary["segments_kept"] / summary["seconds"], 1),
               "peak_rss_mb": _peak_mb(), "worker_peak_rss_mb": _peak_mb(resource.RUSAGE_CHILDREN) if workers > 1 else None})


def _train(store_path: str, folder: str, stages: tuple[str, ...], queue: mp.Queue) -> None:
    """Open the store, then one DP-SGD pass of the VAE and of the twin model (from the demo foundation, the
    earlier stages frozen: the twin pass encodes every record once), each TRAIN_STEPS steps."""
    import torch

    from ecgtwin.config import load_config
    from ecgtwin.data.store import SiteStore
    from ecgtwin.foundation import foundation_weights
    from ecgtwin.privacy.ledger import Ledger
    from ecgtwin.privacy.policy import PrivacyPolicy, StagePlan, StagePlans
    from ecgtwin.train.private import private_pass

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    store = SiteStore(store_path)
    out = {"open_s": round(time.perf_counter() - start, 2), "open_peak_rss_mb": _peak_mb(), "records": len(store),
           "patients": len(store.patients)}
    config = load_config(ROOT / "configs" / "demo.yaml")
    weights = {stage: foundation_weights(ROOT / "foundations" / "demo", stage) for stage in ("vae", "ibe", "twin")}
    plan = StagePlan(rounds=1, local_steps=TRAIN_STEPS, batch_patients=64)
    policy = PrivacyPolicy(site="bench", epsilon=8.0, delta=1e-6, population=len(store.patients),
                           stages=StagePlans(vae=plan, ibe=plan, twin=plan))
    ledger = Ledger(Path(folder) / "ledger.jsonl")
    for stage in stages:
        start = time.perf_counter()
        result = private_pass(stage, config, store, weights, policy, ledger, round=1, cache_dir=Path(folder) / "cache")
        total = time.perf_counter() - start
        steps_s = result.summary["seconds"]
        out[stage] = {"setup_s": round(total - steps_s, 1), "s_per_step": round(steps_s / TRAIN_STEPS, 3),
                      "patients_per_step": round(result.summary["sample_rate"] * len(store.patients), 1),
                      "loss": round(result.summary["loss"], 4), "peak_rss_mb": _peak_mb()}
    out["peak_rss_mb"] = _peak_mb()
    queue.put(out)


def _in_process(target, *args) -> dict:
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


LAYOUTS = {"synthetic": write_synthetic_tree, "mimic-iv-ecg": write_mimic_tree}


def run_scale(records: int, workers: list[int], layouts: list[str], stages: tuple[str, ...],
              keep: Path | None = None) -> dict:
    results: dict = {"records": records, "records_per_patient": RECORDS_PER_PATIENT, "templates": TEMPLATES,
                     "cpus": os.cpu_count(), "limit_mb": LIMIT_MB, "prepare": {}, "train": {}}
    with tempfile.TemporaryDirectory(dir=keep) as tmp:
        tmp = Path(tmp)
        templates = _templates(tmp / "templates")
        for source in layouts:
            write = LAYOUTS[source]
            start = time.perf_counter()
            write(tmp / source, records, templates)
            print(f"{source}: wrote {records} records in {time.perf_counter() - start:.0f} s", flush=True)
            for w in workers:
                results["prepare"][f"{source}_workers{w}"] = row = _in_process(
                    _prepare, source, str(tmp / source), str(tmp / f"{source}-store"), w)
                print(f"prepare {source} workers={w}: {row}", flush=True)
            if stages:
                results["train"][source] = row = _in_process(_train, str(tmp / f"{source}-store"),
                                                             str(tmp / f"{source}-train"), stages)
                print(f"open+train {source}: {row}", flush=True)
            shutil.rmtree(tmp / source)
            shutil.rmtree(tmp / f"{source}-store")
    return results


def run_plan(plan: list[str], keep: Path | None = None) -> dict:
    """`plan`: RECORDS:WORKERS[,WORKERS]:LAYOUT[,LAYOUT]:STAGE[,STAGE] runs (STAGE: vae, twin or -)."""
    runs = []
    for item in plan:
        n, workers, layouts, stages = item.split(":")
        runs.append(run_scale(int(n), [int(w) for w in workers.split(",")], layouts.split(","),
                              tuple(s for s in stages.split(",") if s != "-"), keep))
    return {"runs": runs}


DEFAULT_PLAN = ["100000:2:mimic-iv-ecg,synthetic:vae,twin", "10000:1,2:synthetic,mimic-iv-ecg:-"]


def run(out) -> dict:
    """`python -m bench --only scale`: the default plan (hours on 2 cores)."""
    return run_plan(DEFAULT_PLAN)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("plan", nargs="*", default=DEFAULT_PLAN,
                        help="RECORDS:WORKERS:LAYOUTS:STAGES runs, e.g. 100000:2:mimic-iv-ecg:vae "
                             f"(default: {' '.join(DEFAULT_PLAN)})")
    parser.add_argument("--tmp", type=Path, default=None, help="where to write the trees (~11 GB per 100k)")
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "scale.json")
    parser.add_argument("--record", action="store_true", help="also write bench/data/benchmarks/scale.json")
    parser.add_argument("--append", action="store_true",
                        help="with --record: add these runs to the recorded ones (their commands are kept)")
    args = parser.parse_args()
    result = run_plan(args.plan, args.tmp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.record:
        from bench.tables import record_benchmark

        command = f"python -m bench.scale {' '.join(args.plan)} --record"
        recorded = ROOT / "bench" / "data" / "benchmarks" / "scale.json"
        if args.append and recorded.is_file():
            earlier = json.loads(recorded.read_text())
            result = {"runs": earlier["runs"] + result["runs"]}
            command = f"{earlier['provenance'].split('`')[1]}; then {command} --append"
        print(f"recorded in {record_benchmark('scale', result, command)}")


if __name__ == "__main__":
    main()
