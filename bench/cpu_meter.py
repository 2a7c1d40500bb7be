"""CPU time of a whole process tree, Ray's daemons included.

getrusage(RUSAGE_CHILDREN) counts only children that were waited for, and a Flower simulation's work runs in
Ray processes that the bench never waits for (they are reparented and killed), so a row's CPU time read that
way missed most of its training. The meter marks its own environment, which every program started afterwards
inherits (Ray's included); /proc shows a process's environment as it was at exec, so a child forked without
exec is found through its parent instead. It samples /proc twice a second: the CPU time of a process is the
most it was seen to have, so a process that ends between two samples loses at most its last half second.
"""

from __future__ import annotations

import os
import threading
import uuid

from ecgtwin.supervise import procfs

MARK = "ECGTWIN_CPU_METER"


class CpuMeter:
    """with CpuMeter() as meter: ...; meter.seconds() -> CPU seconds of this process and every process it
    started since (alive or ended)."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self._token = uuid.uuid4().hex
        self._seen: dict[tuple[int, int], int] = {}  # (pid, start time) -> most CPU ticks seen
        self._lock = threading.Lock()  # the sampling thread and seconds() both sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cpu-meter", daemon=True)
        self._previous: str | None = None

    def __enter__(self) -> "CpuMeter":
        self._previous = os.environ.get(MARK)
        os.environ[MARK] = self._token
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
            stats = {pid: found for pid in procfs.pids() if (found := procfs.stat(pid)) is not None}
            for pid in self._ours(stats):
                key = (pid, stats[pid].start_time)
                self._seen[key] = max(self._seen.get(key, 0), stats[pid].cpu_ticks)

    def _ours(self, stats: dict[int, procfs.Stat]) -> set[int]:
        """This process, every process carrying the mark, and their descendants (forked without exec)."""
        ours = {os.getpid()} | {pid for pid in stats if procfs.environ_has(pid, f"{MARK}={self._token}")}
        changed = True
        while changed:
            found = {pid for pid, s in stats.items() if pid not in ours and s.ppid in ours}
            ours |= found
            changed = bool(found)
        return ours & stats.keys()
