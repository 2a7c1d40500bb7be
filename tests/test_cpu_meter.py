"""The privacy-utility bench's CPU meter: the CPU time of a whole process tree, Ray's daemons included."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed
from bench.cpu_meter import CpuMeter  # noqa: E402

# burns a fixed amount of its own CPU time, whatever else the machine runs, then leaves a file behind
BURN = "import time, pathlib, sys\nwhile time.process_time() < 1.5: pass\npathlib.Path(sys.argv[1]).write_text('x')\n"


def burn(seconds: float) -> None:
    while time.process_time() < seconds:
        pass


def test_the_cpu_meter_counts_a_detached_grandchild_and_a_fork_without_exec(tmp_path):
    """A grandchild reparented away from us (double fork, 1.5 s of CPU) and a child forked without exec (whose
    /proc environment is ours from before the mark; 1 s of CPU): the meter counts both; getrusage, which sees
    only children that were waited for, counts neither."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    with CpuMeter(interval_s=0.1) as meter:
        start = meter.seconds()
        subprocess.run(["sh", "-c", f"({sys.executable} -c \"$0\" {tmp_path / 'done'} &) ; true", BURN], check=True)
        child = os.fork()
        if child == 0:
            burn(1.0)
            os._exit(0)
        deadline = time.monotonic() + 60
        while not (tmp_path / "done").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.5)
        counted = meter.seconds() - start
        unwaited = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before
        os.waitpid(child, 0)
    assert (tmp_path / "done").exists() and unwaited < 0.5
    assert 2.2 < counted < 4.5, counted
