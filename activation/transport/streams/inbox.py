"""From a stream entry to a task file in the local inbox, and back to the delivery it came from.

The task file is the task as dispatched, validated as any inbox file is, with the delivery's
fencing token in ``metadata.stream``: the listener writes it, the executor reads it back to
renew the lease and complete. ``attempts`` is the deliveries before this one, so the agent's
attempt number is the delivery count.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from activation.errors import BadTask, NotReady, StreamsError
from activation.spool.atomic import atomic_write_json
from activation.spool.layout import Spool
from activation.spool.task import INVALID_FIELD, INVALID_JSON, MAX_TASK_BYTES, TOO_LARGE, parse_task
from activation.transport.streams.client import Delivery, StreamsTransport, Token

log = logging.getLogger("activation.listener")

STREAM_METADATA = "stream"


def delivery_metadata(metadata: Mapping[str, Any] | None, delivery: Delivery) -> dict[str, Any]:
    """A record's ``metadata`` with the delivery's token under ``stream``, which `delivery_of` reads back.

    A task written into the inbox carries it, and so does a result recorded again for a new delivery.
    """
    stamped = dict(metadata or {})
    stamped[STREAM_METADATA] = {
        "entry_id": delivery.entry_id,
        "consumer": delivery.token.consumer,
        "deliveries": delivery.token.deliveries,
    }
    return stamped


def task_of(delivery: Delivery, *, max_timeout: float | None = None) -> dict[str, Any]:
    """The task file's content for ``delivery``; BadTask if the payload is no valid task."""
    size = len(delivery.task.encode("utf-8"))
    if size > MAX_TASK_BYTES:
        raise BadTask(TOO_LARGE, f"{size} bytes, the limit is {MAX_TASK_BYTES}")
    try:
        task = parse_task(delivery.task.encode("utf-8"), delivery.task_id, max_timeout=max_timeout)
    except NotReady as exc:  # a file may be half-written; an entry is whole, so empty is bad input
        raise BadTask(INVALID_JSON, f"the entry's payload is empty ({exc})") from None
    task["metadata"] = delivery_metadata(task.get("metadata"), delivery)
    task["attempts"] = delivery.token.deliveries - 1
    return task


def write_to_inbox(spool: Spool, worker: str, delivery: Delivery, *, max_timeout: float | None = None) -> Path:
    """Write the delivery as ``inbox/<task_id>.json`` (atomically); BadTask if invalid."""
    path = spool.task_path(worker, delivery.task_id)
    # Atomic, not fsynced: until it is completed the entry stays pending on this consumer in
    # Redis (with its AOF), so a file lost with the page cache is a delivery whose lease lapses
    # and is reclaimed, never a lost task. That fsync was a millisecond on every task's way in.
    atomic_write_json(path, task_of(delivery, max_timeout=max_timeout), durable=False)
    return path


def delivery_of(task: dict[str, Any]) -> Delivery:
    """The delivery a task file came from, to renew and complete it; BadTask if it names none."""
    stream: Any = (task.get("metadata") or {}).get(STREAM_METADATA)
    try:
        token = Token(str(stream["consumer"]), int(stream["deliveries"]))
        entry_id = str(stream["entry_id"])
    except (TypeError, KeyError, ValueError):
        raise BadTask(INVALID_FIELD, "metadata.stream must hold entry_id, consumer and deliveries") from None
    return Delivery(entry_id, str(task["task_id"]), json.dumps(task, sort_keys=True), token)


def take_one(
    transport: StreamsTransport, spool: Spool, worker: str, *, block: float = 1.0, max_timeout: float | None = None
) -> Delivery | None:
    """Receive one entry (call only when the executor is free) and write it into the local inbox.

    A payload that is no valid task goes to the stream's dead letter with the BadTask reason,
    and nothing is written: the worker tree never sees it. None when there was nothing to take.
    An OSError (the local spool cannot take the file) hands the entry back first, then raises.
    """
    while True:
        delivery = transport.receive(block)
        if delivery is None:
            return None
        try:
            write_to_inbox(spool, worker, delivery, max_timeout=max_timeout)
        except OSError:
            # The local spool cannot take it (a full disk): give it back at once, uncounted.
            with contextlib.suppress(StreamsError):
                transport.hand_back(delivery)
            raise
        except BadTask as exc:
            transport.dead_letter(delivery, f"{exc.reason}: {exc.detail}")
            log.warning("task %s from the stream is bad input, dead-lettered: %s", delivery.task_id, exc)
            block = 0.0
            continue
        return delivery
