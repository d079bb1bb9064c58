"""Prometheus metrics of a worker, shared by its programs through prometheus_client's multiprocess mode.

Each program writes its samples to files under ``<run_dir>/metrics``; the heartbeat serves the
sum. This module also keeps that folder honest when programs die: a dead program's live gauges go.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterable
from functools import cached_property, lru_cache
from pathlib import Path

import psutil
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client import multiprocess as prom_multiprocess
from prometheus_client.metrics_core import Metric

from activation.observability.multiprocess import MULTIPROC_ENV, adopt_folder, enable_multiprocess, multiprocess_folder

__all__ = ["MULTIPROC_ENV", "WorkerMetrics", "adopt_folder", "enable_multiprocess", "multiprocess_folder"]

LIVE_GAUGES = "gauge_live*_*.db"  # one file per process and live mode: gauge_livemax_<pid>.db
# A program creates its file a moment before it maps it: a file this young is never judged orphaned
# by a live pid that does not map it yet.
STARTUP_GRACE = 5.0

LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0015,
    0.002,
    0.003,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)

_folder_lock = threading.Lock()  # the heartbeat cleans on its loop and in its scrape thread


class WorkerCollector:
    """Sums every program's samples, after dropping the live gauges of programs that are gone."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def collect(self) -> Iterable[Metric]:
        forget_dead_processes(self.folder)
        files = [str(path) for path in self.folder.glob("*.db")]
        return list(prom_multiprocess.MultiProcessCollector.merge(files, accumulate=True))  # type: ignore[no-untyped-call]


def multiprocess_registry(folder: Path | None = None) -> CollectorRegistry:
    """A registry that sums every program's samples, for serving /metrics (folder: the one in use)."""
    folder = folder or multiprocess_folder()
    if folder is None or not folder.is_dir():
        raise ValueError(f"{MULTIPROC_ENV} is not set or not a folder: call enable_multiprocess first")
    registry = CollectorRegistry()
    registry.register(WorkerCollector(folder))
    return registry


def forget_dead_processes(folder: Path, *, grace: float = STARTUP_GRACE) -> list[int]:
    """Drop the live gauges of programs that are gone; returns their pids.

    SIGKILL gives a program no chance to clean up, and a bare "is the pid alive" is fooled by pid
    reuse, which containers make common. A file is a live program's only while a process with
    that pid maps it; counters and histograms of dead programs stay, so sums never go back.
    """
    gone: list[int] = []
    with _folder_lock:
        for path in sorted(folder.glob(LIVE_GAUGES)):
            pid = _pid_of(path)
            if pid is None or pid in gone or _owned(pid, path, grace):
                continue
            _remove_live_gauges(folder, pid)
            gone.append(pid)
    return gone


def _pid_of(path: Path) -> int | None:
    try:
        return int(path.stem.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return None


# file -> (pid, that process's start time), once the file was seen in the process's maps. A
# heartbeat checks every few seconds: reading /proc/<pid>/maps each time was most of its cost.
_owners: dict[str, tuple[int, float]] = {}


def _owned(pid: int, path: Path, grace: float) -> bool:
    """Whether a running process with this pid is (or, just started, may become) the file's owner."""
    if pid <= 0:
        return False
    try:
        started = psutil.Process(pid).create_time()
    except psutil.Error:
        return False
    key = str(path)
    if _owners.get(key) == (pid, started):
        return True  # the same process that mapped it last time
    maps = _mapped_files(pid)
    if maps is None:
        return True  # cannot look inside (no procfs, another user): trust the pid
    if str(path.resolve()) in maps:
        _owners[key] = (pid, started)
        return True
    try:
        return time.time() - path.stat().st_mtime < grace
    except FileNotFoundError:
        return True  # gone already: nothing to do


def _mapped_files(pid: int) -> set[str] | None:
    """The files ``pid`` maps (from /proc/<pid>/maps); empty when it died; None when unknowable."""
    try:
        with open(f"/proc/{pid}/maps", encoding="utf-8", errors="replace") as maps:
            lines = maps.read().splitlines()
    except FileNotFoundError:
        return None if not os.path.isdir("/proc/self") else set()
    except OSError:
        return None
    files = set()
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            files.add(fields[5])
    return files


def _remove_live_gauges(folder: Path, pid: int) -> None:
    # prometheus_client's mark_process_dead, minus its race: two cleaners must not fail each other.
    for path in folder.glob(f"gauge_live*_{pid}.db"):
        _owners.pop(str(path), None)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def counter_totals(folder: Path, name: str) -> list[tuple[dict[str, str], float]]:
    """The summed ``<name>_total`` samples across programs: (labels, value). Reads counter files only."""
    files = [str(path) for path in folder.glob("counter_*.db")]
    totals = []
    for family in prom_multiprocess.MultiProcessCollector.merge(files, accumulate=True):  # type: ignore[no-untyped-call]
        if family.name == name:
            totals += [(dict(s.labels), float(s.value)) for s in family.samples if s.name == f"{name}_total"]
    return totals


class WorkerMetrics:
    """The worker's metrics. One instance per process, created after `enable_multiprocess`.

    Names follow Prometheus conventions (base units, ``_total`` on counters, which
    prometheus_client adds). Gauges use live modes, so a dead program's values leave the sum.
    """

    def __init__(self, registry: CollectorRegistry | None = REGISTRY) -> None:
        self._registry = registry
        self.task_queue_size = Gauge(
            "task_queue_size",
            "Task files waiting in the worker's inbox (claimed ones excluded)",
            ["worker"],
            multiprocess_mode="livemostrecent",  # one writer, the heartbeat: its latest word counts
            registry=registry,
        )
        self.tasks_completed = Counter(
            "tasks_completed",
            "Tasks that got a result, by status (completed, failed, timeout)",
            ["worker", "status"],
            registry=registry,
        )
        self.task_processing_seconds = Histogram(
            "task_processing_seconds",
            "Agent run time, from spawn to the end of its process tree, by status",
            ["worker", "status"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.activation_latency_seconds = Histogram(
            "activation_latency_seconds",
            "From the task file becoming visible to the agent starting, by the source that woke the listener",
            ["worker", "source"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tasks_dead_lettered = Counter(
            "tasks_dead_lettered",
            "Tasks sent to the dead letter, by reason",
            ["worker", "reason"],
            registry=registry,
        )
        self.agent_timeouts = Counter("agent_timeouts", "Agent runs killed at their timeout", registry=registry)
        self.listener_events = Counter(
            "listener_events", "Wake-ups seen by the listener, by source", ["source"], registry=registry
        )
        self.listener_refused = Counter(
            "listener_refused",
            "Redis activate messages the listener refused (not a task id or a path in the inbox), by reason",
            ["reason"],
            registry=registry,
        )
        self.inotify_overflows = Counter(
            "inotify_overflows", "inotify queue overflows (each one triggers a rescan)", registry=registry
        )
        self.worker_up = Gauge(
            "worker_up", "1 while the worker's heartbeat runs", multiprocess_mode="livemax", registry=registry
        )

    @cached_property
    def redis_connected(self) -> Gauge:
        """Created on first use: only a worker that uses Redis exports it, so 0 always means trouble.

        Every program that talks to Redis sets it; the minimum over live programs is served, so
        one program that lost Redis is enough to show 0.
        """
        return Gauge(
            "redis_connected",
            "1 when every program of the worker that uses Redis is connected to it",
            multiprocess_mode="livemin",
            registry=self._registry,
        )


@lru_cache(maxsize=1)
def worker_metrics() -> WorkerMetrics:
    return WorkerMetrics()
