"""Fixing a dead letter's task before it is retried (``dlq retry ID --description/--timeout/--meta``).

The fix rewrites the record's task atomically in place, validated against the task contract, and
notes what it changed in the task's ``history``; recovery.retry_dead_letter then moves it back
to the inbox under the same id, so ``show ID`` follows it from the dead letter to its result.
"""

from __future__ import annotations

from typing import Any

from activation.clock import iso_now
from activation.errors import BadTask
from activation.orchestrator.recovery import DeadLetterError, NotRetryable, get_dead_letter
from activation.spool.atomic import atomic_write_json
from activation.spool.layout import Spool
from activation.spool.task import validate_task


def fix_dead_letter(
    spool: Spool,
    key: str,
    *,
    description: str | None = None,
    timeout: float | None = None,
    metadata: dict[str, str] | None = None,
    max_timeout: float | None = None,
) -> dict[str, Any]:
    """Apply the fixes to dead letter ``key``'s task and return the fixed task; raises
    DeadLetterError when the letter cannot be retried or the fixed task breaks the contract."""
    letter = get_dead_letter(spool, key)
    task = letter.record.get("task")
    if not isinstance(task, dict):
        raise NotRetryable(f"dead letter {key!r} cannot be fixed: its original did not parse")
    fixed = dict(task)
    changed: dict[str, Any] = {}
    if description is not None:
        changed["description"] = task.get("description")
        fixed["description"] = description
    if timeout is not None:
        changed["timeout"] = task.get("timeout")
        fixed["timeout"] = timeout
    if metadata:
        old = task.get("metadata")
        changed["metadata"] = old
        fixed["metadata"] = {**(old if isinstance(old, dict) else {}), **metadata}
    if not changed:
        return task
    try:
        task_id = task.get("task_id")
        validate_task(fixed, task_id if isinstance(task_id, str) else None, max_timeout=max_timeout)
    except BadTask as exc:
        raise DeadLetterError(f"dead letter {key!r}: the fixed task is still invalid: {exc.detail}") from None
    history = fixed.get("history")
    fixed["history"] = [*(history if isinstance(history, list) else []), {"fixed_at": iso_now(), "was": changed}]
    atomic_write_json(letter.path, {**letter.record, "task": fixed})
    return fixed
