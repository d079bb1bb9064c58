"""Class 1 of issue 10: any JSON is a value, never a crash.

The invariant: a task file whose bytes are JSON ends in exactly one result or exactly one dead
letter with a reason, whichever way it goes through the worker (listener then executor; the
executor alone; a claim recovered at start; the orchestrator's recovery), and every reader
afterwards (`audit`, `show`, `dlq list/show`) answers without a traceback. Hypothesis writes the
JSON text itself, so that it can hold what Python's json never writes: lone surrogate escapes,
1e400, NaN and Infinity, integers around the 4300-digit limit, nesting of any depth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import shlex
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activation.cli import main
from activation.config import Settings, load_settings
from activation.orchestrator import recovery
from activation.spool import codec
from activation.spool import task as tasks
from activation.spool.atomic import read_json
from activation.spool.audit import audit
from activation.spool.layout import Spool
from activation.worker.executor import Executor
from activation.worker.listener import Listener
from tests.harness import FAKE_AGENT

W = "w1"
SURROGATE_ESCAPES = ["\\ud800", "\\udfff", "\\udc80", "\\ud83d", "\\ude00", "\\ud83d\\ude00"]
ODD_NUMBERS = [
    "1e400",
    "-1e400",
    "1e-400",
    "NaN",
    "Infinity",
    "-Infinity",
    "0.1000000000000000000000000000001",
    "-0",
    "1E+2",
    "123456789012345678901234567890",
]

numbers = st.one_of(
    st.integers().map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.sampled_from(ODD_NUMBERS),
    st.integers(4290, 4310).map(lambda n: "9" * n),  # both sides of the int-str digit limit
)
strings = st.one_of(
    st.text(st.characters(exclude_categories=())).map(json.dumps),  # any code point, surrogates escaped
    st.text(st.characters(exclude_categories=("Cs",))).map(lambda s: json.dumps(s, ensure_ascii=False)),
    st.lists(st.sampled_from([*SURROGATE_ESCAPES, "a", "é", "\\n", "-", "--version", "\\u0000"]), max_size=6).map(
        lambda parts: '"' + "".join(parts) + '"'
    ),
)
leaves = st.one_of(st.sampled_from(["null", "true", "false", "[]", "{}"]), numbers, strings)
values = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.lists(kids, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
        st.lists(st.tuples(strings, kids), max_size=4).map(lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"),
    ),
    max_leaves=12,
)
deep = st.one_of(st.sampled_from([62, 63, 64, 65, 100, 990, 1000, 100_000]), st.integers(1, 3000)).map(
    lambda n: '{"a":' * n + "0" + "}" * n
)


@st.composite
def task_texts(draw: st.DrawFn, task_id: str = "t-1") -> str:
    fields = {'"task_id"': json.dumps(task_id)}
    fields['"description"'] = draw(st.one_of(strings, values, st.just('"--version"')))
    for name in ("timeout", "attempts", "metadata", "created_at", "extra"):
        if draw(st.booleans()):
            fields[json.dumps(name)] = draw(st.one_of(values, deep) if name in ("metadata", "extra") else values)
    if draw(st.booleans()):
        fields[draw(strings)] = draw(values)
    return "{" + ",".join(f"{k}:{v}" for k, v in fields.items()) + "}"


# -- the world one example runs in -------------------------------------------------------------


class World:
    """A fresh spool, a listener and an executor (with the fake agent) of worker w1 on it."""

    def __init__(self, root: Path) -> None:
        self.spool = Spool(root / "spool")
        self.spool.init([W])
        workdir = root / "agent"  # the fake agent's file directives land here, never in the repo
        workdir.mkdir()
        agent = shlex.join([sys.executable, str(FAKE_AGENT), "--output-format", "json"]) + " -p -- {description}"
        self.settings: Settings = load_settings(
            env={},
            worker_name=W,
            spool=self.spool.root,
            run_dir=root / "run",
            agent_command=agent,
            agent_workdir=workdir,
            metrics_port=0,
            task_timeout=5.0,
            max_task_timeout=5.0,  # whatever timeout a task asks for, it runs at most 5 s
            kill_grace=0.2,
            settle_time=0.0,
        )
        self.listener = Listener(self.settings, sources=[])
        self.executor = Executor(self.settings)

    def put(self, text: str, task_id: str = "t-1", where: str = "inbox") -> Path:
        folder = self.spool.inbox(W) if where == "inbox" else self.spool.processing(W)
        path = folder / f"{task_id}.json"
        path.write_bytes(text.encode("utf-8"))
        return path

    def outcomes(self, task_id: str = "t-1") -> tuple[list[Path], list[dict[str, Any]]]:
        results = [p for p in self.spool.results(W).glob("*.json") if p.stem == task_id]
        dead = [read_json(p) for p in self.spool.dead_letters()]
        return results, [d for d in dead if d.get("task_id") == task_id]


@contextlib.contextmanager
def world() -> Iterator[World]:
    with tempfile.TemporaryDirectory(prefix="hostile-") as root:
        yield World(Path(root))


def through_listener(w: World, task_id: str = "t-1") -> None:
    w.listener.notify(f"{task_id}.json", "rescan", complete=True)
    item = w.listener.work.take(w, 0)  # as the executor's get() over the queue socket
    if item is not None:
        w.executor.process(item.task_id)
        w.listener.work.ack(w)


def assert_one_outcome(w: World, task_id: str = "t-1") -> dict[str, Any]:
    """Exactly one result or one dead letter with a reason; nothing left behind; every reader answers."""
    results, dead = w.outcomes(task_id)
    assert len(results) + len(dead) == 1, (results, dead)
    assert not list(w.spool.inbox(W).glob("*.json")), "left in the inbox"
    assert not list(w.spool.processing(W).glob("*.json")), "left claimed"
    outcome = read_json(results[0]) if results else dead[0]
    if dead:
        assert dead[0]["reason"], dead
        assert "task" in dead[0] or Path(dead[0]["raw"]).exists(), "the dead letter lost the task"
        if "task" in dead[0]:
            assert codec.loads(codec.encode(dead[0]["task"])) == dead[0]["task"]  # the kept task is carryable
    assert audit(w.spool, heartbeat_timeout=30, temp_age=600) == []
    runner = CliRunner()
    env = {"ACTIVATION_SPOOL": str(w.spool.root)}
    for args in (
        ["show", task_id],
        ["show", task_id, "--json"],
        ["dlq", "list"],
        ["dlq", "list", "--json"],
        ["audit"],
        ["audit", "--json"],
        *([["dlq", "show", task_id], ["dlq", "show", task_id, "--json"]] if dead else []),
    ):
        ran = CliRunner.invoke(runner, main, args, env=env)
        assert ran.exit_code == 0, (args, ran.output, ran.exception)
    return outcome


HYPOTHESIS = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@HYPOTHESIS
@given(task_texts())
def test_any_json_task_ends_in_one_result_or_one_dead_letter(text: str) -> None:
    with world() as w:
        w.put(text)
        through_listener(w)
        outcome = assert_one_outcome(w)
        if isinstance(outcome.get("task"), dict):  # a dead letter that kept its task: retry it, once
            env = {"ACTIVATION_SPOOL": str(w.spool.root)}
            retried = CliRunner().invoke(main, ["dlq", "retry", "t-1"], env=env)
            assert retried.exit_code == 0, (retried.output, retried.exception)
            through_listener(w)
            assert_one_outcome(w)


@HYPOTHESIS
@given(task_texts())
def test_any_json_task_the_executor_claims_unvetted_ends_in_one_outcome(text: str) -> None:
    with world() as w:
        w.put(text)
        w.executor.process("t-1")  # the listener never saw it: the executor's own validation
        if list(w.spool.inbox(W).glob("*.json")):  # put back (still being written): the listener's turn
            through_listener(w)
        assert_one_outcome(w)


@HYPOTHESIS
@given(task_texts())
def test_any_json_claim_recovered_at_start_ends_in_one_outcome(text: str) -> None:
    with world() as w:
        w.put(text, where="claim")
        w.executor.recover()  # requeued with attempts + 1, or dead-lettered
        through_listener(w)
        assert_one_outcome(w)


@HYPOTHESIS
@given(task_texts(), st.booleans())
def test_any_json_task_of_a_dead_worker_is_recovered_by_the_orchestrator(text: str, claimed: bool) -> None:
    with world() as w:
        w.put(text, where="claim" if claimed else "inbox")
        # w1 runs no program (its locks are free): with no orphan age, one look is silence enough
        recovery.recover(w.spool, orphan_age=-1, stopped_grace=0, max_attempts=3)
        if list(w.spool.inbox(W).glob("*.json")):
            through_listener(w)
        assert_one_outcome(w)


# -- each hostile value by name ----------------------------------------------------------------


def task_text(**fields: str) -> str:
    fields.setdefault("task_id", '"t-1"')
    fields.setdefault("description", '"say hello"')
    return "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"


CASES = {
    # name: (task text, the reason of its dead letter, or None for a result)
    "lone_surrogate_in_description": (task_text(description='"hi \\ud800"'), tasks.UNENCODABLE),
    "lone_low_surrogate_in_description": (task_text(description='"\\udcff"'), tasks.UNENCODABLE),
    "surrogate_pair_is_fine": (task_text(description='"smile \\ud83d\\ude00"'), None),
    "lone_surrogate_in_metadata": (task_text(metadata='{"note": ["x", "\\ud800"]}'), tasks.UNENCODABLE),
    "lone_surrogate_in_a_key": (task_text(metadata='{"\\udfff": 1}'), tasks.UNENCODABLE),
    "lone_surrogate_in_an_unknown_field": (task_text(owner='"\\ud800"'), tasks.UNENCODABLE),
    "lone_surrogate_in_created_at": (task_text(created_at='"\\ud800"'), tasks.UNENCODABLE),
    "timeout_1e400": (task_text(timeout="1e400"), tasks.UNENCODABLE),
    "timeout_nan": (task_text(timeout="NaN"), tasks.UNENCODABLE),
    "metadata_infinity": (task_text(metadata='{"x": -Infinity}'), tasks.UNENCODABLE),
    "timeout_int_too_large_for_a_float": (task_text(timeout="1" + "0" * 400), tasks.INVALID_FIELD),
    "timeout_1e-400_is_zero": (task_text(timeout="1e-400"), tasks.INVALID_FIELD),
    "attempts_of_4000_digits": (task_text(attempts="9" * 4000), tasks.INVALID_FIELD),
    "number_over_the_digit_limit": (task_text(metadata="9" * 4301), tasks.UNENCODABLE),
    "number_at_the_digit_limit": (task_text(metadata='{"n": ' + "9" * 4300 + "}"), None),
    "number_of_any_precision": (task_text(metadata='{"n": 0.1000000000000000000000000000001}'), None),
    "nesting_at_the_limit": (task_text(metadata='{"a":' * 63 + "0" + "}" * 63), None),
    "nesting_past_the_limit": (task_text(metadata='{"a":' * 64 + "0" + "}" * 64), tasks.UNENCODABLE),
    "nesting_past_the_recursion_limit": (task_text(metadata="[" * 100_000 + "]" * 100_000), tasks.UNENCODABLE),
    "ill_typed_description_beside_a_surrogate": (task_text(description="5", note='"\\ud800"'), tasks.UNENCODABLE),
    "ill_typed_description_is_kept": (task_text(description="[1, 2]"), tasks.INVALID_FIELD),
    "option_like_description": (task_text(description='"--version"'), None),
    "a_whole_mebibyte": (task_text(metadata=json.dumps({"blob": "é" * 500_000}, ensure_ascii=False)), None),
    "a_mebibyte_ending_in_a_surrogate": (
        task_text(metadata=json.dumps("x" * 1_000_000)[:-1] + '\\ud800"'),
        tasks.UNENCODABLE,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_hostile_value_ends_in_its_outcome(name: str) -> None:
    text, reason = CASES[name]
    assert len(text.encode()) <= tasks.MAX_TASK_BYTES
    with world() as w:
        w.put(text)
        through_listener(w)
        outcome = assert_one_outcome(w)
        if reason is None:
            assert outcome["status"] == "completed", outcome
            assert outcome["metadata"] == (codec.loads(text).get("metadata") or {})  # echoed as read
        else:
            assert outcome["reason"] == reason, outcome
            assert "\n" not in outcome["detail"] and len(outcome["detail"]) < 400, outcome["detail"]
            if reason == tasks.UNENCODABLE:  # the task could not be kept in the record: its bytes are
                assert Path(outcome["raw"]).read_bytes() == text.encode()


def test_a_detail_names_where_the_value_is() -> None:
    with pytest.raises(tasks.BadTask) as caught:
        tasks.parse_task(task_text(metadata='{"notes": [1, "\\ud800"]}').encode(), "t-1")
    assert caught.value.reason == tasks.UNENCODABLE
    assert "metadata.notes[1]" in caught.value.detail
    assert caught.value.task is None


def test_the_writer_never_raises_on_what_a_reader_returned() -> None:
    value = json.loads('{"\\ud800": ["\\udfff", NaN, ' + "9" * 4300 + "]}")  # the tolerant reader's kind of value
    data = codec.encode(value)
    data.decode("ascii")  # escaped, so any stream takes it
    back = json.loads(data)["\ud800"]
    assert back[0] == "\udfff" and back[1] != back[1] and back[2] == value["\ud800"][2]  # NaN != NaN


def test_an_envelope_with_a_lone_surrogate_is_carried_with_a_replacement(tmp_path: Path) -> None:
    envelope = '{"type": "result", "is_error": false, "result": "half \\ud83d"}'
    script = f"import sys; print({envelope!r})"
    command = shlex.join([sys.executable, "-c", script, "--output-format", "json"]) + " -- {description}"
    with world() as w:
        executor = Executor(dataclasses.replace(w.settings, agent_command=command))
        w.put(task_text())
        result = executor.process("t-1")
        assert result is not None and result["status"] == "completed", result
        assert result["agent"]["result"] == "half \ufffd"
        assert_one_outcome(w)


def test_the_listener_logs_each_bad_file_once(caplog: pytest.LogCaptureFixture) -> None:
    with world() as w:
        w.spool.dead_letter_dir.rmdir()
        w.spool.dead_letter_dir.write_text("not a folder")  # the dead letter cannot be written
        w.put(task_text(description='"\\ud800"'))
        caplog.set_level(logging.DEBUG, logger="activation.listener")
        for _ in range(5):
            w.listener.rescan("periodic")
        complaints = [r for r in caplog.records if r.levelno >= logging.WARNING and "t-1.json" in r.getMessage()]
        assert len(complaints) == 1, [r.getMessage() for r in complaints]
        assert list(w.spool.inbox(W).glob("t-1.json")), "the file must stay until it can be dead-lettered"


def test_the_listener_logs_an_unexpected_failure_once_per_file(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("a bug")

    with world() as w:
        w.put(task_text())
        monkeypatch.setattr(tasks, "parse_task", broken)
        caplog.set_level(logging.DEBUG, logger="activation.listener")
        for _ in range(5):
            w.listener.rescan("periodic")
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1, [r.getMessage() for r in errors]
