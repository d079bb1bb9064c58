"""Dispatch: turn a description into a task file in a worker's inbox, and wait for its result.

This is the library function behind ``activation dispatch`` (and, later, the orchestrator).
The file is always written first, atomically; it is the only thing that delivers a task.
"""

from __future__ import annotations

import errno
import logging
import secrets
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from activation.clock import iso_now
from activation.errors import BadTask, DispatchError
from activation.spool import codec
from activation.spool.atomic import atomic_write_json, json_bytes
from activation.spool.layout import Location, Spool
from activation.spool.readers import BadRecord, dead_letter_record, read_record, result_record
from activation.spool.records import DeadLetterRecord, ResultRecord, TaskRecord
from activation.spool.task import is_valid_task_id, task_record, validate_task
from activation.transport import pubsub as events

log = logging.getLogger("activation.dispatch")


def new_task_id() -> str:
    """A unique id that also sorts by creation time."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(5)


TRANSPORTS = ("files", "events")


@dataclass(frozen=True)
class Dispatched:
    task_id: str
    worker: str
    path: Path
    transport: str = "files"  # what actually carried the wake-up
    receivers: int | None = None  # subscribers that got the event, when one was published
    fallback: str | None = None  # why events fell back to files


class EventPublisher:
    """Publishes wake-ups on ``activate:<worker>`` through one RedisLink: fail fast, and during an
    outage leave Redis alone (the files deliver meanwhile) instead of paying a connect per task."""

    def __init__(self, redis_url: str) -> None:
        from activation.transport.redis_link import RedisLink

        self.redis_url = redis_url
        self._link = RedisLink(redis_url, log=log, what="PUBLISH activate:*", consequence="tasks go as files alone")

    def check(self) -> None:
        """Raise EventsError unless Redis answers."""
        self._link.call(lambda client: client.ping())

    def activate(self, worker: str, task_id: str) -> int:
        return self._link.call(lambda client: events.publish(client, events.activate_channel(worker), task_id))

    def close(self) -> None:
        self._link.close()


def build_task(
    description: str,
    *,
    task_id: str | None = None,
    timeout: float | None = None,
    metadata: dict[str, Any] | None = None,
    max_timeout: float | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A validated task object; raises DispatchError naming what is wrong."""
    task: dict[str, Any] = dict(extra or {})
    task.update(task_id=task_id or new_task_id(), description=description, created_at=iso_now())
    if timeout is not None:
        task["timeout"] = timeout
    if metadata:
        task["metadata"] = metadata
    try:
        validate_task(task, None, max_timeout=max_timeout)
        codec.loads(json_bytes(task))  # what the listener would refuse as unencodable, refused here
    except BadTask as exc:
        raise DispatchError(f"invalid task: {exc.detail}") from None
    except ValueError as exc:
        raise DispatchError(f"invalid task: {exc}") from None
    return task


def dispatch(
    spool: Spool,
    worker: str,
    task: dict[str, Any],
    *,
    transport: str = "files",
    publisher: EventPublisher | None = None,
    fallback_to_files: bool = True,
    check_unique: bool = True,
) -> Dispatched:
    """Write ``task`` atomically into ``worker``'s inbox; with ``events``, then PUBLISH a wake-up.

    The file always goes first and always delivers. A Redis failure falls back to files with a
    warning; only with ``fallback_to_files=False`` is it an error, checked before any write.
    """
    if transport not in TRANSPORTS:
        raise DispatchError(f"unknown transport {transport!r} (expected files or events)")
    if transport == "events" and not fallback_to_files:
        if publisher is None:
            raise DispatchError("transport events needs REDIS_URL (and FALLBACK_TO_FILES=false forbids files)")
        try:
            publisher.check()
        except events.EventsError as exc:
            raise DispatchError(f"{exc} (FALLBACK_TO_FILES=false)") from None
    written = _write(spool, worker, task, check_unique)
    if transport == "files":
        return written
    return _publish(written, publisher, fallback_to_files)


def _publish(written: Dispatched, publisher: EventPublisher | None, fallback_to_files: bool) -> Dispatched:
    extra = {"worker": written.worker, "task_id": written.task_id}
    if publisher is None:
        log.warning("transport events without REDIS_URL: the file alone delivers %s", written.task_id, extra=extra)
        return replace(written, fallback="REDIS_URL not set")
    try:
        receivers = publisher.activate(written.worker, written.task_id)
    except events.EventsError as exc:
        if not fallback_to_files:
            raise DispatchError(f"{exc}; the task file was written and will still be picked up") from None
        log.warning("falling back to files for %s: %s", written.task_id, exc, extra={**extra, "event": "fallback"})
        return replace(written, fallback=str(exc))
    if receivers == 0:
        log.warning(
            "no worker subscribes to %s; the file still delivers %s",
            events.activate_channel(written.worker),
            written.task_id,
            extra={**extra, "event": "no_subscriber"},
        )
    return replace(written, transport="events", receivers=receivers)


def _write(spool: Spool, worker: str, task: dict[str, Any], check_unique: bool) -> Dispatched:
    task_id = task["task_id"]
    if not is_valid_task_id(task_id):
        raise DispatchError(f"invalid task id {task_id!r}")
    inbox = spool.inbox(worker)
    if not inbox.is_dir():
        raise DispatchError(f"worker {worker!r} has no inbox at {inbox} (run: activation init {worker})")
    if check_unique:
        found = spool.locate(task_id)
        if found is not None:
            raise DispatchError(f"task id {task_id!r} already exists ({found.state}, worker {found.worker})")
    path = spool.task_path(worker, task_id)
    try:
        atomic_write_json(path, task)
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise DispatchError(f"cannot write task {task_id}: no space left on {spool.root}") from None
        raise DispatchError(f"cannot write task {task_id} to {inbox}: {exc.strerror}") from None
    return Dispatched(task_id=task_id, worker=worker, path=path)


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()


def wait_for_outcome(
    spool: Spool, worker: str, task_id: str, timeout: float | None, *, redis_url: str | None = None
) -> Location:
    """Block until the task has a result or is in the dead letter; raise DispatchError on timeout.

    Three things wake it: the executor's ``done:<worker>`` event when Redis is configured,
    inotify on the results folder, and a re-check every half second (filesystems without
    inotify, and the dead letter).
    """
    from activation.observability.logs import quiet_watchdog_shutdown

    quiet_watchdog_shutdown()  # its stop below may race its thread's last read (logs.py says why)
    woken = threading.Event()
    stop = threading.Event()
    observer: Any = Observer()
    try:
        observer.schedule(_Wake(woken), str(spool.results(worker)), recursive=False)
        observer.start()
    except OSError:
        observer = None
    listener = None
    if redis_url:
        listener = threading.Thread(
            target=_listen_done, args=(redis_url, worker, task_id, woken, stop), name="done-listener", daemon=True
        )
        listener.start()
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            found = spool.locate(task_id, [worker])
            if found is not None and found.state in ("done", "dead"):
                return found
            if deadline is not None and time.monotonic() >= deadline:
                state = found.state if found else "missing"
                raise DispatchError(f"timed out after {timeout:g}s waiting for {task_id} (still {state})")
            wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
            woken.wait(wait)
            woken.clear()
    finally:
        stop.set()
        if observer is not None:
            observer.stop()
            observer.join(timeout=2)
        if listener is not None:
            listener.join(timeout=2)


def _listen_done(redis_url: str, worker: str, task_id: str, woken: threading.Event, stop: threading.Event) -> None:
    """Set ``woken`` when the executor announces ``task_id`` on ``done:<worker>``; best effort."""
    try:
        client = events.connect(redis_url, for_pubsub=True)
        pubsub = client.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call]
        pubsub.subscribe(events.done_channel(worker))
        woken.set()  # subscribed: look at the spool once more, the result may already be there
        while not stop.is_set():
            message = pubsub.get_message(timeout=0.25)
            if message and message.get("data") in (task_id, task_id.encode()):
                woken.set()
        pubsub.close()
        client.close()
    except Exception as exc:  # the results folder still wakes the waiter
        log.debug("done events unavailable: %s", events.describe(exc))


def read_outcome(location: Location) -> ResultRecord | DeadLetterRecord:
    """The result (state ``done``) or dead-letter record (``dead``) at ``location``.

    Raises DispatchError, one line naming the file, when it is no such record; OSError when it
    cannot be read (FileNotFoundError: it moved on).
    """
    try:
        if location.state == "dead":
            return read_record(location.path, dead_letter_record)
        return read_record(location.path, result_record)
    except BadRecord as exc:
        raise DispatchError(f"{location.path.parent}/{exc}") from None


def read_pending(location: Location) -> TaskRecord:
    """The task a pending or claimed file at ``location`` holds; raises DispatchError when it is none."""
    try:
        return read_record(location.path, task_record)
    except BadRecord as exc:
        raise DispatchError(f"{location.path.parent}/{exc}") from None
    except BadTask as exc:
        raise DispatchError(f"{location.path}: not a valid task ({exc})") from None
