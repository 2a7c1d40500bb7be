"""CPU time of a whole process tree, Ray's daemons included.

getrusage(RUSAGE_CHILDREN) counts only children that were waited for, and a Flower simulation's work runs in
Ray processes that the bench never waits for (they are reparented and killed), so a row's CPU time read that
way missed most of its training. The meter marks its own environment (every process started afterwards
inherits the mark, Ray's included) and samples /proc twice a second: the CPU time of a marked process is the
most it was seen to have, so a process that ends between two samples loses at most its last half second.
"""

from __future__ import annotations

import os
import threading
import uuid

from ecgtwin.coordinator import procfs

MARK = "ECGTWIN_CPU_METER"


class CpuMeter:
    """with CpuMeter() as meter: ...; meter.seconds() -> CPU seconds of this process and every process it
    started since (alive or ended)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._mark = f"{MARK}={uuid.uuid4().hex}"
        self._seen: dict[tuple[int, int], int] = {}  # (pid, start time) -> most CPU ticks seen
        self._lock = threading.Lock()  # the sampling thread and seconds() both sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._previous: str | None = None

    def __enter__(self) -> "CpuMeter":
        self._previous = os.environ.get(MARK)
        os.environ[MARK] = self._mark.split("=", 1)[1]
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        if self._previous is None:
            os.environ.pop(MARK, None)
        else:
            os.environ[MARK] = self._previous

    def seconds(self) -> float:
        self._sample()
        return sum(self._seen.values()) / procfs.ticks_per_second()

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def _sample(self) -> None:
        with self._lock:
            self._sample_locked()

    def _sample_locked(self) -> None:
        me = os.getpid()  # its own /proc environ is the one it started with, without the mark
        for pid in procfs.pids():
            if pid != me and not procfs.environ_has(pid, self._mark):
                continue
            found = procfs.stat(pid)
            if found is not None:
                key = (pid, found.start_time)
                self._seen[key] = max(self._seen.get(key, 0), found.cpu_ticks)
