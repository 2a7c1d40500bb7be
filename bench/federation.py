"""Federation overhead in Flower's simulation engine: 3, 10 and 30 sites on this machine.

Every site runs a short NON-private VAE pass per round (private: false, so that the planner's seconds
do not count as overhead), 2 rounds. Per round: the wall time the server measured, the slowest site's
own training time (train-seconds in its reply), and the overhead = round time - slowest site. With more
sites than cores the sites queue, so "site time / cores" shows how much of a round is just queueing.
Bytes per site per round: what the server sends (the stage's global weights) and what a site replies
(the same arrays), against the model's size.
"""

from __future__ import annotations

import json
import math
import os
import resource
import tempfile
import time
from pathlib import Path

from ecgtwin.config import load_config
from ecgtwin.coordinator.launch import simulate
from ecgtwin.coordinator.settings import simulation_settings
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.privacy.policy import save_policy, site_policy
from ecgtwin.weights import model_shapes

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SITES = (3, 10, 30)
LOCAL_STEPS, ROUNDS = 5, 2


def _site_dirs(root: Path, n: int) -> Path:
    synthesize_consortium(root / "raw", sites=n, patients_per_site=6, records_per_patient=2, seed=1, fs=250.0)
    for site_raw in sorted(p.parent for p in (root / "raw").glob("*/metadata.csv")):
        site = root / "sites" / site_raw.name
        prepare_store("synthetic", site_raw, site / "store", on_reject=lambda r: None)
        save_policy(site_policy(site_raw.name, (ROUNDS, 0, 0), (LOCAL_STEPS, 1, 1), 4, private=False),
                    site / "privacy.yaml")
    return root / "sites"


def _one(n: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sites = _site_dirs(root, n)
        run_config = simulation_settings(CONFIG, root / "run", sites, {"vae": ROUNDS}, run_name="bench",
                                         min_nodes=n, node_wait=600.0).to_run_config()
        started = time.perf_counter()
        status = simulate(run_config, root / "simulation.log")
        wall = time.perf_counter() - started
        if status.get("status") != "finished":
            raise RuntimeError(f"{n} sites: {status.get('message')}: {(root / 'simulation.log').read_text()[-2000:]}")
        history = [json.loads(l) for l in (root / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rounds = []
    for entry in history:
        site_seconds = [s["train-seconds"] for s in entry["sites"].values()]
        rounds.append({"round": entry["round"], "round_s": entry["seconds"], "slowest_site_s": max(site_seconds),
                       "sum_site_s": round(sum(site_seconds), 2),
                       "overhead_s": round(entry["seconds"] - max(site_seconds), 2),
                       "overhead_share": round(1 - max(site_seconds) / entry["seconds"], 3),
                       "queueing_bound_s": round(sum(site_seconds) / (os.cpu_count() or 1), 2)})
    return {"sites": n, "total_wall_s": round(wall, 1), "rounds": rounds,
            "peak_rss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}


def run(out) -> dict:
    config = load_config(CONFIG)
    # float32 tensors of the VAE: what the server sends and a site replies each round
    model_bytes = sum(math.prod(shape) * 4 for shape in model_shapes("vae", config).values())
    results: dict = {"note": f"non-private VAE passes of {LOCAL_STEPS} steps, {ROUNDS} rounds, demo config, "
                             f"{os.cpu_count()} CPU cores, Flower simulation (Ray), 1 CPU per site",
                     "vae_model_bytes": model_bytes,
                     "bytes_per_site_per_round": {"server_to_site": model_bytes, "site_to_server": model_bytes,
                                                  "vs_model_size": 1.0}}
    for n in SITES:
        results[f"sites_{n}"] = _one(n)
        print(n, results[f"sites_{n}"], flush=True)
    return results
