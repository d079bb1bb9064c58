"""Recovery: orphaned tasks, stale claims, and the dead letter's retry and purge.

Functions on a `Spool`, shared by the orchestrator (at start and every
ACTIVATION_RECOVERY_INTERVAL) and the CLI (``activation recover``, ``activation dlq ...``).
They only touch the tasks of a worker whose heartbeat is not live, and they look again right
before every move, so a task that a live worker is running is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activation.clock import iso_now, parse_iso
from activation.config import WORKER_NAME_PATTERN
from activation.errors import ActivationError, BadTask, NotReady
from activation.spool import codec
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.health import worker_health
from activation.spool.layout import RAW_SUFFIX, Spool
from activation.spool.task import MAX_ATTEMPTS, ORPHANED, is_valid_task_id, read_task_bytes, task_id_of

log = logging.getLogger("activation.orchestrator")

# Action names, as logged and as printed by `activation recover`.
ORPHAN_DEAD = "orphaned"  # pending too long for a worker without a live heartbeat: dead letter
REQUEUED = "requeued"  # a stale claim back in the inbox with attempts + 1
GAVE_UP = "max_attempts"  # a stale claim whose attempts reached ACTIVATION_MAX_ATTEMPTS: dead letter
DROPPED = "dropped_claim"  # a stale claim whose result exists: the result wins
PUT_BACK = "put_back"  # a stale claim that does not parse: back unchanged, for the listener to judge

Liveness = Callable[[str], bool]


class DeadLetterError(ActivationError):
    """A dead letter cannot be shown, retried or purged as asked."""


class UnknownDeadLetter(DeadLetterError):
    """No dead letter has that id."""


class NotRetryable(DeadLetterError):
    """The dead letter exists but cannot go back to an inbox."""


@dataclass(frozen=True)
class Action:
    """One thing recovery did (or, in a dry run, would do)."""

    action: str
    worker: str
    task_id: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"action": self.action, "worker": self.worker, "task_id": self.task_id, "detail": self.detail}


def heartbeat_liveness(spool: Spool, heartbeat_timeout: float) -> Liveness:
    """Whether a worker's heartbeat is live right now; reads the heartbeat file on every call."""

    def alive(worker: str) -> bool:
        return worker_health(spool, worker, timeout=heartbeat_timeout).alive

    return alive


def recover(
    spool: Spool,
    *,
    orphan_age: float,
    heartbeat_timeout: float,
    max_attempts: int,
    dry_run: bool = False,
    now: float | None = None,
) -> list[Action]:
    """One full pass: orphans first, then stale claims.

    Orphans go first so that a claim requeued by this pass waits one recovery interval in the
    inbox, giving its worker that long to come back, before it can count as an orphan.
    """
    alive = heartbeat_liveness(spool, heartbeat_timeout)
    actions = recover_orphans(spool, orphan_age=orphan_age, alive=alive, dry_run=dry_run, now=now)
    actions += recover_claims(spool, max_attempts=max_attempts, alive=alive, dry_run=dry_run)
    return actions


def recover_orphans(
    spool: Spool,
    *,
    orphan_age: float,
    alive: Liveness,
    dry_run: bool = False,
    now: float | None = None,
    workers: Iterable[str] | None = None,
) -> list[Action]:
    """Dead-letter (reason ``orphaned``) tasks pending longer than ``orphan_age`` for a dead worker.

    The age runs from the task's ``created_at`` (or its last retry from the dead letter), else
    from the file's mtime. The task is first
    claimed by rename, the same exclusive step an executor takes, so if the worker comes back
    at that moment exactly one of the two gets it.
    """
    now = time.time() if now is None else now
    actions: list[Action] = []
    for worker in spool.workers() if workers is None else workers:
        if alive(worker):
            continue
        for name in spool.inbox_names(worker):
            path = spool.inbox(worker) / name
            task = _peek(path)
            born = _pending_since(task)
            if born is None:
                try:
                    born = os.lstat(path).st_mtime
                except FileNotFoundError:
                    continue
            age = now - born
            if age <= orphan_age:
                continue
            task_id = task_id_of(name)
            detail = (
                f"pending {age:.0f}s in {worker}'s inbox (ACTIVATION_ORPHAN_AGE {orphan_age:g}s) "
                f"and {worker} has no live heartbeat"
            )
            if dry_run:
                actions.append(Action(ORPHAN_DEAD, worker, task_id, detail))
                continue
            if alive(worker):  # it came back while we looked: the rest is its own
                break
            spool.processing(worker).mkdir(exist_ok=True)  # an inbox made by hand may lack it
            claim = spool.claim(worker, task_id)
            if claim is None:
                continue
            spool.dead_letter(claim, reason=ORPHANED, detail=detail, worker=worker, task=task)
            actions.append(_logged(Action(ORPHAN_DEAD, worker, task_id, detail)))
    return actions


def recover_claims(
    spool: Spool,
    *,
    max_attempts: int,
    alive: Liveness,
    dry_run: bool = False,
    workers: Iterable[str] | None = None,
) -> list[Action]:
    """Settle the claims of workers whose heartbeat is stale, as their executor would at start.

    A claim with a result is dropped (the result wins). The others go back to the inbox with
    ``attempts + 1``, or to the dead letter (reason ``max_attempts``) once that reaches
    ACTIVATION_MAX_ATTEMPTS: the same count the executor's own recovery keeps. If the worker's
    executor recovers the same claim at the same moment, the task may run twice but still gets
    exactly one result, because an executor drops any copy whose result already exists.
    """
    actions: list[Action] = []
    for worker in spool.workers() if workers is None else workers:
        if alive(worker):
            continue
        for task_id in spool.claimed_ids(worker):
            if not dry_run and alive(worker):
                break
            action = _settle_claim(spool, worker, task_id, max_attempts, dry_run)
            if action is not None:
                actions.append(action if dry_run else _logged(action))
    return actions


def _settle_claim(spool: Spool, worker: str, task_id: str, max_attempts: int, dry_run: bool) -> Action | None:
    claim = spool.claim_path(worker, task_id)
    if spool.has_result(worker, task_id):
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claim)
        return Action(DROPPED, worker, task_id, "its result already exists; the claim was a leftover")
    task = _peek(claim)
    if task is None:
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                spool.requeue(worker, task_id)
        return Action(PUT_BACK, worker, task_id, "the claim does not parse; back in the inbox for the listener")
    previous = task.get("attempts")
    started = (previous if isinstance(previous, int) and not isinstance(previous, bool) and previous >= 0 else 0) + 1
    task["attempts"] = started
    stale = f"{worker} has no live heartbeat"
    if started >= max_attempts:
        detail = f"{stale}; {started} runs interrupted (ACTIVATION_MAX_ATTEMPTS {max_attempts})"
        if not dry_run:
            spool.dead_letter(claim, reason=MAX_ATTEMPTS, detail=detail, worker=worker, task=task)
        return Action(GAVE_UP, worker, task_id, detail)
    if not dry_run:
        try:
            spool.requeue(worker, task_id, task)
        except FileNotFoundError:
            return None  # its executor recovered it first
    return Action(REQUEUED, worker, task_id, f"{stale}; back in the inbox with attempts {started}")


def _pending_since(task: dict[str, Any] | None) -> float | None:
    """When a task started waiting: its ``created_at``, or its last retry from the dead letter.

    A retried task has only been pending since the retry; counting from ``created_at`` would
    send it straight back to the dead letter whenever its worker is briefly away.
    """
    if task is None:
        return None
    born = parse_iso(task.get("created_at"))
    history = task.get("history")
    if isinstance(history, list) and history and isinstance(history[-1], dict):
        retried = parse_iso(history[-1].get("retried_at"))
        if retried is not None and (born is None or retried > born):
            born = retried
    return born


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
    record: dict[str, Any]

    @property
    def retryable(self) -> bool:
        return isinstance(self.record.get("task"), dict)

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


def dead_letters(spool: Spool) -> list[DeadLetter]:
    """Every readable dead-letter record, oldest first."""
    found = []
    for path in spool.dead_letters():
        try:
            record = read_json(path)
        except (OSError, ValueError):
            continue
        if isinstance(record, dict):
            found.append(DeadLetter(task_id_of(path.name), path, record))
    return sorted(found, key=lambda d: (d.record.get("dead_at") or "", d.key))


def get_dead_letter(spool: Spool, key: str) -> DeadLetter:
    """The record ``key``; raises UnknownDeadLetter."""
    if not is_valid_task_id(key):  # it becomes a path component
        raise UnknownDeadLetter(f"no dead letter {key[:140]!r}")
    path = spool.dead_letter_path(key)
    try:
        record = read_json(path)
    except FileNotFoundError:
        raise UnknownDeadLetter(f"no dead letter {key!r}") from None
    except (OSError, ValueError) as exc:
        raise DeadLetterError(f"dead letter {key!r} is unreadable: {exc}") from None
    if not isinstance(record, dict):
        raise DeadLetterError(f"dead letter {key!r} is not a JSON object")
    return DeadLetter(key, path, record)


@dataclass(frozen=True)
class Retried:
    key: str
    task_id: str
    worker: str
    path: Path

    def as_dict(self) -> dict[str, str]:
        return {"id": self.key, "task_id": self.task_id, "worker": self.worker, "path": str(self.path)}


def retry_dead_letter(spool: Spool, key: str) -> Retried:
    """Put a dead letter's task back in its worker's inbox, keeping its history.

    The task gains a ``history`` entry {reason, detail, dead_at, attempts, retried_at} and
    starts again at ``attempts`` 0. It is written atomically into the inbox first and the record
    removed after: a crash in between leaves both, and running the retry again only removes the
    record.
    """
    letter = get_dead_letter(spool, key)
    record = letter.record
    task = record.get("task")
    if not isinstance(task, dict):
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
        if found.state in ("pending", "processing") and _same_death(_last_history(found.path), entry):
            _remove(letter.path)  # an earlier retry wrote the task, then stopped before this
            return Retried(key, task_id, worker, found.path)
        raise NotRetryable(f"dead letter {key!r} cannot be retried: task {task_id} is already {found.state}")
    history = task.get("history")
    revived = {**task, "attempts": 0, "history": [*(history if isinstance(history, list) else []), entry]}
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


def _last_history(path: Path) -> Any:
    with contextlib.suppress(OSError, ValueError, AttributeError, IndexError, TypeError):
        return read_json(path).get("history")[-1]
    return None


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
