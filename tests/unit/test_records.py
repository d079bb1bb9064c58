"""The spool's record readers (spool/readers.py, spool/task.task_record): whatever JSON a file
holds, a reader returns the record or raises its one documented error, never anything else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activation.errors import BadTask
from activation.spool import readers
from activation.spool.cancel import cancelled_record
from activation.spool.readers import (
    BadRecord,
    dead_letter_record,
    heartbeat_record,
    read_record,
    replica_state,
    result_record,
)
from activation.spool.task import task_record

PRIMITIVES = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text()
JSON = st.recursive(
    PRIMITIVES, lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
)
FIELDS = sorted(
    {*readers._RESULT_FIELDS, *readers._DEAD_LETTER_FIELDS, *readers._HEARTBEAT_FIELDS, "description", "history"}
)
# Objects whose keys are the records' own, so that the checks of each field are reached.
RECORDISH = st.dictionaries(st.sampled_from(FIELDS), JSON | st.sampled_from(["completed", "w1", "t1"]), max_size=12)
HOSTILE = JSON | RECORDISH

READERS: dict[str, tuple[Any, type[Exception]]] = {
    "result": (result_record, BadRecord),
    "dead_letter": (dead_letter_record, BadRecord),
    "heartbeat": (heartbeat_record, BadRecord),
    "replica": (replica_state, BadRecord),
    "task": (task_record, BadTask),
}


@pytest.mark.parametrize("name", sorted(READERS))
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=HOSTILE)
def test_a_reader_returns_the_record_itself_or_raises_its_one_error(name: str, value: Any) -> None:
    reader, error = READERS[name]
    try:
        record = reader(value)
    except error as exc:
        message = str(exc)
        assert message and "\n" not in message, "one line"
        return
    assert record is value, "nothing is added, renamed or dropped"


def _result(**fields: Any) -> dict[str, Any]:
    return {"task_id": "t1", "worker": "w1", "status": "completed", "exit_code": 0, "duration_s": 0.5, **fields}


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ([], "result is not a JSON object (got list)"),
        ({"status": "completed"}, "result: task_id is missing"),
        (_result(status="weird"), "result: status must be completed or failed or timeout or cancelled"),
        (_result(duration_s="0.5"), "result: duration_s must be a finite number or null, got str"),
        (_result(exit_code=True), "result: exit_code must be an integer or null, got bool"),
        (_result(stdout_bytes=10**40), "result: stdout_bytes must be an integer, got an int past 64 bits"),
        (_result(stdout=["a"]), "result: stdout must be a string, got list"),
        (_result(kill={"signals": "SIGKILL"}), "result kill: signals must be a list of strings, got str"),
        (_result(cancelled=[]), "result: cancelled must be an object, got list"),
    ],
)
def test_a_hostile_result_is_named_in_one_line(value: Any, says: str) -> None:
    with pytest.raises(BadRecord) as caught:
        result_record(value)
    assert str(caught.value).startswith(says), str(caught.value)


def test_the_records_the_writers_write_read_back_unchanged() -> None:
    result = _result(signal=None, kill={"reason": "timeout", "timeout_s": 1, "kill_grace_s": 5.0, "signals": []})
    assert result_record(result, task_id="t1") is result
    never_ran = cancelled_record("t2", "w1", None, by="cli", was="pending")
    assert result_record(never_ran)["status"] == "cancelled"
    letter = {"task_id": None, "worker": None, "reason": "invalid_json", "detail": "x", "dead_at": "now", "source": "s"}
    assert dead_letter_record(letter) is letter
    beat = {"worker": "w1", "state": "running", "epoch": 1.0, "programs": None, "counts": {"completed": 3}}
    assert heartbeat_record(beat, worker="w1") is beat


def test_a_record_must_be_whose_its_file_says() -> None:
    with pytest.raises(BadRecord, match="is not t2"):
        result_record(_result(), task_id="t2")
    with pytest.raises(BadRecord, match="is not w2"):
        heartbeat_record({"worker": "w1"}, worker="w2")


def test_a_dead_letter_needs_its_reason_and_keeps_whose_it_is() -> None:
    with pytest.raises(BadRecord, match="reason must be a non-empty string") as caught:
        dead_letter_record({"task_id": "d", "reason": ""})
    assert caught.value.task_id == "d"


@pytest.mark.parametrize(
    "data", [b"", b'{"task_id": "t1", "sta', b"\xff\xfe", b"[" * 100_000, b'{"task_id": "t1", "status": NaN}']
)
def test_a_truncated_or_binary_file_is_one_bad_record_naming_the_file(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "t1.json"
    path.write_bytes(data)
    with pytest.raises(BadRecord) as caught:
        read_record(path, result_record)
    assert str(caught.value).startswith("t1.json: ") and "\n" not in str(caught.value)


def test_a_missing_file_is_file_not_found_and_peek_is_none(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_record(tmp_path / "gone.json", heartbeat_record)
    assert readers.peek_record(tmp_path / "gone.json", heartbeat_record) is None
    (tmp_path / "bad.json").write_text('{"description": 3}')
    assert readers.peek_record(tmp_path / "bad.json", task_record) is None
