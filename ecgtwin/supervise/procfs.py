"""What Linux's /proc says about processes: the one reader of it that the watchdog, the loopback deployment
and the fault tests share (the command name in /proc/PID/stat may hold spaces and parentheses, so its fields
are read after the last ")")."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

PROC = Path("/proc")


class Stat(NamedTuple):
    state: str  # R, S, D, Z (zombie: ended, not yet reaped), X, ...
    ppid: int
    pgrp: int  # process group
    start_time: int  # clock ticks since boot: with the pid, an identity that a reused pid does not share
    cpu_ticks: int = 0  # user + system time of the process itself (not its children), in clock ticks


def available() -> bool:
    return (PROC / "self" / "stat").is_file()


def pids() -> list[int]:
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def stat(pid: int) -> Stat | None:
    """The process' /proc/PID/stat, or None when it is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # state ppid pgrp session tty tpgid flags ... starttime (20th)
    return Stat(fields[0], int(fields[1]), int(fields[2]), int(fields[19]), int(fields[11]) + int(fields[12]))


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    found = stat(pid)
    return found is not None and found.state not in ("Z", "X")


def environ_has(pid: int, entry: str) -> bool:
    """Whether NAME=VALUE `entry` is in the process' environment (False when it is gone or not ours)."""
    try:
        return entry.encode() in (PROC / str(pid) / "environ").read_bytes().split(b"\0")
    except OSError:
        return False


def ticks_per_second() -> int:
    """Clock ticks per second: the unit of Stat.cpu_ticks."""
    return os.sysconf("SC_CLK_TCK")


def command_line(pid: int) -> str:
    try:
        return (PROC / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
