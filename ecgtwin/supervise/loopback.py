"""A whole consortium deployment on this machine's loopback, as real processes: a TLS SuperLink with a
database and SuperNode authentication, one SuperNode per site (each with a warm ClientApp worker, or
Flower's per-message `flwr-clientapp`), and `flwr run`. For the deployment tests and bench, and for a
first try of a deployment before the machines of deploy/ exist.

Each process runs in its own session (process group), so `group_alive` can tell whether anything a
killed process started (a ClientApp child) is still running. Nothing here imports Flower: it starts Flower's executables.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from ecgtwin.supervise import procfs

BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr: the environment's own
REPO = Path(__file__).resolve().parents[2]
MARKER = "ECGTWIN_LOOPBACK"  # in the environment of every process of a deployment, inherited by its children


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")


def group_alive(pgid: int) -> list[int]:
    """Pids of the processes still in process group `pgid` (zombies excluded)."""
    return [pid for pid in procfs.pids() if (found := procfs.stat(pid)) is not None
            and found.pgrp == pgid and found.state not in ("Z", "X")]


def flower_env(home: Path, marker: str = "") -> dict:
    """The environment of a Flower process: its own FLWR_HOME, no telemetry, this repository importable."""
    env = {**os.environ, MARKER: marker, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env["PATH"] = os.pathsep.join([str(BIN), env.get("PATH", "")])
    return env


@dataclasses.dataclass
class Loopback:
    """`root` holds certificates, logs and Flower homes; `sites` maps a site to its folder (store,
    privacy.yaml, state). Every SuperNode runs in process isolation with client.worker, which serves each
    message with the site's installed ClientApp, never the FAB's. `warm`: one import per site (a fork per
    message), else a fresh Python process per message (what Flower's own flwr-clientapp costs)."""

    root: Path
    sites: dict[str, Path]
    warm: bool = True
    port: int = dataclasses.field(default_factory=free_port)
    processes: dict[str, subprocess.Popen] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.certs, self.logs = self.root / "certs", self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.cli_home = self.root / "cli-home"
        self.cli_home.mkdir(exist_ok=True)
        (self.cli_home / "config.toml").write_text(
            f'[superlink]\ndefault = "ecgtwin"\n\n[superlink.ecgtwin]\naddress = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certs / "ca.crt"}"\n')

    # -- processes ---------------------------------------------------------------------------------------

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        home = self.root / f"{name}-home"
        home.mkdir(parents=True, exist_ok=True)
        log = (self.logs / f"{name}.log").open("a")
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=flower_env(home, str(self.root)),
                                   cwd=self.root, start_new_session=True)
        self.processes[name] = process
        return process

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def make_certs(self, extra_keys: tuple[str, ...] = ()) -> None:
        script = REPO / "deploy" / "make_certs.sh"
        subprocess.run(["bash", str(script), str(self.certs), *self.sites], check=True, capture_output=True)
        if extra_keys:
            subprocess.run(["bash", str(script), "--keys-only", str(self.certs), *extra_keys], check=True,
                           capture_output=True)

    def start_superlink(self) -> subprocess.Popen:
        return self.start("superlink", [
            str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(self.port),
            "--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "superlink/server.pem"),
            "--ssl-keyfile", str(self.certs / "superlink/server.key"), "--enable-supernode-auth",
            "--isolation", "subprocess", "--disable-runtime-dependency-installation",
            "--database", str(self.root / "superlink.db")])

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), *args], env=flower_env(self.cli_home), capture_output=True,
                              text=True, timeout=timeout, cwd=self.root)

    def register(self, site: str) -> None:
        wait_for(lambda: self.flwr("supernode", "register", str(self.certs / site / "auth.pub"), "ecgtwin").returncode == 0,
                 60, f"registering {site}", interval=1)

    def start_supernode(self, site: str, key_of: str | None = None) -> subprocess.Popen:
        folder = self.sites.get(site, self.root / site)
        node_config = (f'data-path="{folder / "store"}" policy-path="{folder / "privacy.yaml"}" '
                       f'state-path="{folder / "state"}"')
        runtime = free_port()
        node = self.start(site, [
            str(BIN / "flower-supernode"), "--superlink", f"127.0.0.1:{self.port}",
            "--root-certificates", str(self.certs / "ca.crt"),
            "--auth-supernode-private-key", str(self.certs / (key_of or site) / "auth.key"),
            "--isolation", "process", "--port", str(runtime), "--node-config", node_config])
        # the site's executor; it exits by itself when the SuperNode does (--parent-pid)
        self.start(f"{site}-worker", [sys.executable, "-m", "client.worker", "--runtime-api-address",
                                      f"127.0.0.1:{runtime}", "--insecure", "--parent-pid", str(node.pid),
                                      *([] if self.warm else ["--fresh"])])
        return node

    def start_all(self) -> None:
        """Certificates, the SuperLink, every site registered and its SuperNode connected."""
        self.make_certs()
        self.start_superlink()
        for site in self.sites:
            self.register(site)
        for site in self.sites:
            self.start_supernode(site)
        self.wait_connected(list(self.sites))

    def wait_connected(self, sites: list[str], timeout: float = 120) -> None:
        wait_for(lambda: all("SuperNode ID" in self.log(s) for s in sites), timeout,
                 f"SuperNodes {', '.join(sites)} to connect")
        if self.warm:
            wait_for(lambda: all("ready" in self.log(f"{s}-worker") for s in sites), timeout,
                     "the ClientApp workers to import the ClientApp")

    def run(self, overrides: dict, timeout: float = 120, app: Path = REPO) -> subprocess.CompletedProcess:
        """`flwr run` of the app in `app` (this repository's) with these run-config overrides."""
        text = " ".join(f'{k}="{v}"' if isinstance(v, (str, Path)) else f"{k}={v}" for k, v in overrides.items())
        return self.flwr("run", str(app), "ecgtwin", "--run-config", text, timeout=timeout)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        """Signal one process (not its group): what a crash of that process alone looks like."""
        process = self.processes[name]
        process.send_signal(sig)
        process.wait(timeout=30)
        return process.pid

    def survivors(self) -> list[int]:
        """Pids of every process this deployment started, or they started, that still runs (found by the
        marker in their environment, which children inherit whatever their process group)."""
        return [pid for pid in procfs.pids() if procfs.environ_has(pid, f"{MARKER}={self.root}") and procfs.running(pid)]

    def stop_all(self) -> None:
        for name, process in reversed(list(self.processes.items())):
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    wait_for(lambda: not group_alive(process.pid), wait, f"{name} to stop", interval=0.2)
                    break
                except TimeoutError:
                    continue
            if process.poll() is None:
                process.wait(timeout=10)

    def __enter__(self) -> "Loopback":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
