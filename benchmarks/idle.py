"""Probe 2: an idle worker tree's CPU and memory (supervisord and its three programs, each and in
all), and how long an idle executor takes to exit on SIGTERM.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import time
from typing import Any

import psutil

from benchmarks.common import Supervisor
from benchmarks.stats import summary
from tests.harness import WorkerTree, wait_until

CLOCK_TICK_S = 1 / os.sysconf("SC_CLK_TCK")  # the resolution of the kernel's tick accounting
# The scheduler's own run time per thread (/proc/<pid>/task/<tid>/schedstat) is in nanoseconds:
# over 60 s a tick is 0.017 % of a core, a third of the whole tree's target, too coarse to read.
SCHEDSTAT_RESOLUTION_S = 1e-6


def _role(proc: psutil.Process) -> str:
    cmdline = proc.cmdline()
    if any("supervisord" in part or part == "activation.supervise" for part in cmdline):
        return "supervisord"
    if "worker" in cmdline and cmdline.index("worker") + 1 < len(cmdline):
        return cmdline[cmdline.index("worker") + 1]
    return os.path.basename(cmdline[0]) if cmdline else str(proc.pid)


def _run_times(pid: int) -> dict[str, int] | None:
    """Nanoseconds the scheduler ran each of ``pid``'s threads, from schedstat; None where it cannot tell."""
    try:
        times = {}
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as stat:
                times[tid] = int(stat.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return times


class _Window:
    """One process's CPU over a window: schedstat's nanoseconds, unless the kernel's ticks (which
    keep what ended threads used; a thread that ends takes its schedstat with it) say more."""

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self.threads = _run_times(proc.pid)
        self.times = proc.cpu_times()

    def seconds(self) -> tuple[float, bool]:
        """CPU seconds since the start of the window, and whether they are schedstat's (precise)."""
        threads = _run_times(self.proc.pid)
        now, then = self.proc.cpu_times(), self.times
        ticked = now.user + now.system - then.user - then.system
        # Children that exited and were reaped meanwhile.
        reaped = now.children_user + now.children_system - then.children_user - then.children_system
        if self.threads is not None and threads is not None:
            # Only the threads there at both ends: one that ended and one that started are not comparable.
            ran = sum(t - self.threads[tid] for tid, t in threads.items() if tid in self.threads) / 1e9
            if ticked - ran <= 2 * CLOCK_TICK_S:  # the ticks' own rounding, not a thread's lost time
                return ran + reaped, True
        return ticked + reaped, False


def process_usage(root_pid: int, seconds: float) -> dict[str, Any]:
    """CPU (% of one core) over ``seconds`` and memory at the end, of ``root_pid`` and every descendant."""
    root = psutil.Process(root_pid)
    windows = [_Window(p) for p in [root, *root.children(recursive=True)]]
    time.sleep(seconds)
    rows = []
    precise = True
    for window in windows:
        proc = window.proc
        with contextlib.suppress(psutil.Error):
            used, exact = window.seconds()
            precise = precise and exact
            memory = proc.memory_full_info()
            rows.append(
                {
                    "process": _role(proc),
                    "pid": proc.pid,
                    "cpu_percent": used / seconds * 100,
                    "rss_mb": memory.rss / 2**20,
                    "pss_mb": memory.pss / 2**20,
                    "uss_mb": memory.uss / 2**20,
                }
            )
    return {
        "seconds": seconds,
        "resolution_percent": (SCHEDSTAT_RESOLUTION_S if precise else CLOCK_TICK_S) / seconds * 100,
        "processes": rows,
        "cpu_percent": sum(r["cpu_percent"] for r in rows),
        "rss_mb": sum(r["rss_mb"] for r in rows),
        "pss_mb": sum(r["pss_mb"] for r in rows),
        "uss_mb": sum(r["uss_mb"] for r in rows),
    }


def idle(tree: WorkerTree, seconds: float, settle: float) -> dict[str, Any]:
    assert tree.process is not None
    time.sleep(settle)  # let the last task's aftermath (heartbeat, rescan) pass: this measures idling
    return process_usage(tree.process.pid, seconds)


def sigterm_exit(tree: WorkerTree, samples: int) -> dict[str, Any]:
    """Milliseconds from SIGTERM to an idle executor's exit (supervisord reaps it and starts another)."""
    supervisor = Supervisor(tree)
    delays = []
    for _ in range(samples):
        supervisor.wait_running()
        pid = supervisor.pid("executor")
        time.sleep(random.uniform(0.5, 2.5))  # idle, at an arbitrary point of whatever it waits on
        proc = psutil.Process(pid)
        began = time.perf_counter()
        os.kill(pid, signal.SIGTERM)
        wait_until(functools.partial(_gone, proc), 30, 0.001, f"executor {pid} to exit on SIGTERM")
        delays.append((time.perf_counter() - began) * 1000)
        wait_until(functools.partial(_restarted, supervisor, pid), 30, 0.05, "the executor restarted")
    return summary(delays)


def _restarted(supervisor: Supervisor, old_pid: int) -> bool:
    return supervisor.states().get("executor") == "RUNNING" and supervisor.pid("executor") != old_pid


def _gone(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
