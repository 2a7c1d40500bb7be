"""The simulation launcher's deadline holds for a child that prints nothing, and the child is stopped."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from ecgtwin.coordinator.launch import simulate


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
