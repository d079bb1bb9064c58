"""The task format: reading a task file safely and validating it against the contract.

A bad task is reported as `BadTask(reason, detail)`, never as a crash. A file that may still
be being written is `NotReady`, so that nobody dead-letters a writer's half-finished work.
Whatever JSON a file holds, a task that passes here can be put in argv, written into its result
and its dead-letter record, and printed: what cannot is `unencodable` (spool.codec).
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, cast

from activation.errors import BadTask, NotReady
from activation.spool import codec
from activation.spool.records import TaskRecord

TASK_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_TASK_BYTES = 1024 * 1024
MAX_ATTEMPTS_FIELD = 1_000_000  # `attempts` is the executor's count: anything near this is not one
TASK_SUFFIX = ".json"

# Machine-readable dead-letter reasons for bad input.
SYMLINK = "symlink"
NOT_A_FILE = "not_a_file"
TOO_LARGE = "too_large"
NOT_UTF8 = "not_utf8"
INVALID_JSON = "invalid_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_FIELD = "missing_field"
INVALID_FIELD = "invalid_field"
INVALID_TASK_ID = "invalid_task_id"
ID_MISMATCH = "id_mismatch"
UNENCODABLE = "unencodable"  # JSON that parses but cannot be carried: lone surrogates, NaN, 1e400, too deep
DUPLICATE = "duplicate"
# Reasons given by the executor and the orchestrator.
MAX_ATTEMPTS = "max_attempts"
ORPHANED = "orphaned"


def is_valid_task_id(task_id: object) -> bool:
    return isinstance(task_id, str) and TASK_ID_PATTERN.match(task_id) is not None


def is_task_name(name: str) -> bool:
    """Whether a file name in an inbox is meant as a task. Dot files never are."""
    return name.endswith(TASK_SUFFIX) and not name.startswith(".")


def task_id_of(name: str) -> str:
    return name[: -len(TASK_SUFFIX)] if name.endswith(TASK_SUFFIX) else name


def read_task_bytes(path: Path) -> bytes:
    """Read a task file without following symlinks and without reading past the size cap."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BadTask(SYMLINK, "task files must not be symlinks") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise BadTask(NOT_A_FILE, "not a regular file")
        if info.st_size > MAX_TASK_BYTES:
            raise BadTask(TOO_LARGE, f"{info.st_size} bytes, the limit is {MAX_TASK_BYTES}")
        chunks = []
        remaining = MAX_TASK_BYTES + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 256 * 1024))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > MAX_TASK_BYTES:
            raise BadTask(TOO_LARGE, f"more than {MAX_TASK_BYTES} bytes")
        return data
    finally:
        os.close(fd)


def parse_task(data: bytes, expected_id: str, *, max_timeout: float | None = None) -> dict[str, Any]:
    """Validate a task's bytes. Unknown fields are kept; the returned dict is the task."""
    if not data.strip():
        raise NotReady("empty file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadTask(NOT_UTF8, f"byte {exc.start} is not UTF-8") from None
    try:
        task = codec.loads(text)
    except json.JSONDecodeError as exc:
        raise BadTask(INVALID_JSON, f"line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except codec.Uncarryable as exc:
        raise BadTask(UNENCODABLE, exc.detail) from None
    if not isinstance(task, dict):
        raise BadTask(NOT_AN_OBJECT, f"a task is a JSON object, got {type(task).__name__}")
    try:
        validate_task(task, expected_id, max_timeout=max_timeout)
    except BadTask as exc:
        raise BadTask(exc.reason, exc.detail, task) from None
    return task


def task_record(value: Any, expected_id: str | None = None, *, max_timeout: float | None = None) -> TaskRecord:
    """A task file's (or a claim's, an outbox's) parsed value as a TaskRecord; raises BadTask.

    The one reader of a task: the listener's validation, for every reader that uses a field.
    """
    if not isinstance(value, dict):
        raise BadTask(NOT_AN_OBJECT, f"a task is a JSON object, got {type(value).__name__}")
    validate_task(value, expected_id, max_timeout=max_timeout)
    return cast(TaskRecord, value)


def validate_task(task: dict[str, Any], expected_id: str | None, *, max_timeout: float | None = None) -> None:
    for field in ("task_id", "description"):
        if field not in task:
            raise BadTask(MISSING_FIELD, f"{field} is required")
    task_id = task["task_id"]
    if not isinstance(task_id, str):
        raise BadTask(INVALID_FIELD, f"task_id must be a string, got {type(task_id).__name__}")
    if not is_valid_task_id(task_id):
        raise BadTask(INVALID_TASK_ID, f"task_id {task_id[:140]!r} does not match {TASK_ID_PATTERN.pattern}")
    if expected_id is not None and task_id != expected_id:
        raise BadTask(ID_MISMATCH, f"task_id {task_id!r} differs from the file name {expected_id[:140]!r}")
    description = task["description"]
    if not isinstance(description, str) or not description.strip():
        raise BadTask(INVALID_FIELD, "description must be a non-empty string")
    if "\x00" in description:
        raise BadTask(INVALID_FIELD, "description must not contain NUL characters")
    timeout = task.get("timeout")
    if timeout is not None:
        seconds = _seconds(timeout)
        if seconds is None or not seconds > 0:
            raise BadTask(INVALID_FIELD, f"timeout must be a positive number, got {_shown(timeout)}")
        if max_timeout is not None and seconds > max_timeout:
            raise BadTask(INVALID_FIELD, f"timeout {seconds:g} exceeds the worker's maximum {max_timeout:g}")
    created_at = task.get("created_at")
    if created_at is not None and not isinstance(created_at, str):
        raise BadTask(INVALID_FIELD, "created_at must be an ISO 8601 string")
    attempts = task.get("attempts")
    if attempts is not None and (
        isinstance(attempts, bool) or not isinstance(attempts, int) or not 0 <= attempts <= MAX_ATTEMPTS_FIELD
    ):
        detail = f"attempts must be an integer from 0 to {MAX_ATTEMPTS_FIELD}, got {_shown(attempts)}"
        raise BadTask(INVALID_FIELD, detail)
    metadata = task.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadTask(INVALID_FIELD, "metadata must be an object")


def _seconds(value: object) -> float | None:
    """A JSON number as a finite float, or None (a bool, a string, an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:
        return None
    return seconds if math.isfinite(seconds) else None


def _shown(value: object) -> str:
    """A value for a one-line detail: short, and printable whatever it holds."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"an integer of {len(str(abs(value)))} digits"
    text = ascii(value) if isinstance(value, (str, int, float, bool)) or value is None else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def load_task(path: Path, *, max_timeout: float | None = None) -> dict[str, Any]:
    """Read and validate the task file at ``path``, whose name gives the expected id."""
    name = path.name
    if not name.endswith(TASK_SUFFIX):
        raise BadTask(INVALID_TASK_ID, f"file name {name[:140]!r} does not end in .json")
    if not is_valid_task_id(task_id_of(name)):
        raise BadTask(INVALID_TASK_ID, f"file name {name[:140]!r} is not a valid task id")
    return parse_task(read_task_bytes(path), task_id_of(name), max_timeout=max_timeout)
