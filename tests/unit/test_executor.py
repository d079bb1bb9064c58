"""executor.py: one task to exactly one result, recovery of claims, the drain, and spool trouble."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from activation.clock import iso_now
from activation.config import Settings
from activation.errors import QueueError
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool
from activation.worker import executor as executor_module
from activation.worker.executor import Executor
from activation.worker.result_record import parse_envelope
from tests.conftest import WORKER, wait_for

RESULT_FIELDS = {
    "task_id",
    "worker",
    "status",
    "exit_code",
    "signal",
    "stdout",
    "stderr",
    "stdout_bytes",
    "stderr_bytes",
    "truncated",
    "attempts",
    "created_at",
    "started_at",
    "finished_at",
    "duration_s",
    "activation_latency_ms",
    "source",
    "resources",
    "metadata",
    "description",
    "agent",
}


@pytest.fixture
def make_executor(make_settings: Callable[..., Settings]) -> Callable[..., Executor]:
    def make(**overrides: Any) -> Executor:
        overrides.setdefault("kill_grace", 0.5)
        return Executor(make_settings(**overrides))

    return make


def put_task(spool: Spool, task_id: str, description: str, **fields: Any) -> dict[str, Any]:
    task = {"task_id": task_id, "description": description, "created_at": iso_now(), **fields}
    atomic_write_json(spool.task_path(WORKER, task_id), task)
    return task


def put_claim(spool: Spool, task_id: str, **fields: Any) -> Path:
    path = spool.claim_path(WORKER, task_id)
    atomic_write_json(path, {"task_id": task_id, "description": "x", **fields})
    return path


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def state(spool: Spool, task_id: str) -> str | None:
    location = spool.locate(task_id, [WORKER])
    return location.state if location else None


# -- one task ---------------------------------------------------------------------------------


def test_process_writes_a_complete_result_and_removes_the_claim(spool: Spool, make_executor) -> None:
    task = put_task(spool, "t-1", "hello world", metadata={"team": "infra"})
    result = make_executor().process("t-1", source="inotify")
    assert result is not None
    assert set(result) == RESULT_FIELDS
    assert read_json(spool.result_path(WORKER, "t-1")) == result
    assert not spool.claim_path(WORKER, "t-1").exists()
    assert not spool.task_path(WORKER, "t-1").exists()
    assert result["status"] == "completed" and result["exit_code"] == 0 and result["signal"] is None
    assert result["stdout"] == "done: hello world\n" and result["stderr"] == ""
    assert result["stdout_bytes"] == len("done: hello world\n") and result["truncated"] is False
    assert result["attempts"] == 1 and result["worker"] == WORKER and result["source"] == "inotify"
    assert result["created_at"] == task["created_at"] and result["description"] == "hello world"
    assert result["metadata"] == {"team": "infra"} and result["agent"] is None
    assert result["started_at"] <= result["finished_at"]
    assert 0 < result["duration_s"] < 10
    assert 0 <= result["activation_latency_ms"] < 5000
    assert result["resources"]["cpu_seconds"] > 0 and result["resources"]["rss_peak_bytes"] > 0


def test_claude_json_envelope_is_parsed_into_agent(spool: Spool, make_executor) -> None:
    put_task(spool, "ok", "json")
    put_task(spool, "err", "json-error")
    executor = make_executor()
    ok = executor.process("ok")
    assert ok is not None and ok["status"] == "completed"
    assert ok["agent"]["type"] == "result" and ok["agent"]["is_error"] is False
    err = executor.process("err")
    assert err is not None and err["exit_code"] == 0
    assert err["status"] == "failed", "is_error true fails the task even with exit code 0"


def test_parse_envelope_only_takes_a_result_object() -> None:
    assert parse_envelope('{"type": "result", "is_error": false}\n') == {"type": "result", "is_error": False}
    assert parse_envelope('{"type": "assistant"}') is None
    assert parse_envelope("done: {not json}") is None
    assert parse_envelope("[1, 2]") is None


def test_non_zero_exit_is_failed(spool: Spool, make_executor) -> None:
    put_task(spool, "t-3", "exit=3")
    result = make_executor().process("t-3")
    assert result is not None and (result["status"], result["exit_code"]) == ("failed", 3)


def test_timeout_status_and_killed_exit_code(spool: Spool, make_executor) -> None:
    put_task(spool, "slow", "ignore-int sleep=30", timeout=0.3)
    began = time.monotonic()
    result = make_executor(kill_grace=0.2).process("slow")
    assert time.monotonic() - began < 5
    assert result is not None and result["status"] == "timeout"
    assert (result["exit_code"], result["signal"]) == (-signal.SIGKILL, "SIGKILL")


def test_a_bad_claimed_task_goes_to_the_dead_letter(spool: Spool, make_executor) -> None:
    spool.task_path(WORKER, "bad").write_text(json.dumps({"task_id": "bad", "description": 42}))
    assert make_executor().process("bad") is None
    record = read_json(spool.dead_letter_path("bad"))
    assert record["reason"] == "invalid_field" and record["worker"] == WORKER
    assert state(spool, "bad") == "dead"
    assert not spool.claim_path(WORKER, "bad").exists()


def test_a_task_that_already_has_a_result_is_not_run_again(spool: Spool, make_executor, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    put_task(spool, "twice", f"record={runs}")
    executor = make_executor()
    first = executor.process("twice")
    assert first is not None
    put_task(spool, "twice", f"record={runs}")
    assert executor.process("twice") is None
    assert len(runs.read_text().splitlines()) == 1
    assert read_json(spool.result_path(WORKER, "twice")) == first
    assert not spool.task_path(WORKER, "twice").exists() and not spool.claim_path(WORKER, "twice").exists()


def test_unknown_and_hostile_ids_are_ignored(spool: Spool, make_executor) -> None:
    executor = make_executor()
    assert executor.process("not-there") is None
    assert executor.process("../../etc/passwd") is None
    assert executor.process(".hidden") is None


# -- recovery ----------------------------------------------------------------------------------


def test_recover_settles_every_claim(spool: Spool, make_executor) -> None:
    put_claim(spool, "finished")
    atomic_write_json(spool.result_path(WORKER, "finished"), {"task_id": "finished", "status": "completed"})
    put_claim(spool, "first-crash")
    put_claim(spool, "second-crash", attempts=1)
    put_claim(spool, "last-crash", attempts=2)
    spool.claim_path(WORKER, "garbled").write_text('{"task_id": "garbled", "descr')
    (spool.processing(WORKER) / ".tmp_leftover.json.abcd").write_text("{")

    make_executor(max_attempts=3).recover()

    assert list(spool.processing(WORKER).iterdir()) == []
    assert read_json(spool.result_path(WORKER, "finished"))["status"] == "completed"
    assert read_json(spool.task_path(WORKER, "first-crash"))["attempts"] == 1
    assert read_json(spool.task_path(WORKER, "second-crash"))["attempts"] == 2
    last = read_json(spool.dead_letter_path("last-crash"))
    assert last["reason"] == "max_attempts" and last["task"]["attempts"] == 3
    # A claim that is not a task goes back unchanged: the listener judges it (and dead-letters it).
    assert spool.task_path(WORKER, "garbled").read_text() == '{"task_id": "garbled", "descr'


def test_attempts_count_runs_across_crashes(spool: Spool, make_executor) -> None:
    put_task(spool, "crashy", "x")
    executor = make_executor(max_attempts=3)
    assert spool.claim(WORKER, "crashy") is not None  # an executor claimed it, then died
    executor.recover()
    result = executor.process("crashy")
    assert result is not None and result["attempts"] == 2


# -- the drain ---------------------------------------------------------------------------------


def stop_once_claimed(spool: Spool, executor: Executor, task_id: str) -> threading.Thread:
    """SIGTERM (as the runner delivers it) once the task is running."""

    def stop() -> None:
        wait_for(lambda: spool.claim_path(WORKER, task_id).exists(), 10, 0.01, "the claim")
        time.sleep(0.1)  # let the agent start
        executor.request_stop(signal.SIGTERM)

    thread = threading.Thread(target=stop, name="stopper")
    thread.start()
    return thread


def test_a_stop_during_a_task_lets_it_finish_within_the_drain(spool: Spool, make_executor) -> None:
    put_task(spool, "drain-ok", "sleep=1")
    executor = make_executor(drain_timeout=20)
    stopper = stop_once_claimed(spool, executor, "drain-ok")
    try:
        result = executor.process("drain-ok")
    finally:
        stopper.join(10)
    assert executor.stopping.is_set()
    assert result is not None and result["status"] == "completed"
    put_task(spool, "after-stop", "x")
    assert executor.process("after-stop") is None, "no new task once stopping"
    assert state(spool, "after-stop") == "pending"


def test_past_the_drain_the_task_is_killed_and_put_back_unchanged(spool: Spool, make_executor, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    put_task(spool, "drain-kill", f"ignore-int ignore-term grandchild=30 pidfile={pidfile} sleep=30")
    original = spool.task_path(WORKER, "drain-kill").read_bytes()
    executor = make_executor(drain_timeout=0.05, kill_grace=0.2)
    stopper = stop_once_claimed(spool, executor, "drain-kill")
    began = time.monotonic()
    try:
        assert executor.process("drain-kill") is None
    finally:
        stopper.join(10)
    assert time.monotonic() - began < 5
    assert spool.task_path(WORKER, "drain-kill").read_bytes() == original
    assert not spool.result_path(WORKER, "drain-kill").exists()
    assert not spool.claim_path(WORKER, "drain-kill").exists()
    for pid in (int(p) for p in pidfile.read_text().split()):
        wait_for(lambda pid=pid: gone(pid), 5, what=f"process {pid} to die")


def test_request_stop_keeps_the_first_drain_deadline(make_executor) -> None:
    executor = make_executor(drain_timeout=30)
    executor.request_stop(signal.SIGTERM)
    first = executor._drain_deadline
    executor.request_stop(signal.SIGTERM)
    assert executor._drain_deadline == first and executor.stopping.is_set()


# -- the loop, against a stub queue --------------------------------------------------------------


class StubQueue:
    def __init__(self, replies: list[Any]) -> None:
        self.replies = replies
        self.closed = False

    def get(self, timeout: float, interrupt: Any = None) -> Any:
        reply = self.replies.pop(0) if self.replies else None
        if isinstance(reply, Exception):
            raise reply
        return reply

    def close(self) -> None:
        self.closed = True


class Item:
    def __init__(self, task_id: str, source: str, seen_at: float = 0.0) -> None:
        self.task_id, self.source, self.seen_at = task_id, source, seen_at


@pytest.fixture
def quiet_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor_module, "QUEUE_BACKOFF_MAX", 0.02)


def test_loop_runs_queued_tasks_and_logs_an_outage_once(
    spool: Spool, make_executor, caplog: pytest.LogCaptureFixture, quiet_backoff: None, monkeypatch
) -> None:
    monkeypatch.setattr(executor_module, "QUEUE_OUTAGE_GRACE", 0.0)  # every outage is long enough
    put_task(spool, "queued", "x")
    down = QueueError("cannot reach the work queue")
    stub = StubQueue([down, down, down, Item("queued", "redis"), None])
    executor = make_executor()
    executor._client = stub
    with caplog.at_level(logging.INFO, logger="activation.executor"):
        for _ in range(5):
            executor.loop()
    outages = [r for r in caplog.records if getattr(r, "event", None) == "queue_down"]
    assert len(outages) == 1
    assert [r for r in caplog.records if getattr(r, "event", None) == "queue_up"]
    assert read_json(spool.result_path(WORKER, "queued"))["source"] == "redis"
    executor.shutdown()
    assert stub.closed and executor._client is None


def test_an_outage_as_short_as_a_listener_start_is_no_warning(
    spool: Spool, make_executor, caplog: pytest.LogCaptureFixture, quiet_backoff: None
) -> None:
    # The executor starts before the listener and stops after it: a normal start or stop.
    down = QueueError("cannot reach the work queue")
    stub = StubQueue([down, down, None])
    executor = make_executor()
    executor._client = stub
    with caplog.at_level(logging.DEBUG, logger="activation.executor"):
        executor.loop()
        # A listener starting serves within moments: look again soon, not after a grown backoff.
        assert executor._backoff == executor_module.QUEUE_RETRY_STARTING
        for _ in range(2):
            executor.loop()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert executor._queue_down_since is None  # the outage is over, and forgotten
    executor.shutdown()


def test_json_mode_exit_0_without_an_envelope_is_failed(make_settings, spool) -> None:
    from activation.worker.executor import Executor

    executor = Executor(make_settings(agent_command="true --output-format json -p -- {description}"))
    atomic_write_json(spool.task_path("w1", "silent"), {"task_id": "silent", "description": "x"})
    result = executor.process("silent")
    assert result is not None and result["status"] == "failed" and result["agent"] is None


def test_the_agent_runs_in_its_workdir(make_settings, spool, tmp_path) -> None:
    from activation.worker.executor import Executor

    workdir = tmp_path / "work"
    workdir.mkdir()
    executor = Executor(make_settings(agent_command="pwd -- {description}", agent_workdir=workdir))
    atomic_write_json(spool.task_path("w1", "where"), {"task_id": "where", "description": "x"})
    result = executor.process("where")
    assert result is not None and result["stdout"].strip() == str(workdir)


def test_recovery_removes_temp_files_a_killed_executor_left(make_settings, spool) -> None:
    from activation.worker.executor import Executor

    for folder in (spool.results("w1"), spool.processing("w1")):
        (folder / ".tmp_cut.json.1a2b3c4d").write_text('{"task_id": "cu')
    (spool.results("w1") / "kept.json").write_text("{}")
    Executor(make_settings()).recover()
    assert sorted(p.name for p in spool.results("w1").iterdir()) == ["kept.json"]
    assert list(spool.processing("w1").iterdir()) == []
