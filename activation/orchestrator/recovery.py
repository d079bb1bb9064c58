"""Recovery: orphaned tasks, claims of a gone executor, and the dead letter's retry and purge.

Functions on a `Spool`, shared by the orchestrator (at start and every
ACTIVATION_RECOVERY_INTERVAL) and the CLI (``activation recover``, ``activation dlq ...``).
Nothing here touches a live or restarting worker, and no decision compares two hosts' clocks:
- a pending task is an orphan only when its worker has shown no sign of life for the orphan age
  (longer, ACTIVATION_STOPPED_GRACE, after a clean stop), as the `LivenessWatch` saw it on the
  orchestrator's own clock, and the task has waited that long in the watch's sight;
- a claim is settled only when its executor is provably gone: its lock is free (ownership.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activation.clock import iso_now, parse_iso
from activation.config import WORKER_NAME_PATTERN
from activation.errors import ActivationError, BadTask, NotReady
from activation.orchestrator.liveness import STOPPED, LivenessWatch
from activation.spool import claims, codec
from activation.spool.atomic import atomic_write_json
from activation.spool.claims import DROPPED, GAVE_UP, PUT_BACK, REQUEUED, UNREADABLE, Action
from activation.spool.layout import RAW_SUFFIX, Spool
from activation.spool.ownership import executor_gone
from activation.spool.readers import BadRecord, dead_letter_record, last_history, read_record
from activation.spool.records import DeadLetterRecord
from activation.spool.task import ORPHANED, is_valid_task_id, read_task_bytes, task_id_of

log = logging.getLogger("activation.orchestrator")

ORPHAN_DEAD = "orphaned"  # pending too long for a worker that shows no sign of life: dead letter
__all__ = ["DROPPED", "GAVE_UP", "ORPHAN_DEAD", "PUT_BACK", "REQUEUED", "UNREADABLE", "Action", "recover"]


class DeadLetterError(ActivationError):
    """A dead letter cannot be shown, retried or purged as asked."""


class UnknownDeadLetter(DeadLetterError):
    """No dead letter has that id."""


class NotRetryable(DeadLetterError):
    """The dead letter exists but cannot go back to an inbox."""


def recover(
    spool: Spool,
    *,
    orphan_age: float,
    stopped_grace: float,
    max_attempts: int,
    watch: LivenessWatch | None = None,
    dry_run: bool = False,
) -> list[Action]:
    """One full pass over every worker: orphans first, then claims of gone executors.

    Orphans go first so that a claim requeued by this pass waits at least one orphan age in the
    inbox before it can count as one. ``watch`` carries what earlier passes saw; a fresh one (the
    CLI's) has seen nobody fall silent yet, so it orphans nothing and only settles claims.
    """
    watch = watch if watch is not None else LivenessWatch(spool)
    actions: list[Action] = []
    for worker in spool.workers():
        watch.observe(worker)
        actions += recover_orphans(
            spool, worker, orphan_age=orphan_age, stopped_grace=stopped_grace, watch=watch, dry_run=dry_run
        )
        actions += recover_claims(spool, worker, max_attempts=max_attempts, dry_run=dry_run)
        if not dry_run and actions:
            watch.rebaseline(worker)  # our own renames are no sign of the worker's life
    return actions


def orphan_threshold(state: str | None, *, orphan_age: float, stopped_grace: float) -> float:
    """How long a worker must be silent before its pending tasks are orphans.

    A worker whose heartbeat said ``stopped`` (its tree stopped cleanly) is stopped, not dead, for
    ACTIVATION_STOPPED_GRACE: a restart or a deploy must not cost it its backlog.
    """
    return max(orphan_age, stopped_grace) if state == STOPPED else orphan_age


def recover_orphans(
    spool: Spool,
    worker: str,
    *,
    orphan_age: float,
    stopped_grace: float,
    watch: LivenessWatch,
    dry_run: bool = False,
) -> list[Action]:
    """Dead-letter (reason ``orphaned``) the tasks of a silent worker that waited the orphan age.

    The task is first claimed by rename, the same exclusive step an executor takes, so if the
    worker comes back at that moment exactly one of the two gets it.
    """
    seen = watch.observe(worker)
    if seen.running:
        return []
    names = spool.inbox_names(worker)
    ages = watch.pending_ages(worker, names)
    silent = watch.silent_for(worker)
    threshold = orphan_threshold(seen.state, orphan_age=orphan_age, stopped_grace=stopped_grace)
    if silent < threshold:
        return []
    actions: list[Action] = []
    for name in names:
        age = ages[name]
        if age < orphan_age:
            continue
        task_id = task_id_of(name)
        detail = (
            f"{worker} showed no sign of life for {silent:.0f}s (last state {seen.state or 'unknown'}; "
            f"ACTIVATION_ORPHAN_AGE {orphan_age:g}s) and the task waited {age:.0f}s"
        )
        if dry_run:
            actions.append(Action(ORPHAN_DEAD, worker, task_id, detail))
            continue
        before = seen.changed_at
        if watch.observe(worker).changed_at != before:  # it came back while we looked: the rest is its own
            break
        path = spool.inbox(worker) / name
        task = _peek(path)
        spool.processing(worker).mkdir(exist_ok=True)  # an inbox made by hand may lack it
        claim = spool.claim(worker, task_id)
        if claim is None:
            continue
        spool.dead_letter(claim, reason=ORPHANED, detail=detail, worker=worker, task=task)
        actions.append(_logged(Action(ORPHAN_DEAD, worker, task_id, detail)))
        watch.rebaseline(worker)
    return actions


def recover_claims(spool: Spool, worker: str, *, max_attempts: int, dry_run: bool = False) -> list[Action]:
    """Settle the claims of ``worker`` when its executor is provably gone, as its next start would.

    Holding the executor's lock while settling keeps a starting executor from recovering the same
    claims at the same moment. A live (or stopped-by-signal, or wedged) executor holds its lock:
    its claims are never touched, whatever any clock says.
    """
    if not spool.claimed_ids(worker):
        return []
    actions: list[Action] = []
    with executor_gone(spool, worker) as gone:
        if not gone:
            return []
        why = f"{worker}'s executor is gone (its lock is free)"
        for task_id in spool.claimed_ids(worker):
            action = claims.settle_claim(spool, worker, task_id, max_attempts=max_attempts, why=why, dry_run=dry_run)
            if action is not None:
                actions.append(action if dry_run else _logged(action))
    return actions


def _peek(path: Path) -> dict[str, Any] | None:
    """The task at ``path`` as an object, or None when it is not readable JSON (never follows symlinks)."""
    try:
        data = codec.loads(read_task_bytes(path))  # what cannot be carried is the listener's to dead-letter
    except (OSError, ValueError, BadTask, NotReady):
        return None
    return data if isinstance(data, dict) else None


def _logged(action: Action) -> Action:
    log.warning(
        "recovery: %s %s: %s",
        action.action,
        action.task_id,
        action.detail,
        extra={"worker": action.worker, "task_id": action.task_id, "event": action.action},
    )
    return action


# -- the dead letter ----------------------------------------------------------------------------


@dataclass(frozen=True)
class DeadLetter:
    """One record in ``tasks/.dead_letter/``; ``key`` is its file stem (usually the task id)."""

    key: str
    path: Path
    record: DeadLetterRecord

    @property
    def retryable(self) -> bool:
        return "task" in self.record

    @property
    def dead_at(self) -> float | None:
        return parse_iso(self.record.get("dead_at"))

    def summary(self) -> dict[str, Any]:
        return {
            "id": self.key,
            "task_id": self.record.get("task_id"),
            "worker": self.record.get("worker"),
            "reason": self.record.get("reason"),
            "detail": self.record.get("detail"),
            "dead_at": self.record.get("dead_at"),
            "retryable": self.retryable,
        }


def dead_letters(spool: Spool, skipped: list[str] | None = None) -> list[DeadLetter]:
    """Every readable dead-letter record, oldest first; ``skipped`` collects a line for each other one."""
    found = []
    for path in spool.dead_letters():
        try:
            record = read_record(path, dead_letter_record)
        except FileNotFoundError:  # retried or purged while we looked
            continue
        except (OSError, BadRecord) as exc:
            if skipped is not None:
                skipped.append(str(exc) if isinstance(exc, BadRecord) else f"{path.name}: {exc}")
            continue
        found.append(DeadLetter(task_id_of(path.name), path, record))
    return sorted(found, key=lambda d: (d.record.get("dead_at") or "", d.key))


def get_dead_letter(spool: Spool, key: str) -> DeadLetter:
    """The record ``key``; raises UnknownDeadLetter."""
    if not is_valid_task_id(key):  # it becomes a path component
        raise UnknownDeadLetter(f"no dead letter {key[:140]!r}")
    path = spool.dead_letter_path(key)
    try:
        record = read_record(path, dead_letter_record)
    except FileNotFoundError:
        raise UnknownDeadLetter(f"no dead letter {key!r}") from None
    except (OSError, BadRecord) as exc:
        raise DeadLetterError(f"dead letter {key!r} is unreadable: {exc}") from None
    return DeadLetter(key, path, record)


@dataclass(frozen=True)
class Retried:
    key: str
    task_id: str
    worker: str
    path: Path

    def as_dict(self) -> dict[str, str]:
        return {"id": self.key, "task_id": self.task_id, "worker": self.worker, "path": str(self.path)}


def retry_dead_letter(spool: Spool, key: str, *, send: Callable[[str, dict[str, Any]], None] | None = None) -> Retried:
    """Put a dead letter's task back in its worker's inbox, keeping its history.

    ``send(worker, task)``, in streams mode, adds the revived task's entry (its dead id allowed)
    before anything is written: if Redis refuses, the dead letter stays as it was; a crash after
    it leaves the record, and retrying again finds the entry already there.

    The task gains a ``history`` entry {reason, detail, dead_at, attempts, retried_at} and
    starts again at ``attempts`` 0. It is written atomically into the inbox first and the record
    removed after: a crash in between leaves both, and running the retry again only removes the
    record.
    """
    letter = get_dead_letter(spool, key)
    record = letter.record
    task = record.get("task")
    if task is None:
        raw = record.get("raw") or spool.dead_letter_dir / f"{key}{RAW_SUFFIX}"
        raise NotRetryable(f"dead letter {key!r} cannot be retried: its original did not parse (kept at {raw})")
    worker = record.get("worker")
    if not isinstance(worker, str) or not WORKER_NAME_PATTERN.match(worker):
        raise NotRetryable(f"dead letter {key!r} cannot be retried: it names no worker")
    task_id = task.get("task_id")
    if not isinstance(task_id, str) or not is_valid_task_id(task_id):
        raise NotRetryable(f"dead letter {key!r} cannot be retried: its task_id is not valid")
    if not spool.inbox(worker).is_dir():
        raise NotRetryable(f"dead letter {key!r} cannot be retried: worker {worker!r} has no inbox")
    entry = {
        "reason": record.get("reason"),
        "detail": record.get("detail"),
        "dead_at": record.get("dead_at"),
        "attempts": task.get("attempts", 0),
        "retried_at": iso_now(),
    }
    found = spool.locate(task_id)
    if found is not None and found.state != "dead":
        if found.state in ("pending", "processing") and _same_death(last_history(found.path), entry):
            _remove(letter.path)  # an earlier retry wrote the task, then stopped before this
            return Retried(key, task_id, worker, found.path)
        raise NotRetryable(f"dead letter {key!r} cannot be retried: task {task_id} is already {found.state}")
    history = task.get("history")
    revived = {**task, "attempts": 0, "history": [*(history if isinstance(history, list) else []), entry]}
    if send is not None:
        send(worker, revived)
    path = spool.task_path(worker, task_id)
    atomic_write_json(path, revived)
    _remove(letter.path)
    log.info(
        "dead letter %s back in %s's inbox",
        key,
        worker,
        extra={"worker": worker, "task_id": task_id, "event": "dlq_retried"},
    )
    return Retried(key, task_id, worker, path)


def _same_death(earlier: Any, entry: dict[str, Any]) -> bool:
    return isinstance(earlier, dict) and all(earlier.get(k) == entry[k] for k in ("reason", "dead_at"))


def purge_dead_letters(
    spool: Spool, older_than: float, *, now: float | None = None, dry_run: bool = False
) -> list[DeadLetter]:
    """Delete dead letters (and their ``.raw`` originals) that died more than ``older_than`` seconds ago."""
    now = time.time() if now is None else now
    purged = []
    for letter in dead_letters(spool):
        died = letter.dead_at
        if died is None:
            with contextlib.suppress(OSError):
                died = letter.path.stat().st_mtime
        if died is None or now - died <= older_than:
            continue
        if not dry_run:
            # The raw original goes first: a crash in between leaves a record to purge next time,
            # never a raw file that no record points at. Its path is derived from the key, not
            # taken from the record, so a doctored record cannot aim the delete elsewhere.
            _remove(spool.dead_letter_dir / f"{letter.key}{RAW_SUFFIX}")
            _remove(letter.path)
        purged.append(letter)
    return purged


def _remove(path: Path) -> None:
    """Remove a file, a symlink (never its target) or a folder; absent is fine."""
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``7d``, ``12h``, ``30m``, ``90s``, ``1h30m`` or a bare number; raises ValueError."""
    value = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    parts = _DURATION_PART.findall(value)
    if not value or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"expected a duration such as 7d, 12h, 30m or 90s, got {text!r}")
    return sum(float(number) * _UNITS[unit] for number, unit in parts)
