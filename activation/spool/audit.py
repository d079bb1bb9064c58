"""``activation audit``: check the spool's invariants and list every violation.

A task id is in exactly one place (a result with a leftover claim is allowed: recovery drops
the claim); no claim belongs to a dead worker; no temp file is older than a bound; every dead
letter has a reason.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from activation.spool.atomic import TEMP_PREFIX, read_json
from activation.spool.health import worker_health
from activation.spool.layout import Spool
from activation.spool.task import TASK_SUFFIX, task_id_of


@dataclass(frozen=True)
class Violation:
    kind: str  # duplicate | dead_worker_claim | stale_temp | dead_letter_without_reason
    task_id: str | None
    detail: str

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


def _json_names(folder: Path) -> Iterator[str]:
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(TASK_SUFFIX) and not entry.name.startswith("."):
                yield entry.name


def _temp_files(folder: Path) -> Iterator[os.DirEntry[str]]:
    with contextlib.suppress(FileNotFoundError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                yield entry


def audit(spool: Spool, *, heartbeat_timeout: float, temp_age: float, now: float | None = None) -> list[Violation]:
    """Every violation of the spool's invariants, in a stable order."""
    now = time.time() if now is None else now
    violations: list[Violation] = []
    places: dict[str, list[str]] = defaultdict(list)
    workers = spool.workers()
    folders: list[Path] = [spool.dead_letter_dir, spool.heartbeats_dir, spool.tasks_dir, spool.results_dir]
    for worker in workers:
        inbox, processing, results = spool.inbox(worker), spool.processing(worker), spool.results(worker)
        folders += [inbox, processing, results]
        for name in _json_names(inbox):
            places[task_id_of(name)].append(f"pending@{worker}")
        claims = list(_json_names(processing))
        for name in claims:
            places[task_id_of(name)].append(f"processing@{worker}")
        for name in _json_names(results):
            places[task_id_of(name)].append(f"done@{worker}")
        if claims:
            health = worker_health(spool, worker, timeout=heartbeat_timeout, now=now)
            if not health.alive:
                for name in claims:
                    violations.append(
                        Violation(
                            "dead_worker_claim",
                            task_id_of(name),
                            f"claimed in {processing} but worker {worker} is not alive ({'; '.join(health.problems)})",
                        )
                    )
    for path in spool.dead_letters():
        try:
            record = read_json(path)
        except (OSError, ValueError) as exc:
            violations.append(Violation("dead_letter_without_reason", None, f"{path}: unreadable ({exc})"))
            continue
        task_id = record.get("task_id") if isinstance(record, dict) else None
        if task_id:
            places[str(task_id)].append("dead")
        if not isinstance(record, dict) or not record.get("reason"):
            violations.append(Violation("dead_letter_without_reason", task_id, f"{path} has no reason"))
    for task_id, where in sorted(places.items()):
        if len(where) > 1 and not _leftover_claim(where):
            violations.append(Violation("duplicate", task_id, f"in {len(where)} places: {', '.join(sorted(where))}"))
    for folder in folders:
        for entry in _temp_files(folder):
            with contextlib.suppress(FileNotFoundError):
                age = now - entry.stat(follow_symlinks=False).st_mtime
                if age > temp_age:
                    violations.append(Violation("stale_temp", None, f"{entry.path} is {age:.0f}s old"))
    return violations


def _leftover_claim(where: list[str]) -> bool:
    """A result plus the claim of the same worker: a crash between the two writes."""
    if len(where) != 2:
        return False
    kinds = sorted(w.split("@", 1) for w in where)
    return [k for k, _ in kinds] == ["done", "processing"] and kinds[0][1] == kinds[1][1]
