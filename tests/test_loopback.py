"""A real deployment on loopback (ecgtwin.supervise.loopback): a TLS SuperLink with its database and
SuperNode authentication, 3 SuperNodes with warm ClientApp workers, `flwr run`; and its faults, with real
processes killed by pid: a SuperNode mid-round, the SuperLink and the ServerApp mid-run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import yaml

from ecgtwin.supervise import procfs
from ecgtwin.supervise.loopback import Loopback, group_alive, wait_for
from ecgtwin.coordinator.status import read_status
from ecgtwin.privacy import Ledger
from test_federation import SITES, consortium, generator_works, policy, sites  # noqa: F401  fixtures

pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]


def children_of(pid: int) -> list[int]:
    return [p for p in procfs.pids() if (found := procfs.stat(p)) is not None and found.ppid == pid
            and found.state != "Z"]


def processes_named(word: str) -> list[int]:
    return [pid for pid in procfs.pids() if word in procfs.command_line(pid)]


def history(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


def ledger(sites: Path, site: str) -> list[tuple]:
    return [(e["stage"], e["round"], e["run"]) for e in Ledger(sites / site / "state" / "ledger.jsonl").entries()]


def run_overrides(consortium, out: Path, name: str, **more) -> dict:
    return {"config": str(consortium["config_path"]), "out": str(out), "rounds-vae": 1, "rounds-ibe": 1,
            "rounds-twin": 1, "min-nodes": 2, "node-wait": 60.0, "run-name": name, **more}


def finished(out: Path, timeout: float) -> dict:
    return wait_for(lambda: (read_status(out) or {}).get("status") in ("finished", "failed") and read_status(out),
                    timeout, "the run to end")


def test_tls_deployment_survives_a_supernode_kill_and_a_superlink_restart(consortium, sites, tmp_path):
    """One deployment, two crashes (kill -9 of real processes, by pid):
    - site_c's SuperNode while its ClientApp trains: its worker and that child exit by themselves, the round
      goes on without it, `failed` names it once by its node id, and restarted it rejoins the next round
      with the same id (rejoin-wait);
    - then the SuperLink and the ServerApp: restarted on the same database and submitted again, the run
      continues from its checkpoint with no round lost or repeated and no ledger charged twice.
    Also: an unregistered SuperNode is refused, and nothing outlives the deployment."""
    slow = policy(site="site_c", epsilon=1e6)  # a test budget: 3000 steps must fit
    slow["stages"]["ibe"]["local_steps"] = 3000  # still training when it is killed
    (sites / "site_c" / "privacy.yaml").write_text(yaml.safe_dump(slow))
    out = tmp_path / "out"
    overrides = run_overrides(consortium, out, "fault-test", **{"rejoin-wait": 120.0, "round-timeout": 300.0})
    with Loopback(tmp_path / "deploy", {s: sites / s for s in SITES}) as net:
        net.make_certs(extra_keys=("site_d",))
        net.start_superlink()
        for site in SITES:
            net.register(site)
        for site in SITES:
            net.start_supernode(site)
        (sites / "site_d").mkdir()  # a fourth site whose key the coordinator never registered
        shutil.copy(sites / "site_a" / "privacy.yaml", sites / "site_d" / "privacy.yaml")
        net.sites["site_d"] = sites / "site_d"
        intruder = net.start_supernode("site_d")
        net.wait_connected(list(SITES))
        run = net.run(overrides)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]

        # 1. a SuperNode killed mid-round
        wait_for(lambda: len(ledger(sites, "site_c")) == 2, 120, "site_c to be charged for its ibe pass")
        worker = net.processes["site_c-worker"]
        assert children_of(worker.pid), "site_c's ClientApp is not running its ibe pass"
        node_pid = net.kill("site_c")  # the SuperNode alone
        wait_for(lambda: not group_alive(node_pid) and not group_alive(worker.pid), 30,
                 "the SuperNode's ClientApp worker and its child to exit")
        assert intruder.poll() == 1 and "Failed to activate SuperNode" in net.log("site_d")
        entry = wait_for(lambda: [e for e in history(out) if e["stage"] == "ibe"], 150, "the ibe round")[0]
        node_c = history(out)[0]["sites"]["site_c"]["node_id"]
        assert sorted(entry["sites"]) == ["site_a", "site_b"]
        assert len(entry["failed"]) == 1 and entry["failed"][0].startswith(f"node {node_c}: "), entry["failed"]
        net.start_supernode("site_c")  # the same key: the same node id, awaited by the next round

        # 2. the coordinator killed mid-run: the twin round waits for site_c
        serverapps = wait_for(lambda: processes_named("flwr-serverapp"), 10, "the ServerApp process")
        for pid in [net.processes["superlink"].pid, *serverapps]:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: not group_alive(net.processes["superlink"].pid), 30, "the SuperLink's children to exit")
        assert [e["stage"] for e in history(out)] == ["vae", "ibe"] and read_status(out)["status"] == "running"
        net.start_superlink()  # the same database: registered nodes and their ids are kept
        wait_for(lambda: net.flwr("ls", timeout=30).returncode == 0, 60, "the restarted SuperLink")
        again = net.run(overrides)  # a new ServerApp: it resumes from the run's checkpoint
        assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
        status = finished(out, 300)
        assert status["status"] == "finished", status.get("message")
        generator_works(out / "model")
        assert [(e["stage"], e["round"]) for e in history(out)] == [("vae", 1), ("ibe", 1), ("twin", 1)]
        twin = history(out)[-1]
        assert sorted(twin["sites"]) == list(SITES) and not twin["failed"]
        assert twin["sites"]["site_c"]["node_id"] == node_c
        for site in SITES:  # each round charged once (site_c's killed ibe pass too)
            assert ledger(sites, site) == [("vae", 1, "fault-test"), ("ibe", 1, "fault-test"), ("twin", 1, "fault-test")]
        assert not (sites / "site_d" / "state").exists()
    # a process outside the stopped groups (a ClientApp child in its own session) is its watchdog's to stop,
    # within its poll interval and grace (ecgtwin.supervise.watchdog): give it that, twice over, not more
    try:
        wait_for(lambda: not net.survivors(), 15, "the deployment's processes to exit", interval=0.5)
    except TimeoutError:
        pass
    assert not net.survivors(), "a process of the deployment outlived it"


def test_the_worker_refuses_a_missing_certificate_in_one_line(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "client.worker", "--root-certificates", str(tmp_path / "ca.crt")],
                          capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith(f"{tmp_path / 'ca.crt'}: cannot read the CA certificate "
                                                         "(No such file or directory)")


HOSTILE_CLIENTAPP = """
from pathlib import Path
from flwr.clientapp import ClientApp

Path({marker!r}).write_text("the coordinator's code ran at a hospital")
app = ClientApp()
"""


def test_a_site_runs_its_own_clientapp_never_the_coordinators_fab(consortium, sites, tmp_path):
    """The coordinator submits a FAB whose pyproject names another ClientApp (a module of its own, which
    writes a file when imported) and whose client/app.py is replaced too: the sites serve the round with the
    ClientApp they installed (the round trains, each ledger is charged once), and no code of the FAB ran."""
    fab, marker = tmp_path / "fab", tmp_path / "FAB-RAN"
    root = Path(__file__).resolve().parents[1]
    for folder in ("ecgtwin", "server", "client", "configs"):
        shutil.copytree(root / folder, fab / folder, ignore=shutil.ignore_patterns("__pycache__"))
    pyproject = (root / "pyproject.toml").read_text()
    assert 'clientapp = "client.app:app"' in pyproject
    (fab / "pyproject.toml").write_text(pyproject.replace('clientapp = "client.app:app"', 'clientapp = "hostile:app"'))
    (fab / "hostile.py").write_text(HOSTILE_CLIENTAPP.format(marker=str(marker)))
    (fab / "client" / "app.py").write_text(HOSTILE_CLIENTAPP.format(marker=str(marker)))
    out = tmp_path / "out"
    two = ("site_a", "site_b")
    with Loopback(tmp_path / "deploy", {s: sites / s for s in two}) as net:
        net.start_all()
        run = net.run(run_overrides(consortium, out, "fab-test", **{"rounds-ibe": 0, "rounds-twin": 0}), app=fab)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        status = finished(out, 300)
        assert status["status"] == "finished", status.get("message")
        assert sorted(history(out)[0]["sites"]) == list(two) and not history(out)[0]["failed"]
        for site in two:
            assert ledger(sites, site) == [("vae", 1, "fab-test")]
            assert "served by this site's installed client.app, the FAB is not run" in net.log(f"{site}-worker")
    assert not marker.exists(), "the FAB's ClientApp was imported at a site"
