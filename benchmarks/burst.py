"""Probe 3: a burst of tasks written as fast as the writer can, to a subject that runs an agent
that exits at once: tasks per second, lost and extra runs. The same probe runs against the peers.
"""

from __future__ import annotations

import time
from typing import Any

from benchmarks.common import Subject
from tests.harness import wait_until


def burst(subject: Subject, count: int, prefix: str = "burst", timeout: float = 600) -> dict[str, Any]:
    ids = [f"{prefix}-{i:05d}" for i in range(count)]
    already = subject.done()
    began = time.perf_counter()
    for task_id in ids:
        subject.submit(task_id)
    written = time.perf_counter() - began
    wait_until(lambda: subject.done() - already >= count, timeout, 0.01, f"{count} results from {subject.name}")
    elapsed = time.perf_counter() - began
    time.sleep(0.5)  # a duplicate run would land just after: give it the chance to show
    runs = subject.runs()
    wanted = set(ids)
    ours = {task_id: n for task_id, n in runs.items() if task_id.startswith(f"{prefix}-")}
    return {
        "tasks": count,
        "write_s": written,
        "elapsed_s": elapsed,
        "tasks_per_s": count / elapsed,
        "per_task_ms": elapsed / count * 1000,
        "lost": len(wanted - set(ours)),
        "extra": sum(n - 1 if t in wanted else n for t, n in ours.items()),
    }
