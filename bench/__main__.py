"""Run every benchmark and write bench-results/<name>.json; `python -m bench --only data`."""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

from bench import data_path, deployment, federation, generation, privacy, privacy_quality, scale, training

BENCHES = {"data": data_path.run, "training": training.run, "generation": generation.run, "privacy": privacy.run,
           "privacy_quality": privacy_quality.run, "federation": federation.run, "deployment": deployment.run,
           "scale": scale.run}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for the JSON results")
    parser.add_argument("--only", choices=sorted(BENCHES), action="append", help="run just these benchmarks")
    parser.add_argument("--record", action="store_true",
                        help="also write each result to bench/data/benchmarks/NAME.json (then: python -m bench.tables)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    machine = {"machine": platform.machine(), "processor": platform.processor(), "python": platform.python_version()}
    for name in args.only or sorted(BENCHES):
        result = {"machine": machine, **BENCHES[name](args.out)}
        (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        if args.record:
            from bench.tables import record_benchmark

            print(f"recorded in {record_benchmark(name, result, ' '.join([parser.prog, *sys.argv[1:]]))}")


if __name__ == "__main__":
    main()
