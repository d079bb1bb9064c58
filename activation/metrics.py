"""Prometheus metrics of a worker, shared by its programs through prometheus_client's multiprocess mode.

Each program writes its samples to files under ``<run_dir>/metrics``; the heartbeat serves the
sum. `enable_multiprocess` must run before the first metric is created in a process.
"""

from __future__ import annotations

import contextlib
import glob
import os
from functools import lru_cache
from pathlib import Path

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client import multiprocess as prom_multiprocess

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


def enable_multiprocess(folder: Path) -> None:
    """Point prometheus_client at ``folder``, whatever was imported before."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def multiprocess_registry() -> CollectorRegistry:
    """A registry that sums every program's samples, for serving /metrics."""
    registry = CollectorRegistry()
    prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    return registry


def forget_dead_processes(folder: Path) -> None:
    """Drop live gauges of programs that died (SIGKILL gives them no chance to clean up)."""
    pids: set[int] = set()
    for path in glob.glob(str(folder / "gauge_live*_*.db")):
        with contextlib.suppress(ValueError):
            pids.add(int(Path(path).stem.rsplit("_", 1)[1]))
    for pid in pids:
        if not psutil.pid_exists(pid):
            prom_multiprocess.mark_process_dead(pid, str(folder))  # type: ignore[no-untyped-call]


class WorkerMetrics:
    """The worker's metrics. One instance per process, created after `enable_multiprocess`."""

    def __init__(self) -> None:
        self.task_queue_size = Gauge(
            "task_queue_size", "Tasks pending in the inbox", ["worker"], multiprocess_mode="livemax"
        )
        self.tasks_completed = Counter("tasks_completed", "Tasks that got a result, by status", ["worker", "status"])
        self.task_processing_seconds = Histogram(
            "task_processing_seconds", "Agent run time, by status", ["worker", "status"], buckets=DURATION_BUCKETS
        )
        self.activation_latency_seconds = Histogram(
            "activation_latency_seconds",
            "From the task file becoming visible to the agent starting",
            ["worker", "source"],
            buckets=LATENCY_BUCKETS,
        )
        self.tasks_dead_lettered = Counter("tasks_dead_lettered", "Tasks sent to the dead letter", ["worker", "reason"])
        self.agent_timeouts = Counter("agent_timeouts", "Agent runs killed at their timeout")
        self.listener_events = Counter("listener_events", "Wake-ups seen by the listener", ["source"])
        self.inotify_overflows = Counter("inotify_overflows", "inotify queue overflows (each triggers a rescan)")
        self.redis_connected = Gauge(
            "redis_connected", "1 when the listener's Redis subscription is up", multiprocess_mode="livemax"
        )
        self.worker_up = Gauge("worker_up", "1 while the worker's heartbeat runs", multiprocess_mode="livemax")


@lru_cache(maxsize=1)
def worker_metrics() -> WorkerMetrics:
    return WorkerMetrics()
