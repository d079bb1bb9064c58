"""Probe 1b: the first task after a start or a restart, from supervisord reporting every program
RUNNING (over its XML-RPC socket, as supervisorctl asks it) to the agent started.

A worker that reports RUNNING is ready to take work: the task is written the moment it does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.common import OurTree, Supervisor, bench_tree, launch
from benchmarks.stats import summary
from tests.harness import wait_until


def first_task(root: Path, starts: int, restarts: int) -> dict[str, Any]:
    after_start, after_restart = [], []
    for n in range(starts):
        tree = bench_tree(root / f"first-{n}")
        ours = OurTree(tree)
        try:
            launch(tree)
            supervisor = Supervisor(tree)
            after_start.append(_first(ours, supervisor, f"start{n}"))
            # Restarts happen on this same tree, once the first task has gone through.
            for r in range(restarts if n == 0 else 0):
                supervisor.stop_all()
                supervisor.start_all()
                after_restart.append(_first(ours, supervisor, f"restart{r}"))
        finally:
            tree.kill_everything()
    return {
        "after_start_ms": summary(after_start) if after_start else None,
        "after_restart_ms": summary(after_restart) if after_restart else None,
    }


def _first(ours: OurTree, supervisor: Supervisor, task_id: str) -> float:
    running = supervisor.wait_running()
    ours.submit(task_id)
    started = wait_until(lambda: ours.started(task_id), 60, 0.002, f"the first task {task_id}")
    return float((started - running) * 1000)
