"""Cancelling a task: a pending one becomes a ``cancelled`` result and never runs; a running one
is asked to stop through a request file that its executor acts on.

Pending: the cancel claims the task exactly as the executor would (a rename out of the inbox), so
of a cancel and an executor racing for it exactly one wins; then it writes the result, which drops
the claim. A crash in between leaves a claim that recovery requeues: the task may then run, but it
is never lost.

Running: the executor owns the agent's tree, so the cancel writes a request,
``tasks/<worker>/.processing/<task_id>.cancel``, beside the claim. The executor's supervision loop
looks for it every tick (one stat), kills the tree (SIGINT, the kill grace, SIGKILL) and writes a
``cancelled`` result; then it deletes the request. A request for a task that finished meanwhile
is deleted by whoever sees that first (the canceller just after writing it, or the executor's
start), so it never cancels a later run by surprise. Files mode only: in streams mode the owning
replica is on another host.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activation.clock import iso_now
from activation.errors import ActivationError
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool
from activation.spool.readers import peek_record
from activation.spool.records import ResultRecord, TaskRecord
from activation.spool.task import task_record

CANCEL_SUFFIX = ".cancel"


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
    status: str = "cancelled"  # or "cancelling": a running task, whose executor has been asked
    was: str = "pending"  # what the task was when the cancel came: pending | running

    def as_dict(self) -> dict[str, str]:
        return {
            "task_id": self.task_id,
            "worker": self.worker,
            "status": self.status,
            "while": self.was,
            "path": self.path,
        }


def cancel_task(spool: Spool, task_id: str, *, by: str = "cli") -> Cancelled:
    """Cancel ``task_id``: pending, at once; running, by a request its executor acts on."""
    found = spool.locate(task_id)
    if found is not None and found.state == "processing" and found.worker is not None:
        return request_cancel(spool, found.worker, task_id, by=by)
    try:
        return cancel_pending(spool, task_id, by=by)
    except CannotCancel as exc:
        if exc.state != "processing":
            raise
    # it started running between looking and claiming
    found = spool.locate(task_id)
    if found is None or found.state != "processing" or found.worker is None:
        raise CannotCancel(f"cannot cancel {task_id}: it has just finished", found.state if found else None)
    return request_cancel(spool, found.worker, task_id, by=by)


def request_path(spool: Spool, worker: str, task_id: str) -> Path:
    return spool.processing(worker) / f"{task_id}{CANCEL_SUFFIX}"


def request_cancel(spool: Spool, worker: str, task_id: str, *, by: str = "cli") -> Cancelled:
    """Ask the executor running ``task_id`` to kill its tree; CannotCancel if it finished meanwhile."""
    path = request_path(spool, worker, task_id)
    atomic_write_json(path, {"task_id": task_id, "by": by, "at": iso_now()}, durable=False)
    # The executor writes the result, then deletes any request: a result now means ours came late.
    if spool.has_result(worker, task_id):
        clear_request(spool, worker, task_id)
        raise CannotCancel(f"cannot cancel {task_id}: it has just finished", "done")
    return Cancelled(task_id, worker, str(path), status="cancelling", was="running")


def cancel_requested(spool: Spool, worker: str, task_id: str) -> dict[str, Any] | None:
    """The request to cancel ``task_id``, or None; cheap when there is none (one failed open)."""
    try:
        request = read_json(request_path(spool, worker, task_id))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        request = {}
    return request if isinstance(request, dict) else {}


def clear_request(spool: Spool, worker: str, task_id: str) -> None:
    """Drop the request; one the spool refuses to drop is removed by the executor's next start."""
    with contextlib.suppress(OSError):
        os.unlink(request_path(spool, worker, task_id))


def remove_stale_requests(spool: Spool, worker: str) -> int:
    """At the executor's start: drop requests whose task is no longer claimed (it finished or moved)."""
    return spool.remove_unclaimed(worker, CANCEL_SUFFIX)


def cancel_pending(spool: Spool, task_id: str, *, by: str = "cli") -> Cancelled:
    """Cancel ``task_id`` if it is pending; raises CannotCancel saying where it is otherwise."""
    found = spool.locate(task_id)
    if found is None:
        raise CannotCancel(f"no task {task_id!r} in {spool.root}", None)
    if found.state != "pending" or found.worker is None:
        why = {
            "processing": "it is running (`activation cancel` stops it through its executor)",
            "done": "it has already finished",
            "dead": "it is in the dead letter (`activation dlq purge` deletes it)",
        }.get(found.state, found.state)
        raise CannotCancel(f"cannot cancel {task_id}: {why}", found.state)
    worker = found.worker
    claim = spool.claim(worker, task_id)
    if claim is None:  # the executor took it first
        raise CannotCancel(f"cannot cancel {task_id}: it has just started running", "processing")
    return settle_cancelled_claim(spool, worker, task_id, by=by, was="pending")


def settle_cancelled_claim(
    spool: Spool, worker: str, task_id: str, *, by: str, was: str, at: str | None = None
) -> Cancelled:
    """Give a claim that will not run (again) its ``cancelled`` result, which drops the claim.

    Used for a pending task just claimed by a cancel, and by the executor's recovery for a claim
    whose cancel request came while no executor was there to act on it.
    """
    result = cancelled_record(task_id, worker, read_task(spool.claim_path(worker, task_id)), by=by, was=was, at=at)
    path = spool.write_result(worker, result)
    clear_request(spool, worker, task_id)
    return Cancelled(task_id, worker, str(path), was=was)


def read_task(path: Path) -> TaskRecord | None:
    """The task a claim or an outbox file holds, or None when it holds no valid task."""
    return peek_record(path, task_record)


def cancelled_record(
    task_id: str, worker: str, task: TaskRecord | None, *, by: str, was: str, at: str | None = None
) -> ResultRecord:
    """The ``cancelled`` result of a task that did not run (again): what a cancel records."""
    now = iso_now()
    return {
        "task_id": task_id,
        "worker": worker,
        "status": "cancelled",
        "exit_code": None,
        "attempts": task.get("attempts", 0) if task else 0,
        "description": task["description"] if task else None,
        "created_at": task.get("created_at") if task else None,
        "started_at": None,
        "finished_at": now,
        "duration_s": 0.0,
        "stdout": "",
        "stderr": "",
        "truncated": False,
        "cancelled": {"at": at or now, "by": by, "while": was},
        "metadata": task.get("metadata", {}) if task else {},
    }
