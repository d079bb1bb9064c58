"""The worker's metric families: name, type, help, labels, buckets. Imports nothing heavy.

The programs record against these (samples.py) and the heartbeat serves them (metrics.py); the
Grafana dashboard and the alert rules in containers/ query these names, so they are a contract.
Names follow Prometheus conventions: base units, and counters get ``_total`` when served.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

Kind = Literal["counter", "gauge", "histogram"]

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


class Spec(NamedTuple):
    name: str  # a counter's without ``_total``
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms: the finite upper bounds; +Inf is implied
    # Gauges: how the values of the live programs that set one combine (a dead program's go).
    combine: Literal["min", "max"] = "max"


SPECS = (
    Spec(
        "task_queue_size",
        "gauge",
        "Task files waiting in the worker's inbox (claimed ones excluded)",
        ("worker",),
    ),  # one writer, the heartbeat
    Spec(
        "tasks_completed",
        "counter",
        "Tasks that got a result, by status (completed, failed, timeout)",
        ("worker", "status"),
    ),
    Spec(
        "task_processing_seconds",
        "histogram",
        "Agent run time, from spawn to the end of its process tree, by status",
        ("worker", "status"),
        DURATION_BUCKETS,
    ),
    Spec(
        "activation_latency_seconds",
        "histogram",
        "From the task file becoming visible to the agent starting, by the source that woke the listener",
        ("worker", "source"),
        LATENCY_BUCKETS,
    ),
    Spec("tasks_dead_lettered", "counter", "Tasks sent to the dead letter, by reason", ("worker", "reason")),
    Spec("agent_timeouts", "counter", "Agent runs killed at their timeout"),
    Spec("listener_events", "counter", "Wake-ups seen by the listener, by source", ("source",)),
    Spec(
        "listener_refused",
        "counter",
        "Redis activate messages the listener refused (not a task id or a path in the inbox), by reason",
        ("reason",),
    ),
    Spec("inotify_overflows", "counter", "inotify queue overflows (each one triggers a rescan)"),
    Spec("worker_up", "gauge", "1 while the worker's heartbeat runs"),
    # Exported only once a program sets it (a worker without Redis has no series, so 0 always
    # means trouble); the minimum over live programs is served: one that lost Redis shows 0.
    Spec(
        "redis_connected",
        "gauge",
        "1 when every program of the worker that uses Redis is connected to it",
        combine="min",
    ),
)

CATALOG: dict[str, Spec] = {spec.name: spec for spec in SPECS}
