"""Run a federation in Flower's simulation engine, in this process (no SuperLink left behind).

    python -m server.simulate --run-config '{"sites-root": "...", "config": "...", "out": "...", ...}'

Each simulated SuperNode is one site folder of <sites-root>/<site>/{store, privacy.yaml, state} (its
partition-id picks the folder). `ecgtwin federate` and the demo start this module as a child process,
so that ecgtwin/ never imports Flower. Exit status 0 only when out/status.json says finished. Started
so (ECGTWIN_PARENT_PID set), it watches its launcher and, when that ends (kill -9 too), stops itself,
Ray and all it started (ecgtwin/supervise/watchdog.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from ecgtwin.coordinator.settings import FederationSettings
from ecgtwin.coordinator.status import read_status
from ecgtwin.supervise.watchdog import watch_parent


def simulate(run_config: dict, num_supernodes: int | None = None, cpus_per_site: float = 1.0,
             verbose: bool = False) -> dict:
    import warnings

    from flwr.simulation import run_simulation

    from client.app import make_app as make_client
    from server.app import make_app as make_server

    # Flower's logger has its own console handler; Ray adds one on the root logger: print each line once
    logging.getLogger("flwr").propagate = False
    settings = FederationSettings.from_run_config(run_config)
    root = Path(settings.sites_root)
    sites = sorted(p.parent.name for p in root.glob("*/privacy.yaml")) if settings.sites_root else []
    if not sites:
        raise SystemExit(f"sites-root {settings.sites_root!r}: no <site>/privacy.yaml found")
    n = num_supernodes or len(sites)
    backend = {"client_resources": {"num_cpus": cpus_per_site, "num_gpus": 0.0},
               "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False,
                             "logging_level": logging.WARNING, "log_to_driver": verbose}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_simulation(make_server(run_config), make_client(run_config), num_supernodes=n,
                       backend_config=backend, verbose_logging=verbose)
    return read_status(settings.out) or {"status": "failed", "message": "the ServerApp wrote no status"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.simulate", description=__doc__.splitlines()[0])
    parser.add_argument("--run-config", required=True, help="the run config as JSON (keys as in pyproject.toml)")
    parser.add_argument("--num-supernodes", type=int, help="default: one per site under sites-root")
    parser.add_argument("--cpus-per-site", type=float, default=1.0, help="Ray CPUs per simulated site")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    watch_parent()  # before Ray starts, so that its processes inherit the watchdog's token
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    root = str(Path(__file__).resolve().parents[1])  # Ray workers must import ecgtwin, client and server
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    try:
        status = simulate(json.loads(args.run_config), args.num_supernodes, args.cpus_per_site, args.verbose)
    except Exception as exc:  # noqa: BLE001  (reported through the status, judged by the caller)
        settings = FederationSettings.from_run_config(json.loads(args.run_config))
        status = read_status(settings.out) or {"status": "failed", "message": f"{type(exc).__name__}: {exc}"}
        if status.get("status") != "failed":
            status = {"status": "failed", "message": f"{type(exc).__name__}: {exc}"}
    print(json.dumps({k: v for k, v in status.items() if k != "traceback"}), file=sys.stderr)
    return 0 if status.get("status") == "finished" else 1


if __name__ == "__main__":
    raise SystemExit(main())
