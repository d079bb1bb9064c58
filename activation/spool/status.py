"""Live worker status: the heartbeat's judgement (spool.health) with the spool's own facts laid
over it, read when asked: the current task from the claim, the queue from the inbox, the results
from the results folder. Nothing here lags by a heartbeat interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activation.spool.health import WorkerHealth, all_health, worker_health
from activation.spool.layout import Spool
from activation.spool.listing import FINISHED, Query, finished
from activation.spool.result_index import ResultIndex

RECENT_WINDOW_S = 3600.0  # the window whose results `status` counts by status
RECENT_CAP = 1000  # ... reading at most this many (the newest): `status` stays cheap at any rate


@dataclass
class LiveStatus:
    """One worker, live. ``health`` keeps its own fields (``status --json`` is their superset)."""

    health: WorkerHealth
    current_task: str | None = None
    running: list[str] = field(default_factory=list)
    queue_size: int = 0
    results_total: int = 0
    recent: dict[str, int] = field(default_factory=dict)  # by state, over RECENT_WINDOW_S
    recent_capped: bool = False  # True: more than RECENT_CAP results in the window; counts are the newest
    unreadable: list[str] = field(default_factory=list)  # result files in the window that are no result

    @property
    def worker(self) -> str:
        return self.health.worker

    def as_dict(self) -> dict[str, Any]:
        data = self.health.as_dict()
        data.update(
            current_task=self.current_task,
            running=self.running,
            queue_size=self.queue_size,
            results_total=self.results_total,
            recent_counts=self.recent,
            recent_window_s=RECENT_WINDOW_S,
            recent_capped=self.recent_capped,
            unreadable_results=self.unreadable,
            heartbeat_current_task=self.health.current_task,
            heartbeat_queue_size=self.health.queue_size,
        )
        return data


def count_results(spool: Spool, worker: str) -> int:
    """Result files of ``worker``: the result index's count while it is valid, else one scandir (no stat, no read)."""
    return ResultIndex(spool, worker).count()


def live(spool: Spool, health: WorkerHealth, *, now: float | None = None) -> LiveStatus:
    now = time.time() if now is None else now
    worker = health.worker
    claimed = spool.claimed_ids(worker)
    recent: dict[str, int] = {}
    query = Query(workers=(worker,), states=FINISHED, since=now - RECENT_WINDOW_S, limit=RECENT_CAP)
    seen = 0
    unreadable: list[str] = []
    for row in finished(spool, query, unreadable):
        recent[row.state] = recent.get(row.state, 0) + 1
        seen += 1
    return LiveStatus(
        health=health,
        current_task=claimed[0] if claimed else None,
        running=claimed,
        queue_size=spool.count_inbox(worker),
        results_total=count_results(spool, worker),
        recent=recent,
        recent_capped=seen >= RECENT_CAP,
        unreadable=unreadable,
    )


def live_status(
    spool: Spool, *, timeout: float, worker: str | None = None, local: tuple[str | None, Path] | None = None
) -> list[LiveStatus]:
    """Every worker (or one), live; ``local`` (worker, run folder) names the tree this process belongs to."""
    if worker is None:
        return [live(spool, h) for h in all_health(spool, timeout=timeout, local=local)]
    from activation.spool.health import dead_letter_counts

    dead = dead_letter_counts(spool).get(worker, 0)
    run_dir = local[1] if local is not None and local[0] == worker else None
    return [live(spool, worker_health(spool, worker, timeout=timeout, dead_letters=dead, run_dir=run_dir))]
