"""Hostile input at the boundaries a user touches (issue 10, classes 1 and 3).

- The admin API answers 4xx, never 500, for any JSON body (lone surrogates, NaN, 1e400, huge
  integers, deep nesting, a body of nearly 1 MiB), and a task it accepts is one the worker can
  carry to its end.
- A real worker tree under supervisord brings every hostile task file to one result or one dead
  letter with its reason, logs each bad file once however often it rescans, and no program
  restarts on the way.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activation.config import Settings
from activation.orchestrator.service import Orchestrator
from activation.spool import codec
from activation.spool import task as tasks
from activation.spool.atomic import read_json
from tests.harness import WorkerTree, wait_until
from tests.integration.test_orchestrator import OrchestratorThread, call
from tests.unit.test_hostile_json import deep, strings, values

W = "w1"


def body(**fields: str) -> bytes:
    fields.setdefault("worker", json.dumps(W))
    fields.setdefault("description", '"say hello"')
    return ("{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}").encode()


HOSTILE_BODIES = {
    "lone_surrogate_description": body(description='"\\ud800"'),
    "lone_surrogate_metadata_key": body(metadata='{"\\udfff": 1}'),
    "lone_surrogate_task_id": body(task_id='"a\\ud800"'),
    "lone_surrogate_worker": body(worker='"\\ud800"'),
    "nan_metadata": body(metadata='{"x": NaN}'),
    "timeout_1e400": body(timeout="1e400"),
    "timeout_int_too_large_for_a_float": body(timeout="1" + "0" * 400),
    "number_over_the_digit_limit": body(metadata='{"n": ' + "9" * 5000 + "}"),
    "deep_past_the_limit": body(metadata='{"a":' * 70 + "0" + "}" * 70),
    "deep_past_the_recursion_limit": body(metadata="[" * 200_000 + "]" * 200_000),
    "deep_worker": body(worker="[" * 5000 + "]" * 5000),
    "nearly_a_mebibyte_ending_in_a_surrogate": body(description=json.dumps("x" * 1_000_000)[:-1] + '\\ud800"'),
    "not_utf8": b'{"worker": "w1", "description": "\xff"}',
    "attempts_of_4000_digits": body(attempts="9" * 4000),
}
HOSTILE_CONFIGS = {
    "lone_surrogate": b'{"mode": "\\ud800"}',
    "nan": b'{"mode": NaN}',
    "1e400": b'{"mode": 1e400}',
    "digits": b'{"mode": ' + b"9" * 5000 + b"}",
    "deep": b'{"mode": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep_within_reason": b'{"mode": ' + b"[" * 60 + b"]" * 60 + b"}",
}


@pytest.fixture
def api(make_settings: Callable[..., Settings]) -> Iterator[OrchestratorThread]:
    """The real orchestrator program in a thread, its admin API on a free loopback port."""
    program = Orchestrator(make_settings(worker_name=None), bind=("127.0.0.1", 0), refresh_interval=0.05)
    program.spool.init([W])
    running = OrchestratorThread(program).start()
    yield running
    running.stop()


@pytest.mark.parametrize("name", sorted(HOSTILE_BODIES))
def test_post_tasks_answers_400_for_a_hostile_body(api: OrchestratorThread, name: str) -> None:
    status, answer = call(api.url, "POST", "/tasks", raw=HOSTILE_BODIES[name])
    assert status == 400, (status, answer)
    assert isinstance(answer, dict) and answer["error"] and "\n" not in answer["error"]
    assert not list(api.program.spool.inbox(W).glob("*.json")), "a refused body must write no task"


@pytest.mark.parametrize("name", sorted(HOSTILE_CONFIGS))
def test_post_config_answers_400_for_a_hostile_body(api: OrchestratorThread, name: str) -> None:
    status, answer = call(api.url, "POST", "/config", raw=HOSTILE_CONFIGS[name])
    assert status == 400, (status, answer)
    assert api.config()["mode"] == "files"


@st.composite
def api_bodies(draw: st.DrawFn) -> bytes:
    fields = {'"worker"': draw(st.one_of(st.just(json.dumps(W)), strings, values))}
    fields['"description"'] = draw(st.one_of(strings, values))
    for name in ("task_id", "timeout", "metadata", "extra"):
        if draw(st.booleans()):
            fields[json.dumps(name)] = draw(st.one_of(values, deep) if name == "metadata" else values)
    return ("{" + ",".join(f"{k}:{v}" for k, v in fields.items()) + "}").encode()


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=api_bodies())
def test_the_api_never_answers_500_and_what_it_accepts_can_be_carried(api: OrchestratorThread, data: bytes) -> None:
    status, answer = call(api.url, "POST", "/tasks", raw=data)
    assert 200 <= status < 500, (status, answer)
    if status == 202:
        path = api.program.spool.task_path(W, answer["task_id"])
        task = tasks.parse_task(path.read_bytes(), answer["task_id"], max_timeout=api.program.settings.max_task_timeout)
        assert codec.loads(codec.encode(task)) == task
        path.unlink()


# -- a worker tree --------------------------------------------------------------------------------

FILES: dict[str, tuple[bytes, str | None]] = {
    # file name: (bytes, the dead letter's reason, or None for a result)
    "sur.json": (b'{"task_id": "sur", "description": "hi \\ud800"}', tasks.UNENCODABLE),
    "surmeta.json": (
        b'{"task_id": "surmeta", "description": "x", "metadata": {"\\udfff": "\\ud800"}}',
        tasks.UNENCODABLE,
    ),
    "inf.json": (b'{"task_id": "inf", "description": "x", "timeout": 1e400}', tasks.UNENCODABLE),
    "nan.json": (b'{"task_id": "nan", "description": "x", "metadata": {"v": NaN}}', tasks.UNENCODABLE),
    "digits.json": (b'{"task_id": "digits", "description": "x", "metadata": ' + b"9" * 4301 + b"}", tasks.UNENCODABLE),
    "bigint.json": (b'{"task_id": "bigint", "description": "x", "timeout": 1' + b"0" * 400 + b"}", tasks.INVALID_FIELD),
    "deep.json": (
        b'{"task_id": "deep", "description": "x", "m": ' + b"[" * 300_000 + b"]" * 300_000 + b"}",
        tasks.UNENCODABLE,
    ),
    "version.json": (b'{"task_id": "version", "description": "--version"}', None),
    "digits4300.json": (
        b'{"task_id": "digits4300", "description": "x", "metadata": {"n": ' + b"9" * 4300 + b"}}",
        None,
    ),
    "mebibyte.json": (
        b'{"task_id": "mebibyte", "description": "x", "metadata": {"blob": "' + "é".encode() * 500_000 + b'"}}',
        None,
    ),
    b"\xff\xfe.json".decode("utf-8", "surrogateescape"): (b"{}", tasks.INVALID_TASK_ID),
}


def test_a_worker_tree_brings_every_hostile_file_to_one_outcome_and_logs_it_once(
    make_tree: Callable[..., WorkerTree],
) -> None:
    tree = make_tree()
    pids = {program: tree.pid(program) for program in tree.programs}
    inbox = tree.spool.inbox(W)
    for name, (data, _) in FILES.items():
        tmp = inbox / f".tmp_{name}"
        tmp.write_bytes(data)
        tmp.rename(inbox / name)

    def outcome(name: str) -> dict[str, Any] | None:
        task_id = tasks.task_id_of(name)
        if tasks.is_valid_task_id(task_id):
            return tree.result(task_id) or tree.dead_letter(task_id)
        records = [read_json(p) for p in tree.spool.dead_letters()]
        return next((r for r in records if r.get("task_id") is None and r["source"].endswith("\\xff\\xfe.json")), None)

    for name, (_, reason) in FILES.items():
        found = wait_until(lambda n=name: outcome(n), 30, 0.05, lambda n=name: f"{n!r}; log:\n{tree.log_tail()}")
        if reason is None:
            assert found["status"] == "completed", found
        else:
            assert found["reason"] == reason, found
    assert tree.result("version")["stdout"] == "done: --version\n"  # the prompt, not an option

    # Several rescans later: each bad file was logged once, and nothing restarted.
    rescans = tree_rescans(tree)
    wait_until(lambda: tree_rescans(tree) >= rescans + 3, 30, 0.1, "three more rescans")
    log = tree.log.read_text(errors="replace")
    for name, (_, reason) in FILES.items():
        if reason is not None:
            lines = [line for line in log.splitlines() if "dead-lettered" in line and ascii(name)[1:-1] in line]
            assert len(lines) == 1, (name, lines)
    assert "Traceback" not in log
    assert not re.search(r"failed to examine|exited: (listener|executor|heartbeat)", log), log[-3000:]
    assert tree.states() == {p: "RUNNING" for p in tree.programs}
    assert {program: tree.pid(program) for program in tree.programs} == pids
    audited = tree.cli("audit")
    assert audited.returncode == 0, audited.stdout + audited.stderr
    for args in (["dlq", "list"], ["dlq", "list", "--json"], ["status"], ["show", "sur"], ["dlq", "show", "deep"]):
        shown = tree.cli(*args)
        assert shown.returncode == 0 and "Traceback" not in shown.stderr, (args, shown.stdout, shown.stderr)


def tree_rescans(tree: WorkerTree) -> int:
    try:
        beat = read_json(tree.spool.heartbeat_path(W))
    except (OSError, ValueError):
        return 0
    listener = beat.get("listener") or {}
    return int(listener.get("rescans") or 0)


def test_dispatch_refuses_a_description_it_cannot_carry(make_tree: Callable[..., WorkerTree], tmp_path: Path) -> None:
    tree = make_tree(start=False)
    # A command-line argument that is not UTF-8 reaches Python as a lone surrogate.
    done = tree.cli("dispatch", W, b"hi \xff".decode("utf-8", "surrogateescape"))
    assert done.returncode != 0
    assert "invalid task" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not list(tree.spool.inbox(W).glob("*.json"))


HOSTILE_RECORDS: dict[str, bytes] = {
    "list": b"[1, 2]",
    "string": b'"completed"',
    "torn": b'{"task_id": "r1", "sta',
    "wrong_types": b'{"task_id": "r1", "status": "completed", "duration_s": "fast", "exit_code": [0]}',
    "huge_int": b'{"task_id": "r1", "status": "completed", "stdout_bytes": ' + str(10**40).encode() + b"}",
    "digits": b'{"task_id": "r1", "status": "completed", "exit_code": ' + b"9" * 5000 + b"}",
    "not_utf8": b'{"task_id": "r1", "status": "\xff"}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_RECORDS))
def test_get_task_of_a_hostile_record_is_one_line_and_get_dlq_counts_it(api: OrchestratorThread, name: str) -> None:
    spool = api.program.spool
    spool.result_path(W, "r1").write_bytes(HOSTILE_RECORDS[name])
    spool.dead_letter_path("d1").write_bytes(HOSTILE_RECORDS[name].replace(b"r1", b"d1"))
    good = {"task_id": "d2", "worker": W, "reason": "orphaned", "detail": "x", "dead_at": "2026-01-01T00:00:00Z"}
    spool.dead_letter_path("d2").write_text(json.dumps(good))
    for task_id in ("r1", "d1"):
        status, answer = call(api.url, "GET", f"/tasks/{task_id}")
        assert status == 500 and isinstance(answer, dict), (status, answer)
        assert "cannot read" in answer["error"] and "\n" not in answer["error"], answer
    status, listing = call(api.url, "GET", "/dlq")
    assert status == 200 and [d["id"] for d in listing["dead_letters"]] == ["d2"], listing
    assert listing["unreadable"] == 1 and listing["skipped"][0].startswith("d1.json: "), listing
    status, answer = call(api.url, "POST", "/dlq/d1/retry")
    assert status == 500 and "unreadable" in answer["error"] and "\n" not in answer["error"], (status, answer)
