"""The one dispatch path: ``POST /tasks`` and ``activation dispatch`` both end here.

A request (the API's JSON body, or the CLI's arguments as the same body) is validated, the
transport is decided, the task is sent, and the caller's counter moves. Refusals are the domain's
errors (activation.errors: Invalid, NotFound, Conflict, Unavailable); only orchestrator/http maps
them to statuses, and the CLI prints them as they are.

The transport: with ACTIVATION_TRANSPORT=streams every task goes by stream (outbox.send), and the
files/events modes do not apply; otherwise the ``decide`` callable says files or events (the
orchestrator's adaptive decision, or the CLI's fixed choice).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from activation.config import WORKER_NAME_PATTERN, Settings
from activation.errors import Conflict, DispatchError, Invalid, NotFound, Unavailable
from activation.orchestrator.adaptive import Decision
from activation.orchestrator.dispatch import EventPublisher, build_task, dispatch
from activation.spool.layout import Spool

if TYPE_CHECKING:
    from activation.transport.streams.client import StreamsTransport

log = logging.getLogger("activation.orchestrator")

TASK_FIELDS = ("worker", "description", "task_id", "timeout", "metadata")
STREAMS = "streams"
STREAMS_RULE = "ACTIVATION_TRANSPORT=streams"


@dataclass(frozen=True)
class Sent:
    """What a dispatch did: the answer of ``POST /tasks`` and of ``dispatch --json``."""

    task_id: str
    worker: str
    transport: str  # files, events or streams: what actually carried the task
    rule: str
    fallback: str | None = None

    def as_dict(self) -> dict[str, Any]:
        answer: dict[str, Any] = {
            "task_id": self.task_id,
            "worker": self.worker,
            "transport": self.transport,
            "rule": self.rule,
        }
        if self.fallback:
            answer["fallback"] = self.fallback
        return answer


class Dispatcher:
    """Validates, decides, sends and counts. Safe to call from many request threads at once.

    ``decide(worker)`` gives the files/events decision; ``streams(worker)`` the role's streams
    transport (streams mode only); ``counted(worker, transport)`` is called once per task sent.
    """

    def __init__(
        self,
        spool: Spool,
        settings: Settings,
        *,
        decide: Callable[[str], Decision],
        publisher: EventPublisher | None = None,
        streams: Callable[[str], StreamsTransport] | None = None,
        unsent: Callable[[], None] | None = None,
        counted: Callable[[str, str], None] | None = None,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.decide = decide
        self.publisher = publisher
        self.streams = streams
        # Told when a task stayed in the outbox because Redis failed: the relay then re-sends the
        # outbox at its next pass, even when its own passes never saw the outage.
        self.unsent = unsent
        self.counted = counted
        self.publish_lock = threading.Lock()  # one Redis connection, shared by request threads

    def submit(self, body: Mapping[str, Any]) -> Sent:
        worker, task = self.validate(body)
        task_id = task["task_id"]
        found = self.spool.locate(task_id)
        if found is not None:
            raise Conflict(
                f"task id {task_id!r} already exists ({found.state}, worker {found.worker}); nothing was sent again"
            )
        streams = self.settings.transport == STREAMS
        sent = self._by_stream(worker, task) if streams else self._by_file(worker, task)
        if self.counted is not None:
            self.counted(worker, sent.transport)
        log.info(
            "task %s for %s by %s (rule %s)",
            task_id,
            worker,
            sent.transport,
            sent.rule,
            extra={"worker": worker, "task_id": task_id, "event": "dispatched"},
        )
        return sent

    def validate(self, body: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
        """The worker and the task the request asks for, or Invalid / NotFound saying why not."""
        for name in ("worker", "description"):
            if name not in body:
                raise Invalid(f"missing field {name!r}")
        worker, description = body["worker"], body["description"]
        if not isinstance(worker, str) or not WORKER_NAME_PATTERN.match(worker):
            raise Invalid(f"field 'worker' must be a worker name, got {ascii(worker)[:80]}")
        if not isinstance(description, str):
            raise Invalid("field 'description' must be a string")
        if not self.spool.inbox(worker).is_dir():
            raise NotFound(f"unknown worker {worker!r}: it has no inbox (activation init {worker})")
        try:
            task = build_task(
                description,
                task_id=body.get("task_id"),
                timeout=body.get("timeout"),
                metadata=body.get("metadata"),
                max_timeout=self.settings.max_task_timeout,
                extra={k: v for k, v in body.items() if k not in TASK_FIELDS},
            )
        except DispatchError as exc:
            raise Invalid(str(exc)) from None
        return worker, task

    def _by_file(self, worker: str, task: dict[str, Any]) -> Sent:
        chosen = self.decide(worker)
        try:
            with self.publish_lock if chosen.transport == "events" else contextlib.nullcontext():
                written = dispatch(
                    self.spool,
                    worker,
                    task,
                    transport=chosen.transport,
                    publisher=self.publisher,
                    fallback_to_files=self.settings.fallback_to_files,
                    check_unique=False,
                )
        except DispatchError as exc:
            raise Unavailable(str(exc)) from None
        return Sent(task["task_id"], worker, written.transport, chosen.rule, written.fallback)

    def _by_stream(self, worker: str, task: dict[str, Any]) -> Sent:
        from activation.errors import StreamsError
        from activation.transport.streams import outbox
        from activation.transport.streams.client import DUPLICATE

        assert self.streams is not None, "streams mode needs a streams transport"
        try:
            dispatched = outbox.send(self.streams(worker), self.spool, worker, task)
        except StreamsError as exc:
            if self.unsent is not None:
                self.unsent()
            raise Unavailable(f"{exc}; the task waits in the outbox and is sent when Redis answers") from None
        except DispatchError as exc:
            raise Invalid(str(exc)) from None
        except OSError as exc:
            raise Unavailable(f"cannot keep task {task['task_id']} in the outbox: {exc.strerror or exc}") from None
        if dispatched.status == DUPLICATE:
            raise Conflict(
                f"task id {task['task_id']!r} was already dispatched to {worker} ({dispatched.state}); "
                "nothing was sent again"
            )
        return Sent(task["task_id"], worker, STREAMS, STREAMS_RULE)
