"""The simulation launcher's deadline holds for a child that prints nothing, and the child is stopped; kill -9
of `ecgtwin federate` leaves no simulation or Ray process behind (ecgtwin/supervise/watchdog.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from ecgtwin.supervise import procfs
from ecgtwin.coordinator.launch import simulate


def alive(pid: int) -> bool:
    """Running, and not a zombie (an orphan re-parented to an init that does not reap)."""
    return procfs.running(pid)


def test_a_silent_child_times_out_and_is_stopped(tmp_path: Path) -> None:
    pid_file = tmp_path / "child.pid"
    sleeper = [sys.executable, "-c",
               f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(120)"]
    run_config = {"out": str(tmp_path / "run"), "sites-root": str(tmp_path)}
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="ran past 3 s"):
        simulate(run_config, tmp_path / "simulation.log", timeout=3, command=sleeper)
    assert time.monotonic() - started < 60  # SIGINT ends a sleeping Python at once; never the 120 s sleep
    assert pid_file.is_file() and not alive(int(pid_file.read_text()))


def test_a_child_that_finishes_in_time_is_judged_by_its_status(tmp_path: Path) -> None:
    """No status file written: reported as failed with the exit code, not as a timeout."""
    quick = [sys.executable, "-c", "print('ecgtwin: hello'); raise SystemExit(3)"]
    status = simulate({"out": str(tmp_path / "run")}, tmp_path / "simulation.log", timeout=60, command=quick)
    assert status["status"] == "failed" and "exit 3" in status["message"]
    assert "ecgtwin: hello" in (tmp_path / "simulation.log").read_text()


# --------------------------------------------------------------------------------------------------------
# kill -9 of `ecgtwin federate`: the simulation child and every Ray process it started stop too

N_SAMPLES = 256
ROOT = Path(__file__).resolve().parents[1]
MARK = "ECGTWIN_TEST_ORPHAN"  # in the federate process's environment: every process it starts inherits it


def marked(token: str) -> dict[int, str]:
    """pid -> command line of every live (not zombie) process whose environment carries MARK=token."""
    return {pid: procfs.command_line(pid) for pid in procfs.pids()
            if procfs.environ_has(pid, f"{MARK}={token}") and procfs.running(pid)}


def tiny_consortium(root: Path) -> tuple[Path, Path]:
    """2 sites x 6 patients x 2 records of 256 samples, private policies with a fixed noise (no planning
    search), 1 round per stage; a tiny model. The VAE round's 100 steps outlast the test's bound: an orphan
    would still be training when it looks. Returns (sites root, config path)."""
    import yaml

    from ecgtwin.config import save_config
    from ecgtwin.data.prepare import prepare_store
    from ecgtwin.data.preprocess import PreprocessConfig
    from ecgtwin.data.synthetic import synthesize_consortium

    synthesize_consortium(root / "raw", sites=2, patients_per_site=6, records_per_patient=2, seed=3, progress=False)
    stages = {s: {"rounds": 1, "local_steps": 100 if s == "vae" else 3, "batch_patients": 3,
                  "noise_multiplier": 1.0} for s in ("vae", "ibe", "twin")}
    for site in ("site_a", "site_b"):
        prepare_store("synthetic", root / "raw" / site, root / "sites" / site / "store",
                      config=PreprocessConfig(n_samples=N_SAMPLES), progress=False)
        policy = {"site": site, "epsilon": 100.0, "delta": 1e-3, "accountant": "rdp", "seed": 1, "population": 6,
                  "stages": stages}
        (root / "sites" / site / "privacy.yaml").write_text(yaml.safe_dump(policy))
    from conftest import tiny_experiment

    save_config(tiny_experiment(), root / "tiny.yaml")
    return root / "sites", root / "tiny.yaml"


CHILD = """
import os, subprocess, sys, time
from ecgtwin.supervise.watchdog import watch_parent
watch_parent()
escapee = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
open(sys.argv[1], "w").write(f"{os.getpid()} {escapee.pid}")
time.sleep(120)
"""
LAUNCHER = """
import os, subprocess, sys, time
from ecgtwin.supervise.watchdog import PARENT_ENV
subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], start_new_session=True,
                 env={**os.environ, PARENT_ENV: str(os.getpid())})
time.sleep(120)
"""


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="the watchdog reads /proc")
def test_an_orphaned_child_stops_itself_and_what_left_its_session(tmp_path: Path) -> None:
    """No Ray: a watched child and a grandchild in a session of its own both end when the launcher is killed."""
    pids = tmp_path / "pids"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, CHILD, str(pids)], env=env, start_new_session=True)
    started = []
    try:
        deadline = time.monotonic() + 60
        while not (pids.is_file() and len(pids.read_text().split()) == 2) and time.monotonic() < deadline:
            time.sleep(0.1)
        started = [int(p) for p in pids.read_text().split()]
        assert all(alive(p) for p in started)
        launcher.kill()
        launcher.wait(timeout=10)
        deadline = time.monotonic() + 20
        while any(alive(p) for p in started) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [p for p in started if alive(p)]
    finally:
        for pid in [launcher.pid, *started]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="the watchdog and this test read /proc")
def test_kill_9_of_federate_leaves_no_orphan_simulation_or_ray(tmp_path: Path) -> None:
    sites, config = tiny_consortium(tmp_path)
    out, token = tmp_path / "run", uuid.uuid4().hex
    env = {**os.environ, MARK: token, "OMP_NUM_THREADS": "1", "FLWR_TELEMETRY_ENABLED": "0",
           "ECGTWIN_ALLOW_TEST_SEED": "1"}
    ecgtwin = Path(sys.executable).parent / "ecgtwin"
    ledgers = [sites / site / "state" / "ledger.jsonl" for site in ("site_a", "site_b")]
    with (tmp_path / "federate.out").open("w") as output:
        federate = subprocess.Popen([str(ecgtwin), "federate", "--config", str(config), "--sites-root", str(sites),
                                     "--out", str(out), "--no-progress"], env=env, stdout=output,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # wait until the child and Ray run and the sites train (Flower's ClientApp actors in Ray's workers)
        deadline, running = time.monotonic() + 120, {}
        while time.monotonic() < deadline:
            running = marked(token)
            commands = " ".join(running.values())
            if all(name in commands for name in ("server.simulate", "raylet", "gcs_server", "ClientAppActor")):
                break
            assert federate.poll() is None, (tmp_path / "federate.out").read_text()[-3000:]
            time.sleep(0.2)
        else:
            raise AssertionError(f"the simulation and Ray did not start: {sorted(running.values())}")
        os.kill(federate.pid, signal.SIGKILL)
        federate.wait(timeout=10)
        killed = time.monotonic()
        while marked(token) and time.monotonic() - killed < 30:  # the watchdog: 0.5 s poll + 5 s grace
            time.sleep(0.25)
        left = marked(token)
        assert not left, f"left running 30 s after kill -9 of ecgtwin federate: {sorted(left.values())}"
        # nothing charges the sites any more, and the run did not go on to its end
        charged = [p.read_bytes() if p.is_file() else b"" for p in ledgers]
        time.sleep(2)
        assert [p.read_bytes() if p.is_file() else b"" for p in ledgers] == charged
        assert all(len(c.splitlines()) < 3 for c in charged)  # a finished run charges vae, ibe and twin
        assert not (out / "status.json").is_file() or '"finished"' not in (out / "status.json").read_text()
    finally:
        if federate.poll() is None:
            federate.kill()
        for pid in marked(token):  # whatever survived a failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
