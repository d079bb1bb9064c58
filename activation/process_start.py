"""A process start, told apart from a later process that got the same pid: the machine's boot id
and the start time in clock ticks since boot (/proc). Containers count pids from 1 again at each
start, so a pid alone names no process for long. Used by the streams consumer names, by the
metrics files' owners, and by the executor to tell an agent's re-parented descendants apart.
"""

from __future__ import annotations

import os
import time

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as file:
            return file.read()
    except OSError:
        return None


def boot_id() -> str:
    """This boot's id (``/proc/sys/kernel/random/boot_id``), or "" where /proc does not say."""
    return (_read("/proc/sys/kernel/random/boot_id") or "").strip()


def start_ticks(pid: int) -> str | None:
    """The process's start in clock ticks since boot (field 22 of /proc/<pid>/stat); None if unknown."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    # The command name may hold spaces and parentheses: count fields after its closing one.
    fields = stat[stat.rfind(")") + 2 :].split()
    return fields[19] if len(fields) > 19 else None


def ticks_now() -> int:
    """Now, in the clock of ``start_ticks``: CLOCK_BOOTTIME in clock ticks, rounded down.

    A process started after this call has a ``start_ticks`` of at least this value.
    """
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * CLOCK_TICKS)
