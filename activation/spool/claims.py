"""Claim settlement: what becomes of a claim whose executor is gone. One copy, for every caller.

The executor settles its predecessor's claims at start; the orchestrator (and ``activation
recover``) settle the claims of a worker whose executor is provably gone (see ownership.py). Both
call `settle_claim`, and both must hold the worker's executor lock while they do, so that
nobody else settles the same claim at the same moment.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

from activation.errors import BadTask, NotReady
from activation.spool import codec, outcome
from activation.spool.layout import Spool
from activation.spool.task import MAX_ATTEMPTS, MAX_ATTEMPTS_FIELD, read_task_bytes

# Action names, as logged, counted and printed by `activation recover`.
REQUEUED = "requeued"  # back in the inbox with attempts + 1
GAVE_UP = "max_attempts"  # attempts reached ACTIVATION_MAX_ATTEMPTS: dead letter
DROPPED = "dropped_claim"  # its result exists: the result wins, the claim was a leftover
PUT_BACK = "put_back"  # it does not parse as a task: back unchanged, for the listener to judge
UNREADABLE = "unreadable"  # it cannot be read right now (an I/O error): left where it is
FINISHED = "finished"  # its run's outcome was saved beside it: the result is written, no rerun


@dataclass(frozen=True)
class Action:
    """One thing recovery did (or, in a dry run, would do)."""

    action: str
    worker: str
    task_id: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return {"action": self.action, "worker": self.worker, "task_id": self.task_id, "detail": self.detail}


def attempts_of(task: dict[str, Any]) -> int | None:
    """The runs a task has started, as recorded in it: 0 when absent, None when ill-typed or out of
    the range the listener accepts (a 5,000-digit count is no count, and cannot even be printed)."""
    value = task.get("attempts", 0)
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ATTEMPTS_FIELD:
        return None
    return value


def settle_claim(
    spool: Spool,
    worker: str,
    task_id: str,
    *,
    max_attempts: int,
    why: str,
    dry_run: bool = False,
) -> Action | None:
    """Settle one claim of ``worker`` whose run was interrupted; None when it is already gone.

    | the claim                        | becomes                                                |
    |----------------------------------|--------------------------------------------------------|
    | has a result                     | dropped (`DROPPED`): the result wins                   |
    | has a saved outcome (.outcome)   | its result is written (`FINISHED`): the agent ran once |
    | is not a JSON object, or its     | back in the inbox unchanged (`PUT_BACK`): the listener |
    | attempts are not a count         | validates it and dead-letters it with the reason       |
    | attempts + 1 < max_attempts      | back in the inbox with attempts + 1 (`REQUEUED`)       |
    | attempts + 1 >= max_attempts     | the dead letter, reason ``max_attempts`` (`GAVE_UP`)   |
    | cannot be read (I/O error)       | left in place (`UNREADABLE`), for the next settlement  |

    ``why`` says why the run was interrupted, for the detail. The caller holds the executor lock.
    """
    claim = spool.claim_path(worker, task_id)
    if spool.has_result(worker, task_id):
        if not dry_run:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claim)
        return Action(DROPPED, worker, task_id, "its result already exists; the claim was a leftover")
    if os.path.lexists(outcome.outcome_path(spool, worker, task_id)):
        # The run finished and only its result write failed: write it, never run the agent again.
        if dry_run:
            return Action(FINISHED, worker, task_id, "its run's saved outcome would be written as the result")
        try:
            if outcome.settle_outcome(spool, worker, task_id) is not None:
                return Action(FINISHED, worker, task_id, "its run's saved outcome was written as the result")
        except outcome.UnwrittenOutcome as exc:
            return Action(UNREADABLE, worker, task_id, f"{exc}; its saved outcome stays for the next settlement")
    try:
        task = _parse(read_task_bytes(claim))
    except FileNotFoundError:
        return None
    except (BadTask, NotReady):
        task = None
    except OSError as exc:
        return Action(UNREADABLE, worker, task_id, f"cannot read the claim ({exc.strerror or exc}); left in place")
    previous = None if task is None else attempts_of(task)
    if task is None or previous is None:
        if not dry_run:
            try:
                spool.requeue(worker, task_id)
            except FileNotFoundError:
                return None
        return Action(PUT_BACK, worker, task_id, "the claim is not a valid task; back in the inbox for the listener")
    started = previous + 1
    task["attempts"] = started
    if started >= max_attempts:
        detail = f"{why}; {started} runs interrupted (ACTIVATION_MAX_ATTEMPTS {max_attempts})"
        if not dry_run:
            spool.dead_letter(claim, reason=MAX_ATTEMPTS, detail=detail, worker=worker, task=task)
        return Action(GAVE_UP, worker, task_id, detail)
    if not dry_run:
        try:
            spool.requeue(worker, task_id, task)
        except FileNotFoundError:
            return None
    return Action(REQUEUED, worker, task_id, f"{why}; back in the inbox with attempts {started}")


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        task = codec.loads(data)
    except ValueError:  # not UTF-8, not JSON, or JSON that activation cannot carry (codec.Uncarryable)
        return None
    return task if isinstance(task, dict) else None
