"""Cancelling a pending task: it becomes a ``cancelled`` result and never runs.

The cancel claims the task exactly as the executor would (a rename out of the inbox), so of a
cancel and an executor racing for it exactly one wins; then it writes the result, which drops the
claim. A crash in between leaves a claim that recovery requeues: the task may then run, but it
is never lost. Cancelling a *running* task needs the executor (it owns the agent's tree).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

from activation.clock import iso_now
from activation.errors import ActivationError
from activation.spool.atomic import read_json
from activation.spool.layout import Spool


class CannotCancel(ActivationError):
    """The task is not pending (running, finished, dead) or does not exist."""

    def __init__(self, message: str, state: str | None) -> None:
        super().__init__(message)
        self.state = state


@dataclass(frozen=True)
class Cancelled:
    task_id: str
    worker: str
    path: str

    def as_dict(self) -> dict[str, str]:
        return {"task_id": self.task_id, "worker": self.worker, "status": "cancelled", "path": self.path}


def cancel_pending(spool: Spool, task_id: str, *, by: str = "cli") -> Cancelled:
    """Cancel ``task_id`` if it is pending; raises CannotCancel saying where it is otherwise."""
    found = spool.locate(task_id)
    if found is None:
        raise CannotCancel(f"no task {task_id!r} in {spool.root}", None)
    if found.state != "pending" or found.worker is None:
        why = {
            "processing": "it is running; cancelling a running task needs the executor, which does not do it yet",
            "done": "it has already finished",
            "dead": "it is in the dead letter (`activation dlq purge` deletes it)",
        }.get(found.state, found.state)
        raise CannotCancel(f"cannot cancel {task_id}: {why}", found.state)
    worker = found.worker
    claim = spool.claim(worker, task_id)
    if claim is None:  # the executor took it first
        raise CannotCancel(f"cannot cancel {task_id}: it has just started running", "processing")
    task: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        loaded = read_json(claim)
        task = loaded if isinstance(loaded, dict) else {}
    now = iso_now()
    result = {
        "task_id": task_id,
        "worker": worker,
        "status": "cancelled",
        "exit_code": None,
        "attempts": int(task.get("attempts") or 0) if isinstance(task.get("attempts"), int) else 0,
        "description": task.get("description"),
        "created_at": task.get("created_at"),
        "started_at": None,
        "finished_at": now,
        "duration_s": 0.0,
        "stdout": "",
        "stderr": "",
        "truncated": False,
        "cancelled": {"at": now, "by": by, "while": "pending"},
        "metadata": task.get("metadata") if isinstance(task.get("metadata"), dict) else {},
    }
    path = spool.write_result(worker, result)
    return Cancelled(task_id, worker, str(path))
