"""``activation audit``: check the spool's invariants and list every violation.

A task id is in exactly one place (a result with a leftover claim is allowed: recovery drops
the claim; a `duplicate` dead letter is a refused copy, not a place); no claim belongs to a dead
worker; no temp file is older than a bound; every dead letter has a reason. Whatever the spool
holds, audit reports it: a folder it cannot list is an `unreadable` violation, never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from activation.spool import ownership
from activation.spool.atomic import TEMP_PREFIX
from activation.spool.layout import Spool
from activation.spool.readers import BadRecord, dead_letter_record, last_history, read_record
from activation.spool.task import DUPLICATE, TASK_SUFFIX, is_task_name


@dataclass(frozen=True)
class Violation:
    kind: str  # duplicate | dead_worker_claim | stale_temp | dead_letter_without_reason | unreadable
    task_id: str | None
    detail: str

    def as_dict(self) -> dict[str, str | None]:
        return asdict(self)


@dataclass
class _Scan:
    """What one audit found so far; a folder it cannot list is a violation, not an exception.

    Each folder is listed once (its task names and its temp files both come from that listing),
    and nothing per entry is made beyond its name: audit is O(spool), so its cost per file is
    what it keeps small.
    """

    violations: list[Violation] = field(default_factory=list)
    _listed: dict[Path, list[str]] = field(default_factory=dict)

    def names(self, folder: Path) -> list[str]:
        """The names in ``folder`` (os.listdir: plain strings, the cheapest listing there is)."""
        listed = self._listed.get(folder)
        if listed is not None:
            return listed
        try:
            listed = os.listdir(folder)
        except FileNotFoundError:
            listed = []
        except OSError as exc:
            self.violations.append(Violation("unreadable", None, f"cannot list {folder}: {exc.strerror or exc}"))
            listed = []
        self._listed[folder] = listed
        return listed

    def json_ids(self, folder: Path) -> list[str]:
        """The task ids of the ``.json`` files in ``folder`` (dot files excluded)."""
        cut = -len(TASK_SUFFIX)
        return [name[:cut] for name in self.names(folder) if name.endswith(TASK_SUFFIX) and not name.startswith(".")]


def audit(spool: Spool, *, heartbeat_timeout: float, temp_age: float, now: float | None = None) -> list[Violation]:
    """Every violation of the spool's invariants, in a stable order. Never raises on what is in the spool."""
    now = time.time() if now is None else now
    scan = _Scan()
    violations = scan.violations
    # task id -> its place ("<state>@<worker>" or "dead"); the ids in more than one, apart. Most
    # ids have one place: one str each, no list, and no path until a second place needs one.
    place: dict[str, str] = {}
    more: dict[str, list[str]] = {}

    def seen(task_id: str, where: str) -> None:
        first = place.setdefault(task_id, where)
        if first != where:
            more.setdefault(task_id, [first]).append(where)

    try:
        workers = spool.workers()
    except OSError as exc:
        violations.append(Violation("unreadable", None, f"cannot list the workers in {spool.root}: {exc}"))
        workers = []
    folders: list[Path] = [spool.dead_letter_dir, spool.heartbeats_dir, spool.tasks_dir, spool.results_dir]
    for worker in workers:
        inbox, processing, results = spool.inbox(worker), spool.processing(worker), spool.results(worker)
        folders += [inbox, processing, results]
        for folder, state in ((inbox, "pending"), (processing, "processing"), (results, "done")):
            where = f"{state}@{worker}"
            for task_id in scan.json_ids(folder):  # seen(), inlined: this loop runs once per file
                first = place.setdefault(task_id, where)
                if first != where:
                    more.setdefault(task_id, [first]).append(where)
        # A claim beside its result is a leftover the result wins over (allowed below).
        claims = [task_id for task_id in scan.json_ids(processing) if not spool.has_result(worker, task_id)]
        # A claim is a dead worker's when its executor is provably gone (its lock is free), as
        # recovery judges it: no heartbeat timestamp is compared with this host's clock.
        if claims and ownership.holder(spool, worker, "executor") is None:
            for task_id in claims:
                violations.append(
                    Violation(
                        "dead_worker_claim",
                        task_id,
                        f"claimed in {processing} but the executor of worker {worker} is gone (its lock is free)",
                    )
                )
    dead_sources: dict[str, set[tuple[str, str]]] = defaultdict(set)  # task id -> {(source, dead_at)}
    for name in scan.names(spool.dead_letter_dir):
        if not is_task_name(name):
            continue
        path = spool.dead_letter_dir / name
        try:
            record = read_record(path, dead_letter_record)
        except FileNotFoundError:  # retried or purged while we looked
            continue
        except OSError as exc:
            violations.append(Violation("dead_letter_without_reason", None, f"{path}: unreadable ({exc})"))
            continue
        except BadRecord as exc:  # no reason (or no record) to give up on the task for
            violations.append(Violation("dead_letter_without_reason", exc.task_id, f"{path.parent}/{exc}"))
            continue
        dead_id = record.get("task_id") or None
        # A refused copy of a task that has a result is no second place of that task.
        if dead_id is not None and record.get("reason") != DUPLICATE:
            if "dead" not in more.get(dead_id, (place.get(dead_id),)):  # several dead letters of one id are one place
                seen(dead_id, "dead")
            source = record.get("source")
            if source is not None:
                dead_sources[dead_id].add((source, str(record.get("dead_at"))))
    for task_id, places in sorted(more.items()):
        if not _allowed(spool, task_id, places, dead_sources.get(task_id, set())):
            violations.append(Violation("duplicate", task_id, f"in {len(places)} places: {', '.join(sorted(places))}"))
    for folder in folders:
        for name in scan.names(folder):
            if not name.startswith(TEMP_PREFIX):
                continue
            temp = os.path.join(folder, name)
            with contextlib.suppress(OSError):
                age = now - os.lstat(temp).st_mtime
                if age > temp_age:
                    violations.append(Violation("stale_temp", None, f"{temp} is {age:.0f}s old"))
    return violations


def _allowed(spool: Spool, task_id: str, where: list[str], dead_sources: set[tuple[str, str]]) -> bool:
    """Two places that a crash between two steps leaves, and that the next step settles by itself.

    - a result plus the claim of the same worker: recovery drops the claim;
    - a dead letter plus the very file it was made from: the record is written before the file
      is moved, and handling the file again reuses the record. A task that ``dlq retry`` put
      back at that path (its last history entry is this death) is not that: nothing but
      another retry removes the record, so it stays a violation.
    """
    if len(where) != 2:
        return False
    first, second = sorted(where)
    if first.startswith("done@") and second == "processing@" + first.removeprefix("done@"):
        return True
    if "dead" in where:
        path = _place_path(spool, task_id, first if second == "dead" else second)
        deaths = {dead_at for source, dead_at in dead_sources if source == path}
        return path is not None and bool(deaths) and _retried_from(Path(path)) not in deaths
    return False


def _place_path(spool: Spool, task_id: str, where: str) -> str | None:
    """The file of ``task_id`` at a place ``<state>@<worker>``; None for "dead"."""
    state, _, worker = where.partition("@")
    folder = {"pending": spool.inbox, "processing": spool.processing, "done": spool.results}.get(state)
    return None if folder is None else os.path.join(folder(worker), f"{task_id}{TASK_SUFFIX}")


def _retried_from(path: Path) -> str | None:
    """The ``dead_at`` of the death a task file was retried from, if it was."""
    last = last_history(path)
    return None if last is None or "dead_at" not in last else str(last["dead_at"])
