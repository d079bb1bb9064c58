"""Hostile records where the spool, retention, the dead-letter fix and the replicas' states read them.

Each reader here goes through spool/readers.py: whatever a file (or a Redis key) holds, the
caller skips it and counts it, or says one line; never a traceback. The values come from the
strategies of tests/unit/test_records.py (any JSON, and objects with the records' own keys).
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activation.cli import main
from activation.cli.explain import how_killed, outcome_notes
from activation.cli.tasks import replica_lines
from activation.orchestrator.dlq_fix import fix_dead_letter
from activation.orchestrator.recovery import DeadLetterError
from activation.orchestrator.relay import role_health
from activation.spool import cancel as cancel_module
from activation.spool.atomic import atomic_write_json
from activation.spool.cancel import request_path
from activation.spool.layout import Spool
from activation.spool.readers import RESULT_STATUSES, UNREADABLE_STATE, BadRecord, replica_state, result_record
from activation.spool.result_index import ResultIndex
from activation.spool.retention import Sweeper, purge
from activation.spool.task import task_record
from activation.transport.streams.client import StreamsTransport
from activation.transport.streams.keys import StreamKeys
from tests.harness import RedisServer
from tests.unit.test_records import HOSTILE, JSON, RECORDISH

W = "w1"
FIXTURES = [HealthCheck.function_scoped_fixture]
HUGE = 10**40  # past 64 bits, well inside JSON's and Python's limits


def _bytes_of(value: Any) -> bytes:
    try:
        return json.dumps(value).encode("utf-8", "surrogatepass")
    except (ValueError, RecursionError):
        return b"[[["


# -- layout: a record under a dead letter's key --------------------------------------------------


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES)
@given(existing=HOSTILE | st.binary(max_size=64).map(lambda b: ("bytes", b)))
def test_a_hostile_record_under_a_dead_letters_key_is_kept_and_the_letter_goes_beside_it(
    tmp_path: Path, existing: Any
) -> None:
    spool = Spool(tmp_path / f"s{time.monotonic_ns()}")
    spool.init([W])
    taken = spool.dead_letter_path("t1")
    data = existing[1] if isinstance(existing, tuple) else _bytes_of(existing)
    taken.write_bytes(data)
    assert spool.locate("t1") is not None  # whatever the record says, the task is found (dead)
    source = spool.task_path(W, "t1")
    atomic_write_json(source, {"task_id": "t1", "description": "x"})
    written = spool.dead_letter(source, reason="max_attempts", detail="3 runs", worker=W, task={"task_id": "t1"})
    if written == taken:  # reused: only a record of this same letter's earlier try may be
        assert json.loads(data)["task"] == {"task_id": "t1"}
    else:
        assert taken.read_bytes() == data, "another entry's record is never overwritten"
        assert json.loads(written.read_text())["reason"] == "max_attempts"


@pytest.mark.parametrize("worker", [7, ["w1"], {"w": 1}, "w1"])
def test_locate_of_a_dead_letter_names_its_worker_only_when_the_record_is_one(spool: Spool, worker: Any) -> None:
    atomic_write_json(spool.dead_letter_path("t1"), {"task_id": "t1", "worker": worker, "reason": "orphaned"})
    found = spool.locate("t1")
    assert found is not None and found.state == "dead"
    assert found.worker == (worker if isinstance(worker, str) else None)


# -- the result index: rows a hostile index holds --------------------------------------------------


def _settled(spool: Spool, *task_ids: str) -> ResultIndex:
    for age, task_id in enumerate(task_ids, 1):
        path = spool.result_path(W, task_id)
        path.write_text(json.dumps({"task_id": task_id, "status": "completed"}))
        os.utime(path, (time.time() - 10 * age, time.time() - 10 * age))
    os.utime(spool.results(W), (time.time() - 60, time.time() - 60))
    index = ResultIndex(spool, W)
    list(index.newest())  # writes the index
    return index


@pytest.mark.parametrize(
    "row",
    [
        b"1 ../../../etc/passwd.json",
        b"1 /etc/hostname.json",
        b"1 .hidden.json",
        b"1 not-a-result",
        b"1 a\x00b.json",
        b"9" * 30 + b" huge.json",
        b"-5 negative.json",
        b"9" * 5000 + b" digits.json",
        b"9000000000000000000 t1.json",  # newer than the row above it: out of order
    ],
)
def test_an_index_row_that_is_no_result_of_the_folder_is_corrupt_and_never_followed(spool: Spool, row: bytes) -> None:
    index = _settled(spool, "t1", "t2")
    expected = [(name, path) for _, name, path in index.newest()]
    header, *rows = index.path.read_bytes().splitlines(keepends=True)
    index.path.write_bytes(b"".join([header, rows[0], row + b"\n", *rows[1:]]))
    assert [(name, path) for _, name, path in ResultIndex(spool, W).newest()] == expected


@settings(max_examples=100, deadline=None, suppress_health_check=FIXTURES)
@given(garbage=st.lists(st.binary(max_size=40), max_size=5))
def test_any_bytes_under_a_valid_header_list_exactly_the_folder(spool: Spool, garbage: list[bytes]) -> None:
    index = _settled(spool, "a", "b", "c")
    header = index.path.read_bytes().splitlines(keepends=True)[0]
    index.path.write_bytes(header + b"\n".join(garbage))
    rows = list(ResultIndex(spool, W).newest())
    folder = os.fspath(spool.results(W))
    assert all(os.path.dirname(path) == folder for _, _, path in rows), "no row leads out of the folder"
    assert len({name for _, name, _ in rows}) == len(rows), "no row twice"
    assert {"a.json", "b.json", "c.json"} <= {name for _, name, _ in rows}, "no result hidden"


# -- retention: an expired entry it cannot delete -------------------------------------------------------


def _expired(spool: Spool, name: str, *, folder: bool = False) -> Path:
    path = spool.results(W) / name
    if folder:
        path.mkdir()
        (path / "inside").write_text("x")
    else:
        path.write_text('{"task_id": "x", "status": "completed"}')
    os.utime(path, (time.time() - 3600, time.time() - 3600))
    return path


def test_results_purge_skips_what_it_cannot_delete_in_one_line_and_deletes_the_rest(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    blocked = _expired(spool, "folder.json", folder=True)
    gone = _expired(spool, "old.json")
    monkeypatch.setenv("ACTIVATION_SPOOL", str(spool.root))
    ran = CliRunner().invoke(main, ["results", "purge", "--older-than", "1m", "--json"])
    assert ran.exit_code == 0, ran.output
    answer = json.loads(ran.stdout)
    assert [p["task_id"] for p in answer["purged"]] == ["old"]
    assert len(answer["skipped"]) == 1 and "folder.json" in answer["skipped"][0]
    assert ran.stderr.count("\n") == 1 and "could not be deleted" in ran.stderr
    assert "Traceback" not in ran.output
    assert blocked.is_dir() and not gone.exists()


def test_the_sweeper_counts_what_it_cannot_delete_and_goes_on(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    _expired(spool, "folder.json", folder=True)
    gone = _expired(spool, "old.json")
    sweeper = Sweeper(spool, ttl=60)
    try:
        assert sweeper.step() == 1
    finally:
        sweeper.close()
    assert sweeper.skipped == 1 and not gone.exists()
    assert [r.getMessage() for r in caplog.records if "could not delete" in r.getMessage()]
    assert purge(spool, 60, dry_run=True) != []  # the folder is still there, and still expired


# -- the dead-letter fix: any task a dead letter holds ---------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=FIXTURES)
@given(task=RECORDISH | st.dictionaries(st.sampled_from(["task_id", "description", "timeout", "metadata"]), JSON))
def test_fixing_any_dead_task_gives_a_valid_task_or_one_line(spool: Spool, task: dict[str, Any]) -> None:
    atomic_write_json(spool.dead_letter_path("k1"), {"task_id": "k1", "worker": W, "reason": "invalid", "task": task})
    try:
        fixed = fix_dead_letter(spool, "k1", description="fixed", timeout=30, metadata={"by": "test"})
    except DeadLetterError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert task_record(fixed)["description"] == "fixed"


@pytest.mark.parametrize(
    "record",
    [
        [1, 2],
        {"reason": 7, "task": {"task_id": "k1", "description": "x"}},
        {"reason": "invalid", "task": "not an object"},
        {"reason": "invalid", "worker": W, "task": {"task_id": "k1", "description": "x", "history": HUGE}},
        {"reason": "invalid", "worker": W, "task": {"task_id": "k1", "description": "x", "timeout": HUGE}},
    ],
)
def test_dlq_retry_with_a_fix_of_a_hostile_letter_is_one_line(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, record: Any
) -> None:
    spool.init([W])
    atomic_write_json(spool.dead_letter_path("k1"), record)
    monkeypatch.setenv("ACTIVATION_SPOOL", str(spool.root))
    ran = CliRunner().invoke(main, ["dlq", "retry", "k1", "--description", "fixed"])
    assert "Traceback" not in ran.output
    assert ran.exception is None or isinstance(ran.exception, SystemExit), ran.exception
    if ran.exit_code != 0:
        assert ran.stderr.strip() and ran.stderr.strip().count("\n") == 0, ran.stderr
    else:  # a fix that makes it whole: the task is back, valid
        assert task_record(json.loads(spool.task_path(W, "k1").read_text()))["description"] == "fixed"


# -- a replica's heartbeat state in Redis -----------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(value=HOSTILE)
def test_a_replica_state_reads_as_itself_or_one_bad_record(value: Any) -> None:
    for given_as in (value, _bytes_of(value), _bytes_of(value).decode("utf-8", "surrogatepass")):
        try:
            state = replica_state(given_as, replica="r1")
        except BadRecord as exc:
            assert str(exc) and "\n" not in str(exc)
            continue
        if given_as is value:
            assert state is value, "nothing is added, renamed or dropped"
        else:
            assert state == json.loads(given_as)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"[1, 2]", "replica 'r1' state is not a JSON object (got list)"),
        (b'"running"', "replica 'r1' state is not a JSON object (got str)"),
        (b"{not json", "replica 'r1': state is not JSON"),
        (b"\xff\xfe", "replica 'r1': state is not JSON"),
        (b'{"queue_size": "3"}', "replica 'r1': queue_size must be an integer or null, got str"),
        (
            b'{"queue_size": ' + str(HUGE).encode() + b"}",
            "replica 'r1': queue_size must be an integer or null, got an int",
        ),
        (b'{"queue_size": ' + b"9" * 5000 + b"}", "replica 'r1': state is not JSON"),
        (b'{"current_task": ["t1"]}', "replica 'r1': current_task must be a string or null, got list"),
        (b'{"programs": {"listener": 1}}', "replica 'r1': programs must be an object of strings or null"),
    ],
)
def test_a_hostile_replica_state_is_named_in_one_line(raw: bytes, says: str) -> None:
    with pytest.raises(BadRecord) as caught:
        replica_state(raw, replica="r1")
    assert str(caught.value).startswith(says), str(caught.value)


@pytest.fixture
def client(redis_server: RedisServer) -> Any:
    connection = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield connection
    connection.close()


def test_hostile_replica_keys_in_redis_are_replicas_whose_state_is_unreadable(client: redis.Redis) -> None:
    keys = StreamKeys(W)
    good = StreamsTransport(client, W, consumer="good", lease=30)
    good.beat({"worker": W, "state": "running", "current_task": "t1", "queue_size": 2}, ttl=60)
    hostile = {
        "list": "[1, 2, 3]",
        "text": '"running"',
        "torn": '{"state": "runn',
        "typed": '{"current_task": 5, "queue_size": "many"}',
        "huge": '{"queue_size": ' + "9" * 4000 + "}",
        "deep": "[" * 100_000 + "]" * 100_000,
    }
    for name, raw in hostile.items():
        StreamsTransport(client, W, consumer=name, lease=30).beat({}, ttl=60)
        client.set(keys.replica(name), raw)
    found = good.replicas()
    assert set(found) == {"good", *hostile}
    assert found["good"]["current_task"] == "t1"
    for name in hostile:
        assert found[name]["state"] == UNREADABLE_STATE and "\n" not in found[name]["problem"], found[name]
    health = role_health(W, found, 0, None)
    assert health.alive and health.current_task == "t1" and health.queue_size == 2
    assert [p for p in health.problems if p.startswith(f"{len(hostile)} replica state(s) unreadable")]
    lines = replica_lines(found)
    assert len(lines) == len(found) and all("\n" not in line for line in lines)
    assert "replica good: running task=t1 queue=2" in " ".join(lines)


@settings(max_examples=150, deadline=None, suppress_health_check=FIXTURES)
@given(value=HOSTILE)
def test_any_state_a_replica_key_holds_gives_a_health_and_lines(client: redis.Redis, value: Any) -> None:
    keys = StreamKeys(W)
    transport = StreamsTransport(client, W, consumer="r1", lease=30)
    transport.beat({}, ttl=60)
    client.set(keys.replica("r1"), _bytes_of(value))
    found = transport.replicas()
    health = role_health(W, found, 0, None)
    assert health.alive
    assert all("\n" not in line for line in replica_lines(found))


# -- cancel and show: the words for a result --------------------------------------------------------


SIGNALS = st.lists(st.sampled_from(["SIGINT", "SIGKILL", "SIGTERM"]), max_size=3)
KILL = st.dictionaries(st.sampled_from(["reason", "timeout_s", "kill_grace_s", "signals"]), JSON | SIGNALS)
CANCELLED = st.dictionaries(st.sampled_from(["at", "by", "while"]), JSON | st.sampled_from(["running", "pending"]))
RESULTS = st.builds(
    lambda record, status, kill, cancelled, truncated: {
        **record,
        "task_id": "t1",
        "status": status,
        **({"kill": kill} if kill is not None else {}),
        **({"cancelled": cancelled} if cancelled is not None else {}),
        "truncated": truncated,
    },
    RECORDISH,
    st.sampled_from(RESULT_STATUSES),
    st.none() | KILL,
    st.none() | CANCELLED,
    st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(value=RESULTS)
def test_the_words_for_any_result_the_reader_accepts_never_raise(value: dict[str, Any]) -> None:
    try:
        result = result_record(value)
    except BadRecord:
        return
    for note in outcome_notes(result):
        assert note and "\n" not in note
    how_killed(result.get("kill"))


@pytest.mark.parametrize(
    ("result", "exit_code", "says"),
    [
        (b"[1]", 1, "its result cannot be read: t1.json: result is not a JSON object"),
        (b'{"task_id": "t1", "status": "cancelled", "kill": "SIGKILL"}', 1, "kill must be an object, got str"),
        (b'{"task_id": "other", "status": "cancelled"}', 1, "task_id 'other' is not t1"),
        (b'{"task_id": "t1", "status": "cancelled", "kill": {"signals": ["SIGKILL", "SIGINT"]}}', 0, "SIGINT, then"),
    ],
)
def test_cancel_of_a_running_task_whose_result_is_hostile_is_one_line(
    spool: Spool, monkeypatch: pytest.MonkeyPatch, result: bytes, exit_code: int, says: str
) -> None:
    atomic_write_json(spool.task_path(W, "t1"), {"task_id": "t1", "description": "x"})
    assert spool.claim(W, "t1") is not None
    requested = threading.Event()

    def request_then_say(*args: Any, **kwargs: Any) -> Any:
        try:
            return real_request(*args, **kwargs)
        finally:
            requested.set()

    # The result must come after the canceller's own look for one, or the cancel is honestly
    # "it has just finished" (the race the product reports); the event orders the two.
    real_request = cancel_module.request_cancel
    monkeypatch.setattr(cancel_module, "request_cancel", request_then_say)

    def executor() -> None:  # stands in for the executor: it answers the request with the result
        assert requested.wait(10), "the cancel request"
        assert request_path(spool, W, "t1").exists()
        spool.result_path(W, "t1").write_bytes(result)

    answering = threading.Thread(target=executor)
    answering.start()
    monkeypatch.setenv("ACTIVATION_SPOOL", str(spool.root))
    try:
        ran = CliRunner().invoke(main, ["cancel", "t1", "--wait-timeout", "10"])
    finally:
        answering.join()
    assert ran.exit_code == exit_code, ran.output
    shown = ran.stdout if exit_code == 0 else ran.stderr
    assert says in shown and shown.count("\n") == 1, shown
