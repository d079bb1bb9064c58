"""The orchestrator's side of the streams transport: its spool as the outbox, results mirrored in.

In streams mode the orchestrator's own spool keeps each dispatched task in ``inbox/<worker>/``
(the outbox) until its result or dead letter comes back; then the record lands where files mode
would put it (``results/<worker>/``, ``dead_letter/``), so `show`, `/tasks/<id>`, `dispatch
--wait`, `dlq` and `audit` read the same spool either way. Every step is safe to repeat: a
crash between mirroring and acknowledging mirrors the same record again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from activation.clock import iso_now
from activation.errors import BadTask, NotReady
from activation.spool import codec
from activation.spool.atomic import atomic_write_bytes, atomic_write_json
from activation.spool.cancel import Cancelled, CannotCancel, cancelled_record, read_task
from activation.spool.layout import Spool
from activation.spool.readers import BadRecord, result_record
from activation.spool.task import TASK_SUFFIX, is_valid_task_id, load_task, task_id_of
from activation.transport.streams.client import (
    CANCELLED,
    DUPLICATE,
    REQUESTED,
    UNKNOWN,
    Dispatched,
    Outcome,
    StreamsTransport,
)

log = logging.getLogger("activation.orchestrator")

MAX_ATTEMPTS_REASON = "max_attempts"  # the spool's dead-letter reason for a task that kept failing
UNREADABLE_RESULT = "unreadable_result"  # the dead-letter reason for a result no reader could take


def send(transport: StreamsTransport, spool: Spool, worker: str, task: dict[str, Any]) -> Dispatched:
    """Keep the task in the outbox first, then add its entry: a crash in between is re-sent.

    An id Redis already knows as done or dead adds nothing, and its outbox file goes again: no
    result would ever come to take it out. The caller has checked the spool had no such id.
    """
    path = spool.task_path(worker, task["task_id"])
    atomic_write_json(path, task)
    sent = transport.dispatch(task["task_id"], task)
    if sent.status == DUPLICATE and sent.state != "queued":
        path.unlink(missing_ok=True)
    return sent


def resend_outbox(transport: StreamsTransport, spool: Spool, worker: str) -> list[str]:
    """Dispatch every outbox task again; idempotent, so only lost ones go. The ids re-queued."""
    requeued = []
    for name in spool.inbox_names(worker):
        try:
            task = load_task(spool.task_path(worker, task_id_of(name)))
        except (BadTask, NotReady, OSError) as exc:  # never the whole step: the others still go
            log.warning("outbox file %s/%s is unreadable, not re-sent: %s", worker, name, exc)
            continue
        if transport.dispatch(task["task_id"], task).status != DUPLICATE:
            requeued.append(task["task_id"])
    if requeued:
        log.warning("re-sent %d outbox task(s) of %s that Redis had lost", len(requeued), worker)
    return requeued


def mirror(transport: StreamsTransport, spool: Spool, worker: str, *, block: float = 0.0) -> int:
    """Bring the role's results and dead letters into the spool, then acknowledge them; how many."""
    results = transport.read_results(block=block)
    for outcome in results:
        _land_result(spool, worker, outcome)
    transport.ack_results([o.stream_id for o in results])
    dead = transport.read_dead_letters()
    for outcome in dead:
        _land_dead_letter(spool, worker, outcome)
    transport.ack_dead_letters([o.stream_id for o in dead])
    return len(results) + len(dead)


def cancel_dispatched(
    transport_for: Callable[[str], StreamsTransport], spool: Spool, task_id: str, *, by: str
) -> Cancelled:
    """Cancel ``task_id`` from the spool that dispatched it (its outbox): the one path of the
    orchestrator's ``POST /tasks/<id>/cancel`` and of the CLI when no orchestrator answers.
    ``transport_for`` gives a worker's transport. CannotCancel: unknown or finished here."""
    found = spool.locate(task_id)
    if found is None or found.worker is None:
        raise CannotCancel(f"no task {task_id!r} in {spool.root}", None)
    if found.state != "pending":
        raise CannotCancel(f"cannot cancel {task_id}: it has already finished ({found.state})", found.state)
    return cancel(transport_for(found.worker), spool, found.worker, task_id, by=by)


def cancel(transport: StreamsTransport, spool: Spool, worker: str, task_id: str, *, by: str) -> Cancelled:
    """Cancel a task dispatched to ``worker`` (its outbox file is here), in streams mode.

    Not received yet: Redis retires its entry and records the ``cancelled`` result, which lands
    here at once (and again, identical, when mirrored). Held by a replica: Redis keeps the
    request, the holder kills the agent and its ``cancelled`` result comes back as any result.
    A task Redis lost (a restart without persistence, not re-sent yet) is cancelled here; the
    cancel is sent once more in case the outbox re-send raced it. StreamsError: unreachable.
    """
    outbox = spool.task_path(worker, task_id)
    record = cancelled_record(task_id, worker, read_task(outbox), by=by, was="pending")
    request = {"by": by, "at": iso_now()}
    verdict = transport.cancel(task_id, record, request)
    if verdict.status == UNKNOWN and outbox.exists():
        path = spool.write_result(worker, record)
        outbox.unlink(missing_ok=True)
        verdict = transport.cancel(task_id, record, request)
        if verdict.status in (UNKNOWN, CANCELLED):
            return Cancelled(task_id, worker, str(path), was="pending")
    if verdict.status == CANCELLED:
        path = spool.write_result(worker, record)
        outbox.unlink(missing_ok=True)
        return Cancelled(task_id, worker, str(path), was="pending")
    if verdict.status == REQUESTED:
        return Cancelled(task_id, worker, str(outbox), status="cancelling", was="running")
    if verdict.status == UNKNOWN:
        raise CannotCancel(f"cannot cancel {task_id}: the stream of {worker} does not know it", None)
    raise CannotCancel(f"cannot cancel {task_id}: it has already finished ({verdict.detail})", "done")


def _parsed(text: str) -> Any:
    """A record a stream entry carries, or None: whatever a writer put there (a raw XADD, a payload
    nested past any limit) is parsed by the spool's codec, which raises nothing but ValueError."""
    try:
        return codec.loads(text)
    except ValueError:
        return None


def _outbox_path(spool: Spool, worker: str, task_id: str) -> Path:
    """Where the outbox keeps ``task_id``: an id that is no task id (a raw XADD) never becomes a
    path, it names a file that cannot exist, and whose name the dead letter refuses as a key."""
    if is_valid_task_id(task_id):
        return spool.task_path(worker, task_id)
    digest = hashlib.sha256(task_id.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return spool.inbox(worker) / f".invalid-id-{digest}{TASK_SUFFIX}"


def _land_result(spool: Spool, worker: str, outcome: Outcome) -> None:
    raw = outcome.fields.get("result", "")
    try:
        result = result_record(_parsed(raw), task_id=outcome.task_id)
    except BadRecord as exc:
        # Written by our own completion script, so this is a bug or tampering. No reader could
        # take it as a result: the task goes to the dead letter, where `dlq` shows it and retries it.
        log.error("result of %s from %s is no result record (%s); dead-lettered", outcome.task_id, worker, exc)
        detail = f"the result the stream returned is no result record: {exc}"
        outbox = read_task(_outbox_path(spool, worker, outcome.task_id))
        task = None if outbox is None else dict(outbox)
        _dead_letter(spool, worker, outcome.task_id, UNREADABLE_RESULT, detail, task, raw)
        return
    spool.write_result(worker, dict(result))
    _outbox_path(spool, worker, outcome.task_id).unlink(missing_ok=True)


def _land_dead_letter(spool: Spool, worker: str, outcome: Outcome) -> None:
    fields = outcome.fields
    task = _parsed(fields.get("task", ""))
    reason_text = fields.get("reason", "")
    reason = MAX_ATTEMPTS_REASON if reason_text.startswith("max_deliveries") else reason_text.split(":", 1)[0]
    detail = f"{reason_text}; deliveries {fields.get('deliveries', '?')}, last owner {fields.get('last_owner', '?')}"
    task = task if isinstance(task, dict) else None
    _dead_letter(spool, worker, outcome.task_id, reason or "dead_letter", detail, task, fields.get("task", ""))


def _dead_letter(
    spool: Spool, worker: str, task_id: str, reason: str, detail: str, task: dict[str, Any] | None, payload: str
) -> None:
    """Dead-letter the outbox copy of ``task_id``; without one (never dispatched here), ``payload``
    as it came stands in for it."""
    if not is_valid_task_id(task_id):
        detail = f"entry for task id {ascii(task_id)[:160]}: {detail}"
    source = _outbox_path(spool, worker, task_id)
    if task is None and not source.exists():
        atomic_write_bytes(source, payload.encode("utf-8", "surrogatepass"), durable=False)
    spool.dead_letter(source, reason=reason, detail=detail, worker=worker, task=task)
