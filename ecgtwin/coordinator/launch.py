"""Running a simulation from ecgtwin (which never imports Flower): `python -m server.simulate` as a child
process in its own process group, its output copied to a log, stopped by its process-group id. The child
is told this process's pid (watchdog.PARENT_ENV) and stops itself and all it started (Ray included) when
this process ends in any way, kill -9 too (ecgtwin/supervise/watchdog.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Mapping

from ecgtwin.coordinator.settings import FederationSettings
from ecgtwin.coordinator.status import read_status
from ecgtwin.supervise.watchdog import PARENT_ENV

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # holds ecgtwin/, server/ and client/


def simulate(run_config: Mapping[str, Any], log_path: str | Path, progress: bool = False,
             timeout: float | None = None, cpus_per_site: float = 1.0,
             command: list[str] | None = None) -> dict:
    """Run the simulation (Flower's simulation engine, one simulated SuperNode per site under
    run_config["sites-root"]) and return out/status.json. Success is judged by that file, not by the exit
    status. On timeout (whether or not the child prints anything) or interrupt the child's process group is
    stopped (SIGINT, so that Ray shuts down, then SIGKILL) and TimeoutError is raised. `command` replaces
    the child's command line (tests)."""
    settings = FederationSettings.from_run_config(run_config)
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
           PARENT_ENV: str(os.getpid()),  # the child's watchdog: it dies with us, whatever kills us
           "PYTHONPATH": os.pathsep.join(p for p in (str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = command or [sys.executable, "-m", "server.simulate", "--run-config", json.dumps(dict(run_config)),
                          "--cpus-per-site", str(cpus_per_site)]
    (Path(settings.out) / "status.json").unlink(missing_ok=True)  # a previous run's status must not be read
    with log_path.open("w") as log:
        child = subprocess.Popen(command, cwd=PACKAGE_ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True, start_new_session=True)
        copier = threading.Thread(target=_copy_output, args=(child, log, progress), daemon=True)
        copier.start()
        try:
            child.wait(timeout=timeout)  # the deadline holds for a child that prints nothing
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"the simulation ran past {timeout:g} s (log: {log_path})") from None
        finally:
            if child.poll() is None:
                stop_group(child)
            copier.join(timeout=5)
    status = read_status(settings.out)
    if status is None:
        return {"status": "failed", "message": f"the simulation wrote no status (exit {child.returncode}); "
                                               f"see {log_path}"}
    return status


def _copy_output(child: subprocess.Popen, log, progress: bool) -> None:
    for line in child.stdout:  # type: ignore[union-attr]
        log.write(line)
        log.flush()
        if progress and "ecgtwin:" in line:
            print(line.split("ecgtwin:", 1)[1].strip(), file=sys.stderr, flush=True)


def stop_group(child: subprocess.Popen) -> None:
    """SIGINT to the child's process group (Ray shuts down cleanly), then SIGKILL if it does not exit."""
    for sig, wait in ((signal.SIGINT, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(child.pid, sig)  # the group we started (start_new_session): the child and its workers
        except ProcessLookupError:
            return
        try:
            child.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
