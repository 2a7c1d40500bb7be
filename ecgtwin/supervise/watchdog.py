"""The simulation child dies with the process that launched it, however that process ends (kill -9 too).

`ecgtwin federate` and the demo start `python -m server.simulate` in its own session (launch.py) and name
themselves in its environment (PARENT_ENV). The child calls `watch_parent()` before Ray starts: a daemon
thread polls (every `interval` s) whether that parent is still alive. When it is gone, the thread stops
everything the child started: SIGINT to the child itself (as when the launcher stops it) and SIGTERM to
all the child's other processes (Ray's raylet, GCS, agents and workers block SIGINT), then, after `grace`
seconds, SIGKILL to all that remain and to the group, and the child exits. Flower's run_simulation does
not end promptly on SIGINT (it waits for the running pass), so the SIGKILL is what bounds the time.
Nothing is lost by it: the round checkpoint is written atomically, and a pass killed after its charge is
retried at no new cost.

"All that remain" are found through /proc: the child's process group, its descendants, and every process
whose environment carries this child's token (TOKEN_ENV, set here before Ray starts so that all of Ray's
processes inherit it; it finds the ones re-parented to init when a raylet dies). Linux only (/proc);
elsewhere no thread is started.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
import time
import uuid

from ecgtwin.supervise import procfs

PARENT_ENV = "ECGTWIN_PARENT_PID"  # set by the launcher: the pid whose death ends the child
TOKEN_ENV = "ECGTWIN_SIMULATION_TOKEN"  # set by the child: inherited by every process it starts
Identity = tuple[int, int]  # (pid, start time in clock ticks since boot): a pid is reused, this pair is not


def watch_parent(parent_pid: int | None = None, interval: float = 0.5, grace: float = 5.0) -> threading.Thread | None:
    """Start the watchdog for `parent_pid` (default: the pid in PARENT_ENV, which is then removed from the
    environment). Returns the thread, or None when there is no parent to watch or no /proc."""
    if parent_pid is None:
        value = os.environ.pop(PARENT_ENV, "").strip()
        if not value.isdigit():
            return None
        parent_pid = int(value)
    if not procfs.available():
        return None
    os.environ[TOKEN_ENV] = f"{os.getpid()}-{uuid.uuid4().hex}"
    parent = (parent_pid, _start_time(parent_pid))  # start time None: already gone
    first_ppid = os.getppid()
    orphaned = threading.Event()  # set once the parent is gone: only then is anything killed
    atexit.register(_kill_the_rest, orphaned)  # before Ray's own handler, so after it: the main thread may exit first
    thread = threading.Thread(target=_watch, args=(parent, first_ppid, interval, grace, orphaned),
                              name="ecgtwin-parent-watchdog", daemon=True)
    thread.start()
    return thread


def parent_gone(parent: tuple[int, int | None], first_ppid: int) -> bool:
    """The launcher has ended: we were re-parented, or its pid is gone (or now names another process)."""
    pid, started = parent
    return os.getppid() != first_ppid or started is None or not _alive((pid, started))


def _watch(parent: tuple[int, int | None], first_ppid: int, interval: float, grace: float,
           orphaned: threading.Event) -> None:
    while not parent_gone(parent, first_ppid):
        time.sleep(interval)
    try:
        orphaned.set()
        stop_everything(grace, orphaned)
    finally:
        os._exit(1)


def stop_everything(grace: float, orphaned: threading.Event) -> None:
    """SIGINT to this process (the driver: Flower and Ray shut down) and SIGTERM to all our other processes
    (Ray's block SIGINT; on SIGTERM the raylet, the GCS and the workers exit); after `grace` s, SIGKILL to
    every one that remains."""
    me = os.getpid()
    seen = set(our_processes())
    os.kill(me, signal.SIGINT)
    for proc in seen:
        _signal(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        seen |= set(our_processes())
        if not any(_alive(p) for p in seen):
            break
        time.sleep(0.2)
    _kill_the_rest(orphaned, seen)
    if os.getpgrp() == me:  # launched with start_new_session: never signal a group we don't lead
        _signal_group(me, signal.SIGKILL)  # ourselves included


def _kill_the_rest(orphaned: threading.Event, seen: set[Identity] | None = None) -> None:
    """SIGKILL to our processes, only once orphaned (also at exit, should the main thread end first)."""
    if not orphaned.is_set():
        return
    for proc in (seen or set()) | set(our_processes()):
        _signal(proc, signal.SIGKILL)


def our_processes() -> list[Identity]:
    """Every process, except this one, in our process group (when we lead it), descended from us, or whose
    environment carries our token."""
    me = os.getpid()
    token = os.environ.get(TOKEN_ENV, "")
    stats = {pid: found for pid in procfs.pids() if (found := procfs.stat(pid)) is not None}
    ours = {pid for pid, found in stats.items() if found.pgrp == me}
    children: dict[int, list[int]] = {}
    for pid, found in stats.items():
        children.setdefault(found.ppid, []).append(pid)
    stack = [me]
    while stack:
        for child in children.get(stack.pop(), []):
            if child not in ours:
                ours.add(child)
                stack.append(child)
    if token:
        ours |= {pid for pid in stats.keys() - ours if procfs.environ_has(pid, f"{TOKEN_ENV}={token}")}
    ours.discard(me)
    return [(pid, stats[pid].start_time) for pid in ours if pid in stats]


def _start_time(pid: int) -> int | None:
    found = procfs.stat(pid)
    return None if found is None else found.start_time


def _alive(proc: Identity) -> bool:
    """Still running, and still the process we found (not a reused pid); a zombie has ended."""
    found = procfs.stat(proc[0])
    return found is not None and found.start_time == proc[1] and found.state not in ("Z", "X")


def _signal(proc: Identity, sig: int) -> None:
    if _start_time(proc[0]) == proc[1]:  # still the process we found, not a reused pid
        try:
            os.kill(proc[0], sig)
        except (ProcessLookupError, PermissionError):
            pass


def _signal_group(group: int, sig: int) -> None:
    try:
        os.killpg(group, sig)
    except (ProcessLookupError, PermissionError):
        pass
