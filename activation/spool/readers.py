"""One reader per spool record: what a file held (any JSON value) in, the typed record out.

A reader of a file another process wrote must not trust it: a truncated, hand-edited or hostile
result, heartbeat or dead letter raises `BadRecord` (one line, naming the field), never a
TypeError three calls later. Each reader checks the type of every field some reader uses, when
it is there; only the fields no record can do without are required. Unknown fields pass
through, and the returned dict is the value itself (nothing is added or renamed), so a record
read and written again is the same JSON. Tasks have their reader in spool/task.py
(`task_record`), because the listener's validation is that reader.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast, get_args

from activation.errors import ActivationError
from activation.spool.atomic import read_json
from activation.spool.codec import loads
from activation.spool.records import DeadLetterRecord, HeartbeatRecord, ReplicaState, ResultRecord, ResultStatus

RESULT_STATUSES: tuple[str, ...] = get_args(ResultStatus)

R = TypeVar("R")


class BadRecord(ActivationError, ValueError):
    """A spool record that does not hold what its writers promise; the message is one line.

    A ValueError too, so that a caller that already treats an unparsable file as unreadable
    (``except (OSError, ValueError)``) treats an ill-typed one the same way. ``task_id``: the
    task the record names, when it names one (an audit still says whose record it is).
    """

    def __init__(self, message: str, task_id: str | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id


# -- field checks ---------------------------------------------------------------------------------


INT_LIMIT = 2**63  # no count, size or pid of ours comes near; a bigger one is hostile (and costly to print)


def _kind(value: object) -> str:
    if _is_int(value) and not _is_int64(value):
        return "an int past 64 bits"
    return "null" if value is None else type(value).__name__


def _is_str(value: object) -> bool:
    return isinstance(value, str)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_int64(value: object) -> bool:
    return _is_int(value) and -INT_LIMIT <= cast(int, value) < INT_LIMIT


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int past a float's range
        return False


def _is_bool(value: object) -> bool:
    return isinstance(value, bool)


def _is_object(value: object) -> bool:
    return isinstance(value, dict)


def _or_null(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or check(value)


def _list_of_str(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _map_of(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: isinstance(value, dict) and all(isinstance(k, str) and check(v) for k, v in value.items())


Field = tuple[Callable[[object], bool], str]  # (the check, what it expects, for the message)


def _check_fields(what: str, record: dict[str, Any], fields: dict[str, Field], required: tuple[str, ...]) -> None:
    named = record.get("task_id")
    task_id = named if isinstance(named, str) and named else None
    for name in required:
        if name not in record:
            raise BadRecord(f"{what}: {name} is missing", task_id)
    for name, (check, expected) in fields.items():
        if name in record and not check(record[name]):
            raise BadRecord(f"{what}: {name} must be {expected}, got {_kind(record[name])}", task_id)


def _object(what: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRecord(f"{what} is not a JSON object (got {_kind(value)})")
    return value


_STR = (_is_str, "a string")
_STR_OR_NULL = (_or_null(_is_str), "a string or null")
_INT = (_is_int64, "an integer")
_INT_OR_NULL = (_or_null(_is_int64), "an integer or null")
_NUMBER = (_is_number, "a finite number")
_NUMBER_OR_NULL = (_or_null(_is_number), "a finite number or null")
_BOOL = (_is_bool, "true or false")
_OBJECT = (_is_object, "an object")
_OBJECT_OR_NULL = (_or_null(_is_object), "an object or null")

_RESULT_FIELDS = {
    "task_id": _STR,
    "worker": _STR,
    "status": (lambda v: v in RESULT_STATUSES, " or ".join(RESULT_STATUSES)),
    "exit_code": _INT_OR_NULL,
    "signal": _STR_OR_NULL,
    "attempts": _INT,
    "description": _STR_OR_NULL,
    "created_at": _STR_OR_NULL,
    "started_at": _STR_OR_NULL,
    "finished_at": _STR_OR_NULL,
    "duration_s": _NUMBER_OR_NULL,
    "activation_latency_ms": _NUMBER_OR_NULL,
    "source": _STR,
    "stdout": _STR,
    "stderr": _STR,
    "stdout_bytes": _INT,
    "stderr_bytes": _INT,
    "truncated": _BOOL,
    "resources": _OBJECT,
    "agent": _OBJECT_OR_NULL,
    "metadata": _OBJECT,
    "kill": _OBJECT,
    "cancelled": _OBJECT,
    "output_limit": _INT,
}
_KILL_FIELDS = {
    "reason": _STR,
    "timeout_s": _NUMBER_OR_NULL,
    "kill_grace_s": _NUMBER_OR_NULL,
    "signals": (_list_of_str, "a list of strings"),
}
_CANCELLED_FIELDS = {"at": _STR_OR_NULL, "by": _STR_OR_NULL, "while": _STR}

_DEAD_LETTER_FIELDS = {
    "task_id": _STR_OR_NULL,
    "worker": _STR_OR_NULL,
    "reason": (lambda v: isinstance(v, str) and bool(v), "a non-empty string"),
    "detail": _STR_OR_NULL,
    "dead_at": _STR_OR_NULL,
    "source": _STR_OR_NULL,
    "task": _OBJECT,
    "raw": _STR,
}

_HEARTBEAT_FIELDS = {
    "worker": _STR,
    "state": _STR,
    "host": _STR,
    "pid": _INT_OR_NULL,
    "timestamp": _STR_OR_NULL,
    "epoch": _NUMBER_OR_NULL,
    "interval_s": _NUMBER_OR_NULL,
    "started_at": _STR_OR_NULL,
    "current_task": _STR_OR_NULL,
    "queue_size": _INT_OR_NULL,
    "counts": (_map_of(_is_int64), "an object of integers"),
    "programs": (_or_null(_map_of(_is_str)), "an object of strings or null"),
    "listener": _OBJECT_OR_NULL,
    "wake_sources": (_list_of_str, "a list of strings"),
    "executor": _OBJECT_OR_NULL,
    "metrics": _OBJECT_OR_NULL,
    "redis": _STR_OR_NULL,
    "version": _STR_OR_NULL,
}

_REPLICA_FIELDS = {**_HEARTBEAT_FIELDS, "replica": _STR, "problem": _STR}
UNREADABLE_STATE = "unreadable"  # a replica's state when what it published is not one


# -- the readers ------------------------------------------------------------------------------------


def result_record(value: Any, *, task_id: str | None = None) -> ResultRecord:
    """A result file's value as a ResultRecord; raises BadRecord. ``task_id``: the one it must name."""
    record = _object("result", value)
    _check_fields("result", record, _RESULT_FIELDS, ("task_id", "status"))
    if task_id is not None and record["task_id"] != task_id:
        raise BadRecord(f"result: task_id {record['task_id'][:140]!a} is not {task_id}")
    for name, fields in (("kill", _KILL_FIELDS), ("cancelled", _CANCELLED_FIELDS)):
        if name in record:
            try:
                _check_fields(f"result {name}", record[name], fields, ())
            except BadRecord as exc:
                raise BadRecord(str(exc), record["task_id"]) from None
    return cast(ResultRecord, record)


def dead_letter_record(value: Any) -> DeadLetterRecord:
    """A dead-letter file's value as a DeadLetterRecord; raises BadRecord (a record needs its reason)."""
    record = _object("dead letter", value)
    _check_fields("dead letter", record, _DEAD_LETTER_FIELDS, ("reason",))
    return cast(DeadLetterRecord, record)


def heartbeat_record(value: Any, *, worker: str | None = None) -> HeartbeatRecord:
    """A heartbeat file's value as a HeartbeatRecord; raises BadRecord. ``worker``: the one it must name."""
    record = _object("heartbeat", value)
    _check_fields("heartbeat", record, _HEARTBEAT_FIELDS, ("worker",))
    if worker is not None and record["worker"] != worker:
        raise BadRecord(f"heartbeat: worker {record['worker'][:140]!a} is not {worker}")
    return cast(HeartbeatRecord, record)


def replica_state(value: Any, *, replica: str | None = None) -> ReplicaState:
    """A replica's heartbeat state from Redis (its JSON text, or the value parsed) as a ReplicaState;
    raises BadRecord. ``replica``: the consumer name it was found under, for the message."""
    what = f"replica {replica[:140]!a}" if replica is not None else "replica"
    if isinstance(value, str | bytes):
        try:
            value = loads(value, surrogates="replace")  # for display: a stray byte costs nothing
        except ValueError as exc:
            raise BadRecord(f"{what}: state is not JSON ({_first_line(exc)})") from None
    record = _object(f"{what} state", value)
    _check_fields(what, record, _REPLICA_FIELDS, ())
    return cast(ReplicaState, record)


def replica_or_unreadable(raw: str | bytes, replica: str) -> ReplicaState:
    """`replica_state`, or for a hostile one a state that says so in one line (the replica is alive:
    its key is there, under its TTL; only what it says is not to be read)."""
    try:
        return replica_state(raw, replica=replica)
    except BadRecord as exc:
        return {"state": UNREADABLE_STATE, "problem": str(exc)}


def read_record(path: Path, reader: Callable[[Any], R]) -> R:
    """The record in the file at ``path``; raises OSError (FileNotFoundError: none) or BadRecord.

    BadRecord's message names the file: ``<name>: <what is wrong>``.
    """
    try:
        value = read_json(path)
    except OSError:
        raise
    except ValueError as exc:
        raise BadRecord(f"{path.name}: not JSON ({_first_line(exc)})") from None
    try:
        return reader(value)
    except BadRecord as exc:
        raise BadRecord(f"{path.name}: {exc}", exc.task_id) from None


def peek_record(path: Path, reader: Callable[[Any], R]) -> R | None:
    """`read_record`, or None when the file is absent, unreadable or no such record (a listing skips it).

    Any ActivationError of the reader counts as "no such record" (BadTask, for `task_record`).
    """
    try:
        return read_record(path, reader)
    except (OSError, ActivationError):
        return None


def last_history(path: Path) -> dict[str, Any] | None:
    """The last ``history`` entry (one per earlier death, kept by ``dlq retry``) of the task file
    at ``path``, or None. The task need not be valid: a retried task may still be a bad one."""
    try:
        value = read_json(path)
    except (OSError, ValueError):
        return None
    history = value.get("history") if isinstance(value, dict) else None
    last = history[-1] if isinstance(history, list) and history else None
    return last if isinstance(last, dict) else None


def _first_line(exc: Exception) -> str:
    text = str(exc).splitlines()
    return (text[0] if text else type(exc).__name__)[:200]
