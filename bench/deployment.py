"""Round overhead of a real deployment on loopback: a TLS SuperLink with SuperNode authentication and 3 or
10 SuperNodes (ecgtwin.supervise.loopback), warm ClientApp workers against a fresh
process per message.

    python -m bench.deployment --sites 3 10 --out bench-results/deployment.json [--record]

Each site runs a short NON-private VAE pass per round (its reply may then carry its own train-seconds),
ROUNDS rounds. Per round: the time the server measured (waiting for the nodes, sending, every reply,
checking, aggregating), the slowest site's own training, overhead = round - slowest site, and its share.
The first round is reported apart: it includes connecting and the first import in cold mode.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from ecgtwin.supervise.loopback import Loopback
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.privacy.policy import save_policy, site_policy

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
ROUNDS, LOCAL_STEPS = 4, 5


def _sites(root: Path, n: int) -> dict[str, Path]:
    synthesize_consortium(root / "raw", sites=n, patients_per_site=6, records_per_patient=2, seed=1, fs=250.0)
    sites = {}
    for site_raw in sorted(p.parent for p in (root / "raw").glob("*/metadata.csv")):
        site = sites[site_raw.name] = root / "sites" / site_raw.name
        prepare_store("synthetic", site_raw, site / "store", on_reject=lambda r: None)
        save_policy(site_policy(site_raw.name, (ROUNDS, 0, 0), (LOCAL_STEPS, 1, 1), 4, private=False),
                    site / "privacy.yaml")
    return sites


def _rounds(history: list[dict]) -> list[dict]:
    rows = []
    for entry in history:
        site_s = [s["train-seconds"] for s in entry["sites"].values()]
        rows.append({"round": entry["round"], "sites": len(site_s), "round_s": entry["seconds"],
                     "slowest_site_s": max(site_s), "overhead_s": round(entry["seconds"] - max(site_s), 2),
                     "overhead_share": round(1 - max(site_s) / entry["seconds"], 3)})
    return rows


def measure(n: int, warm: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sites = _sites(root, n)
        out = root / "run"
        with Loopback(root / "deploy", sites, warm=warm) as net:
            started = time.perf_counter()
            net.start_all()
            connect_s = time.perf_counter() - started
            run = net.run({"config": str(CONFIG), "out": str(out), "run-name": "bench", "min-nodes": n,
                           "node-wait": 300.0, "rounds-vae": ROUNDS, "rounds-ibe": 0, "rounds-twin": 0})
            if run.returncode:
                raise RuntimeError(f"flwr run failed: {run.stderr[-2000:]}")
            deadline = time.monotonic() + 1800
            while time.monotonic() < deadline:
                status = json.loads((out / "status.json").read_text()) if (out / "status.json").is_file() else {}
                if status.get("status") in ("finished", "failed"):
                    break
                time.sleep(1)
            if status.get("status") != "finished":
                raise RuntimeError(f"{n} sites: {status.get('message')}\n{net.log('superlink')[-3000:]}")
            history = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]
    rounds = _rounds(history)
    later = rounds[1:]
    return {"sites": n, "mode": "warm worker" if warm else "fresh process per message",
            "start_and_connect_s": round(connect_s, 1), "first_round": rounds[0],
            "later_rounds": later,
            "later_round_s_median": sorted(r["round_s"] for r in later)[len(later) // 2],
            "later_overhead_share_median": sorted(r["overhead_share"] for r in later)[len(later) // 2]}


def run_deployment(site_counts: list[int], cold: bool) -> dict:
    results = {"note": f"non-private VAE passes of {LOCAL_STEPS} steps, {ROUNDS} rounds, demo config, "
                       f"{os.cpu_count()} CPU cores, TLS + SuperNode auth on loopback", "runs": []}
    for n in site_counts:
        for warm in ((True, False) if cold and n <= 3 else (True,)):
            results["runs"].append(row := measure(n, warm))
            print(json.dumps(row), flush=True)
    return results


def run(out) -> dict:
    return run_deployment([3, 10], cold=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.deployment", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--no-cold", action="store_true", help="skip Flower's per-message mode (3 sites)")
    parser.add_argument("--out", type=Path, default=Path("bench-results") / "deployment.json")
    parser.add_argument("--record", action="store_true", help="also write bench/data/benchmarks/deployment.json")
    args = parser.parse_args()
    result = run_deployment(args.sites, cold=not args.no_cold)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    if args.record:
        from bench.tables import record_benchmark

        print(f"recorded in {record_benchmark('deployment', result, 'python -m bench.deployment --record')}")


if __name__ == "__main__":
    main()
