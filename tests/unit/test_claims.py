"""spool/claims.py: the one settlement of an interrupted claim, case by case, and as a property."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activation.spool import claims, outcome
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.claims import (
    DROPPED,
    FINISHED,
    GAVE_UP,
    PUT_BACK,
    REQUEUED,
    UNREADABLE,
    attempts_of,
    settle_claim,
)
from activation.spool.layout import Spool

W = "w1"
WHY = "for the test"


def claim_bytes(spool: Spool, task_id: str, data: bytes) -> Path:
    path = spool.claim_path(W, task_id)
    path.write_bytes(data)
    return path


def claim_task(spool: Spool, task_id: str, **fields: Any) -> Path:
    return claim_bytes(spool, task_id, json.dumps({"task_id": task_id, "description": "do it", **fields}).encode())


def places(spool: Spool, task_id: str) -> list[str]:
    """Every place the task id is in: exactly one, after any settlement."""
    found = []
    for state, path in (
        ("pending", spool.task_path(W, task_id)),
        ("processing", spool.claim_path(W, task_id)),
        ("done", spool.result_path(W, task_id)),
        ("dead", spool.dead_letter_path(task_id)),
    ):
        if os.path.lexists(path):
            found.append(state)
    return found


# -- the table, row by row ------------------------------------------------------------------------


def test_a_claim_with_a_result_is_dropped_and_the_result_kept(spool):
    claim_task(spool, "done-1", attempts=1)
    atomic_write_json(spool.result_path(W, "done-1"), {"task_id": "done-1", "status": "completed"})
    action = settle_claim(spool, W, "done-1", max_attempts=3, why=WHY)
    assert action is not None and action.action == DROPPED
    assert places(spool, "done-1") == ["done"]
    assert read_json(spool.result_path(W, "done-1"))["status"] == "completed"


def test_a_claim_with_a_saved_outcome_gets_that_result_and_never_runs_again(spool):
    """Class 4 of issue 10, for every settler: the run finished, only its result write had failed."""
    claim_task(spool, "ran-1", attempts=0)
    outcome.save_outcome(spool, W, {"task_id": "ran-1", "worker": W, "status": "completed", "attempts": 1})
    dry = settle_claim(spool, W, "ran-1", max_attempts=3, why=WHY, dry_run=True)
    assert dry is not None and dry.action == FINISHED and places(spool, "ran-1") == ["processing"]
    action = settle_claim(spool, W, "ran-1", max_attempts=3, why=WHY)
    assert action is not None and action.action == FINISHED
    assert places(spool, "ran-1") == ["done"]
    assert read_json(spool.result_path(W, "ran-1"))["attempts"] == 1  # not requeued: no second run
    assert not os.path.lexists(outcome.outcome_path(spool, W, "ran-1"))


def test_a_saved_outcome_that_still_cannot_be_written_stays_with_its_claim(spool):
    claim_task(spool, "ran-2")
    outcome.save_outcome(spool, W, {"task_id": "ran-2", "worker": W, "status": "completed", "attempts": 1})
    results = spool.results(W)
    for entry in results.iterdir():
        entry.unlink()
    results.rmdir()
    results.write_text("not a folder")  # the write keeps failing
    action = settle_claim(spool, W, "ran-2", max_attempts=3, why=WHY)
    assert action is not None and action.action == UNREADABLE
    assert places(spool, "ran-2") == ["processing"] and os.path.lexists(outcome.outcome_path(spool, W, "ran-2"))


@pytest.mark.parametrize(
    ("case", "data"),
    [
        ("not JSON", b'{"task_id": "bad", "descr'),
        ("empty", b""),
        ("not UTF-8", b"\xff\xfe{}"),
        ("a JSON array", b"[1, 2, 3]"),
        ("a JSON string", b'"just text"'),
        ("attempts a string", b'{"task_id": "bad", "description": "x", "attempts": "two"}'),
        ("attempts negative", b'{"task_id": "bad", "description": "x", "attempts": -1}'),
        ("attempts a boolean", b'{"task_id": "bad", "description": "x", "attempts": true}'),
        ("attempts a float", b'{"task_id": "bad", "description": "x", "attempts": 1.5}'),
        ("attempts past the listener's range", b'{"task_id": "bad", "description": "x", "attempts": 10000001}'),
        ("attempts of 4,000 digits", b'{"task_id": "bad", "description": "x", "attempts": ' + b"9" * 4000 + b"}"),
    ],
)
def test_a_claim_that_is_not_a_task_goes_back_unchanged_for_the_listener(spool, case, data):
    claim_bytes(spool, "bad", data)
    action = settle_claim(spool, W, "bad", max_attempts=3, why=WHY)
    assert action is not None and action.action == PUT_BACK, case
    assert places(spool, "bad") == ["pending"]
    assert spool.task_path(W, "bad").read_bytes() == data  # byte for byte: the listener sees the original


def test_a_symlink_claim_goes_back_as_the_symlink_it_is(spool, tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text('{"task_id": "link", "description": "x"}')
    os.symlink(target, spool.claim_path(W, "link"))
    action = settle_claim(spool, W, "link", max_attempts=3, why=WHY)
    assert action is not None and action.action == PUT_BACK
    assert spool.task_path(W, "link").is_symlink() and target.read_text().startswith("{")


@pytest.mark.parametrize(("before", "after"), [(None, 1), (0, 1), (1, 2)])
def test_an_interrupted_run_goes_back_with_attempts_plus_one(spool, before, after):
    fields = {} if before is None else {"attempts": before}
    claim_task(spool, "again", metadata={"k": "v"}, **fields)
    action = settle_claim(spool, W, "again", max_attempts=3, why=WHY)
    assert action is not None and action.action == REQUEUED and f"attempts {after}" in action.detail
    assert places(spool, "again") == ["pending"]
    task = read_json(spool.task_path(W, "again"))
    assert task["attempts"] == after and task["metadata"] == {"k": "v"}  # unknown fields kept


@pytest.mark.parametrize(("before", "max_attempts"), [(2, 3), (5, 3), (None, 1), (0, 1)])
def test_the_run_that_reaches_max_attempts_goes_to_the_dead_letter(spool, before, max_attempts):
    fields = {} if before is None else {"attempts": before}
    claim_task(spool, "doomed", **fields)
    action = settle_claim(spool, W, "doomed", max_attempts=max_attempts, why=WHY)
    assert action is not None and action.action == GAVE_UP
    assert WHY in action.detail and f"ACTIVATION_MAX_ATTEMPTS {max_attempts}" in action.detail
    assert places(spool, "doomed") == ["dead"]
    record = read_json(spool.dead_letter_path("doomed"))
    assert record["reason"] == "max_attempts" and record["worker"] == W
    assert record["task"]["attempts"] == (before or 0) + 1


def test_a_claim_someone_else_settled_first_is_nothing_to_do(spool):
    assert settle_claim(spool, W, "gone", max_attempts=3, why=WHY) is None


def test_an_unreadable_claim_is_left_in_place(spool, monkeypatch):
    claim_task(spool, "eio")

    def broken(path: Path) -> bytes:
        raise OSError(errno.EIO, "Input/output error", str(path))

    monkeypatch.setattr(claims, "read_task_bytes", broken)
    action = settle_claim(spool, W, "eio", max_attempts=3, why=WHY)
    assert action is not None and action.action == UNREADABLE and "Input/output error" in action.detail
    assert places(spool, "eio") == ["processing"]


def test_a_dry_run_says_what_it_would_do_and_moves_nothing(spool):
    claim_task(spool, "a", attempts=0)
    claim_task(spool, "b", attempts=2)
    claim_bytes(spool, "c", b"{")
    before = {p.name: p.read_bytes() for p in spool.processing(W).iterdir()}
    done = [settle_claim(spool, W, t, max_attempts=3, why=WHY, dry_run=True) for t in ("a", "b", "c")]
    assert [a.action for a in done if a] == [REQUEUED, GAVE_UP, PUT_BACK]
    assert {p.name: p.read_bytes() for p in spool.processing(W).iterdir()} == before


@pytest.mark.parametrize(
    ("value", "count"), [(None, 0), (0, 0), (4, 4), (-1, None), ("1", None), (True, None), (2.0, None)]
)
def test_attempts_of(value, count):
    assert attempts_of({} if value is None else {"attempts": value}) == count


# -- the property ---------------------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(st.characters(exclude_categories=["Cs"])),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    content=st.one_of(
        st.binary(max_size=64),
        JSON.map(lambda v: json.dumps(v).encode()),
        st.dictionaries(st.sampled_from(["task_id", "description", "attempts", "x"]), JSON, max_size=4).map(
            lambda v: json.dumps(v).encode()
        ),
    ),
    has_result=st.booleans(),
    max_attempts=st.integers(min_value=1, max_value=5),
)
def test_any_claim_settles_into_exactly_one_place_without_raising(spool, content, has_result, max_attempts):
    for path in [*spool.processing(W).iterdir(), *spool.inbox(W).iterdir(), *spool.dead_letter_dir.iterdir()]:
        if path.is_file():
            path.unlink()
    result = spool.result_path(W, "p")
    result.unlink(missing_ok=True)
    claim_bytes(spool, "p", content)
    if has_result:
        atomic_write_json(result, {"task_id": "p"}, durable=False)
    action = settle_claim(spool, W, "p", max_attempts=max_attempts, why=WHY)
    assert action is not None
    expected = {DROPPED: ["done"], PUT_BACK: ["pending"], REQUEUED: ["pending"], GAVE_UP: ["dead"]}[action.action]
    assert places(spool, "p") == expected
