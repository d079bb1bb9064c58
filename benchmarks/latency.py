"""Probe 1: one task at a time, the subject idle: from the writer's clock before the hand-off to the
agent started. The same loop measures our inotify, Redis-event and poll wake-ups and every peer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import OurTree, Subject, atomic_task, bench_tree
from benchmarks.stats import summary
from tests.harness import RedisServer, WorkerTree, wait_until


def one_at_a_time(
    subject: Subject, samples: int, prefix: str, submit: Callable[[str], float] | None = None
) -> list[float]:
    """Milliseconds from the hand-off to the agent's start, one task at a time."""
    send = submit or subject.submit
    delays = []
    for i in range(samples):
        task_id = f"{prefix}-{i:05d}"
        time.sleep(0.02 + (i % 7) * 0.003)  # idle between tasks, and never in step with a timer
        handed = send(task_id)
        started = wait_until(functools.partial(subject.started, task_id), 60, 0.002, f"the agent of {task_id}")
        delays.append((started - handed) * 1000)
    return delays


def result_field(tree: WorkerTree, prefix: str) -> dict[str, float]:
    """The executor's own ``activation_latency_ms`` over the same tasks (from the file's visibility)."""
    values = []
    for path in tree.spool.results(tree.worker).glob(f"{prefix}-*.json"):
        result = tree.result(path.stem) or {}
        if "activation_latency_ms" in result:
            values.append(float(result["activation_latency_ms"]))
    return summary(values)


def inotify(tree: WorkerTree, samples: int) -> dict[str, Any]:
    ours = OurTree(tree)
    return {"writer": summary(one_at_a_time(ours, samples, "ino")), "result_field": result_field(tree, "ino")}


def redis_event(root: Path, samples: int) -> dict[str, Any]:
    """Polling at 30 s, rescans at 30 s: only the PUBLISH can explain a fast wake. From PUBLISH to agent start."""
    import redis

    server = RedisServer(root / "redis").start()
    tree = bench_tree(
        root / "events",
        REDIS_URL=server.url,
        ACTIVATION_MODE="poll,redis",
        ACTIVATION_POLL_INTERVAL="30",
        ACTIVATION_RESCAN_INTERVAL="30",
    )
    client = redis.Redis.from_url(server.url)
    try:
        tree.start()
        ours = OurTree(tree)

        def publish(task_id: str) -> float:
            atomic_task(ours.inbox, task_id)
            published = time.time()
            client.publish(f"activate:{tree.worker}", task_id)
            return published

        return {"writer": summary(one_at_a_time(ours, samples, "evt", publish))}
    finally:
        client.close()
        tree.kill_everything()
        server.stop()


def poll(root: Path, samples: int, interval: float) -> dict[str, Any]:
    tree = bench_tree(root / "poll", ACTIVATION_MODE="poll", ACTIVATION_POLL_INTERVAL=str(interval))
    try:
        tree.start()
        return {"writer": summary(one_at_a_time(OurTree(tree), samples, "poll")), "interval_ms": interval * 1000}
    finally:
        tree.kill_everything()
