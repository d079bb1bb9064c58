"""Worker health, judged from the heartbeat files in the spool and the spool's own layout.

Used by ``activation status`` and ``activation check`` (and later the orchestrator). A worker is
healthy when its heartbeat is fresh, every program of its tree is RUNNING, the listener's wake
sources are alive, the executor makes progress and can start its agent and write its results,
the heartbeat serves its metrics, every folder the worker moves tasks through is a folder, and
the spool has room for a result.
"""

from __future__ import annotations

import os
import stat
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from activation.clock import parse_iso
from activation.spool.layout import Spool
from activation.spool.ownership import foreign_owner, last_refusal
from activation.spool.readers import BadRecord, dead_letter_record, heartbeat_record, peek_record, read_record

EXPECTED_PROGRAMS = ("listener", "executor", "heartbeat")


@dataclass
class WorkerHealth:
    worker: str
    alive: bool
    age_s: float | None
    state: str | None = None
    current_task: str | None = None
    queue_size: int | None = None
    programs: dict[str, str] | None = None
    counts: dict[str, int] = field(default_factory=dict)
    dead_letters: int = 0
    wake_sources: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    refused: dict[str, Any] | None = None  # the last second tree refused for this name (a note, not a problem)

    @property
    def healthy(self) -> bool:
        return self.alive and not self.problems

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["healthy"] = self.healthy
        return data


def worker_health(
    spool: Spool,
    worker: str,
    *,
    timeout: float,
    dead_letters: int = 0,
    now: float | None = None,
    observed_age: float | None = None,
    run_dir: Path | None = None,
) -> WorkerHealth:
    """``observed_age``: the heartbeat's age as the caller saw the file change on its own clock
    (the orchestrator's); without it the age is ``now`` minus the time the heartbeat wrote, which
    is only honest on the worker's own host. ``run_dir``: the asking tree's run folder, when the
    question is "is *this* tree running the worker?" (``activation check`` in the worker's container).
    """
    health = _from_heartbeat(
        spool, worker, timeout=timeout, dead_letters=dead_letters, now=now, observed_age=observed_age
    )
    health.refused = last_refusal(spool, worker)
    if run_dir is not None:
        other = foreign_owner(spool, worker, run_dir)
        if other is not None:
            health.problems.insert(0, f"another tree owns this worker ({other.describe()}); this one was refused")
    return health


def _from_heartbeat(
    spool: Spool, worker: str, *, timeout: float, dead_letters: int, now: float | None, observed_age: float | None
) -> WorkerHealth:
    now = time.time() if now is None else now
    path = spool.heartbeat_path(worker)
    layout = layout_problems(spool, worker) + space_problems(spool)
    try:
        beat = read_record(path, lambda value: heartbeat_record(value, worker=worker))
    except FileNotFoundError:
        return WorkerHealth(worker, False, None, dead_letters=dead_letters, problems=["no heartbeat", *layout])
    except (OSError, BadRecord) as exc:
        problems = [f"unreadable heartbeat: {exc}", *layout]
        return WorkerHealth(worker, False, None, dead_letters=dead_letters, problems=problems)
    stamp = beat.get("epoch") or parse_iso(beat.get("timestamp"))
    age = max(0.0, now - stamp) if stamp is not None else None
    if observed_age is not None:
        age = observed_age
    programs = beat.get("programs")
    health = WorkerHealth(
        worker=worker,
        alive=age is not None and age <= timeout and beat.get("state") != "stopped",
        age_s=None if age is None else round(age, 1),
        state=beat.get("state"),
        current_task=beat.get("current_task"),
        queue_size=beat.get("queue_size"),
        programs=programs,
        counts=beat.get("counts", {}),
        dead_letters=dead_letters,
        wake_sources=beat.get("wake_sources", []),
    )
    if beat.get("state") == "stopped":
        health.problems.append("stopped")
    else:
        if beat.get("state") == "restarting":
            health.problems.append("heartbeat restarting (the tree runs on)")
        if age is None or age > timeout:
            health.problems.append(f"heartbeat stale ({'?' if age is None else f'{age:.0f}'}s old)")
    if health.programs is not None:
        for program in EXPECTED_PROGRAMS:
            state = health.programs.get(program, "MISSING")
            if state != "RUNNING":
                health.problems.append(f"{program} {state}")
    listener = beat.get("listener")
    if isinstance(listener, dict):
        if listener.get("reachable") is False:
            health.problems.append("listener unreachable")
        elif listener.get("observer_alive") is False:
            health.problems.append("inotify observer dead")
        sources = listener.get("sources")
        for name, source in (sources if isinstance(sources, dict) else {}).items():
            if isinstance(source, dict) and source.get("alive") is False and name != "inotify":
                health.problems.append(f"wake source {name} dead")
    if health.alive:  # a stopped or stale worker's last words are not news
        health.problems.extend(_executor_problems(beat.get("executor")))
        metrics = beat.get("metrics")
        if isinstance(metrics, dict) and metrics.get("error"):
            health.problems.append(f"heartbeat {metrics['error']}")
    health.problems.extend(layout)
    return health


def _executor_problems(executor: Any) -> list[str]:
    if not isinstance(executor, dict):
        return []
    if executor.get("wedged"):
        return [f"executor wedged: no progress for {executor.get('beat_age_s', '?')}s"]
    if executor.get("state") == "degraded":
        return [f"executor degraded: {executor.get('detail') or executor.get('reason')}"]
    return []


def layout_problems(spool: Spool, worker: str) -> list[str]:
    """The folders this worker's tasks move through that are not folders (a file, or missing)."""
    problems = []
    folders = (
        spool.tasks_dir,
        spool.dead_letter_dir,
        spool.inbox(worker),
        spool.processing(worker),
        spool.results_dir,
        spool.results(worker),
    )
    for folder in folders:
        try:
            mode = os.stat(folder).st_mode
        except FileNotFoundError:
            problems.append(f"spool layout broken: {_relative(spool, folder)} is missing")
            continue
        except OSError as exc:
            problems.append(f"spool layout broken: {_relative(spool, folder)}: {exc.strerror or exc}")
            continue
        if not stat.S_ISDIR(mode):
            problems.append(f"spool layout broken: {_relative(spool, folder)} is not a folder")
    return problems


MIN_FREE_BYTES = 64 * 1024  # below this, no result (nor the heartbeat saying so) can be written


def space_problems(spool: Spool) -> list[str]:
    """A full spool: the heartbeat cannot report it (its own write fails too), so check looks itself."""
    try:
        info = os.statvfs(spool.root)
    except OSError:
        return []  # a missing root shows up as missing folders
    free = info.f_bavail * info.f_frsize
    if free < MIN_FREE_BYTES or (info.f_files and info.f_favail == 0):
        what = "no inodes" if free >= MIN_FREE_BYTES else f"{free // 1024} KiB"
        return [f"spool full: {what} left on {spool.root}; results and heartbeats cannot be written"]
    return []


def _relative(spool: Spool, path: Path) -> str:
    try:
        return str(path.relative_to(spool.root))
    except ValueError:
        return str(path)


def dead_letter_counts(spool: Spool) -> dict[str | None, int]:
    """Dead letters per worker (records that name none count under None)."""
    counts: dict[str | None, int] = {}
    for path in spool.dead_letters():
        record = peek_record(path, dead_letter_record)
        worker = record.get("worker") if record is not None else None
        counts[worker] = counts.get(worker, 0) + 1
    return counts


def all_health(
    spool: Spool, *, timeout: float, now: float | None = None, local: tuple[str | None, Path] | None = None
) -> list[WorkerHealth]:
    """Every worker's health; ``local`` (worker, run folder) names the tree this process belongs to."""
    dead = dead_letter_counts(spool)
    return [
        worker_health(
            spool,
            worker,
            timeout=timeout,
            dead_letters=dead.get(worker, 0),
            now=now,
            run_dir=local[1] if local is not None and local[0] == worker else None,
        )
        for worker in spool.workers()
    ]
