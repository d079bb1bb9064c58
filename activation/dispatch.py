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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from activation.errors import BadTask, DispatchError
from activation.spool import Location, Spool, atomic_write_json, iso_now, read_json
from activation.task import is_valid_task_id, validate_task

log = logging.getLogger("activation.dispatch")


def new_task_id() -> str:
    """A unique id that also sorts by creation time."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + "-" + secrets.token_hex(5)


@dataclass(frozen=True)
class Dispatched:
    task_id: str
    worker: str
    path: Path
    transport: str = "files"


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
    except BadTask as exc:
        raise DispatchError(f"invalid task: {exc.detail}") from None
    return task


def dispatch(spool: Spool, worker: str, task: dict[str, Any], *, check_unique: bool = True) -> Dispatched:
    """Write ``task`` atomically into ``worker``'s inbox."""
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
    log.info(
        "dispatched %s to %s", task_id, worker, extra={"worker": worker, "task_id": task_id, "event": "dispatched"}
    )
    return Dispatched(task_id=task_id, worker=worker, path=path)


class _Wake(FileSystemEventHandler):
    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.event.set()


def wait_for_outcome(spool: Spool, worker: str, task_id: str, timeout: float | None) -> Location:
    """Block until the task has a result or is in the dead letter; raise DispatchError on timeout.

    inotify on the results folder wakes it at once; a short re-check covers filesystems
    without inotify and the dead letter.
    """
    woken = threading.Event()
    observer = Observer()
    try:
        observer.schedule(_Wake(woken), str(spool.results(worker)), recursive=False)
        observer.start()
    except OSError:
        observer = None  # type: ignore[assignment]
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
        if observer is not None:
            observer.stop()
            observer.join(timeout=2)


def read_outcome(location: Location) -> dict[str, Any]:
    """The result (or dead-letter record) at ``location``."""
    data = read_json(location.path)
    if not isinstance(data, dict):
        raise DispatchError(f"{location.path} is not a JSON object")
    return data
