"""Outcomes and health, below the boundary: what cannot start, what cannot be written, what the beat says.

Issue 10, classes 2 (a task the OS cannot start gets an outcome), 4 (a finished run is never
thrown away), 5 (health tells the truth) and 9 (margins). The integration tests in
tests/integration/test_outcomes_and_health.py check the same promises on a real worker tree.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activation.clock import iso_now
from activation.config import STOP_MARGIN, Settings, load_settings
from activation.errors import ConfigError
from activation.spool import outcome as outcomes
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.health import layout_problems, worker_health
from activation.spool.layout import Spool
from activation.worker import liveness
from activation.worker import spawn as spawning
from activation.worker.executor import Executor
from tests.conftest import FAKE_AGENT, WORKER
from tests.harness import fake_agent_command

BIG = spawning.MAX_ARG_STRLEN + 10  # one byte too many for a single argv word, and some


def put_task(spool: Spool, task_id: str, description: str, **fields: Any) -> None:
    task = {"task_id": task_id, "description": description, "created_at": iso_now(), **fields}
    atomic_write_json(spool.task_path(WORKER, task_id), task)


def runs_of(record: Path) -> int:
    return len(record.read_text().splitlines()) if record.exists() else 0


class StubQueue:
    """Hands out the given task ids, then nothing; counts how often it was asked."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = list(ids)
        self.gets = 0

    def get(self, timeout: float, interrupt: Any = None) -> Any:
        self.gets += 1
        if not self.ids:
            return None
        task_id = self.ids.pop(0)
        return type("Item", (), {"task_id": task_id, "source": "inotify", "seen_at": 0.0})()

    def close(self) -> None:
        pass


def beat_state(settings: Settings) -> dict[str, Any]:
    return dict(read_json(liveness.beat_path(settings.run_dir)))


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(liveness, "TROUBLE_BACKOFF_MIN", 0.0)
    monkeypatch.setattr(liveness, "TROUBLE_BACKOFF_MAX", 0.0)


# -- class 2: a task the OS cannot start ----------------------------------------------------------


def test_a_description_too_long_for_argv_goes_on_stdin_and_reaches_the_agent_whole(spool: Spool, make_settings) -> None:
    description = "stdin-delivered " + "d" * BIG
    put_task(spool, "long-1", description)
    result = Executor(make_settings()).process("long-1")
    assert result is not None and result["status"] == "completed", result and result["stderr"]
    assert result["stdout"] == f"done: {description}\n"
    assert result["description"] == description


def test_a_description_too_long_for_a_template_that_embeds_it_is_dead_lettered_with_a_reason(
    spool: Spool, make_settings
) -> None:
    settings = make_settings(agent_command=fake_agent_command().replace("{description}", "prompt={description}"))
    put_task(spool, "long-2", "x" * BIG)
    assert Executor(settings).process("long-2") is None
    record = read_json(spool.dead_letter_path("long-2"))
    assert record["reason"] == spawning.ARGV_TOO_LONG
    assert "stdin" in record["detail"] and "{description}" in record["detail"]
    assert record["task"]["description"] == "x" * BIG
    assert not spool.claim_path(WORKER, "long-2").exists() and not spool.task_path(WORKER, "long-2").exists()


@settings(max_examples=40, deadline=None)
@given(
    size=st.integers(min_value=0, max_value=3 * spawning.MAX_ARG_STRLEN),
    char=st.sampled_from(["a", "é", "€", "🙂", " ", "-", "{task_id}"]),
)
def test_plan_launch_always_delivers_the_description_exactly_once(size: int, char: str) -> None:
    description = (char * (size // max(len(char.encode()), 1) + 1))[: max(size // 4, 1)] + "end"
    template = "agent --flag -p -- {description}"
    launch = spawning.plan_launch(template, description, {"PATH": "/bin"}, task_id="t")
    assert spawning.argv_problem(launch.argv, {"PATH": "/bin"}) is None
    if launch.stdin is None:
        assert launch.argv == ["agent", "--flag", "-p", "--", description]
    else:
        assert launch.argv == ["agent", "--flag", "-p", "--"]  # claude -p -- reads the prompt from stdin
        assert launch.stdin == description.encode()


def test_argv_problem_knows_the_kernels_two_limits() -> None:
    assert spawning.argv_problem(["a", "b" * (spawning.MAX_ARG_STRLEN - 1)], {}) is None
    assert "per word" in (spawning.argv_problem(["a", "b" * spawning.MAX_ARG_STRLEN], {}) or "")
    many = {f"V{i}": "x" * 100_000 for i in range(spawning.ARG_MAX // 100_000 + 1)}
    assert "ARG_MAX" in (spawning.argv_problem(["a"], many) or "")


def test_a_missing_agent_binary_leaves_every_task_waiting_and_says_why(
    spool: Spool, make_settings, tmp_path: Path
) -> None:
    agent = tmp_path / "bin" / "agent"
    settings = make_settings(agent_command=f"{agent} -p -- {{description}}", heartbeat_interval=0.1)
    ids = [f"wait-{i:03d}" for i in range(300)]
    for task_id in ids:
        put_task(spool, task_id, "x")
    executor = Executor(settings)
    executor._client = stub = StubQueue(ids)
    executor._idle_check()  # what initialize() does last
    for _ in range(5):
        executor.loop()
    assert spool.count_inbox(WORKER) == 300, "no task is consumed while no task can start"
    assert not list(spool.results(WORKER).iterdir()) and not list(spool.dead_letters())
    assert stub.gets == 0, "a worker that cannot start its agent takes no task"
    state = beat_state(settings)
    assert state["state"] == "degraded" and state["reason"] == spawning.AGENT_NOT_FOUND
    assert str(agent) in state["detail"]

    agent.parent.mkdir()
    agent.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_AGENT} "$@"\n')
    agent.chmod(0o755)
    executor.loop()  # preflight passes now: the trouble is over
    assert beat_state(settings)["state"] == "ok"
    executor.loop()
    assert spool.result_path(WORKER, "wait-000").exists()


def test_a_spawn_failure_preflight_cannot_see_puts_the_task_back_and_backs_off(spool: Spool, make_settings) -> None:
    # A script whose interpreter is missing: the file exists and is executable, exec says ENOENT.
    script = spool.root / "agent.sh"
    script.write_text("#!/nonexistent/interpreter\n")
    script.chmod(0o755)
    settings = make_settings(agent_command=f"{script} -p -- {{description}}")
    put_task(spool, "probe-1", "x")
    put_task(spool, "probe-2", "x")
    executor = Executor(settings)
    executor._client = stub = StubQueue(["probe-1", "probe-2"])
    executor.loop()
    assert spool.task_path(WORKER, "probe-1").exists(), "back in the inbox, unchanged"
    assert "attempts" not in read_json(spool.task_path(WORKER, "probe-1"))
    trouble = executor.condition.trouble
    assert trouble is not None and trouble.reason == spawning.AGENT_NOT_FOUND and not trouble.static
    executor.stopping.set()  # the backoff wait returns at once; the loop must still not take a task
    executor.loop()
    assert stub.gets == 1, "backing off: no second task taken"
    assert beat_state(settings)["state"] == "degraded"


def test_a_streak_of_fast_failures_degrades_and_one_good_run_clears_it(run_dir: Path) -> None:
    import logging

    condition = liveness.Condition(liveness.ExecutorBeat(run_dir, 1), logging.getLogger("test"), WORKER)
    for _ in range(liveness.FAST_FAIL_STREAK - 1):
        condition.note_run(True, 0.01, 2, "error: unknown option '--bogus'\nmore")
    assert condition.trouble is None
    condition.note_run(True, 0.01, 2, "error: unknown option '--bogus'")
    trouble = condition.trouble
    assert trouble is not None and trouble.reason == liveness.AGENT_FAILING and not trouble.static
    assert "exit 2: error: unknown option '--bogus'" in trouble.detail
    condition.started()
    assert condition.trouble is not None, "starting proves nothing: the run must succeed"
    condition.note_run(True, 0.01, 2, "again")
    assert condition.trouble is not None and condition.trouble.backoff == 2 * trouble.backoff
    condition.note_run(True, liveness.FAST_FAIL_S + 1, 1, "a slow failure is the task's own")
    assert condition.trouble is None and condition.streak == 0


def test_a_missing_workdir_degrades_instead_of_refusing_to_start(spool: Spool, make_settings, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    settings = make_settings(agent_workdir=workdir)
    executor = Executor(settings)  # no ConfigError: that would be a crash loop under supervisord
    executor._idle_check()
    assert beat_state(settings)["reason"] == spawning.WORKDIR_MISSING
    workdir.mkdir()
    executor._idle_check()
    assert beat_state(settings)["state"] == "ok"


def test_a_claim_whose_processing_folder_vanished_recreates_it(spool: Spool, make_settings) -> None:
    put_task(spool, "no-proc", "x")
    spool.processing(WORKER).rmdir()
    result = Executor(make_settings()).process("no-proc")
    assert result is not None and result["status"] == "completed"


# -- class 4: a finished run is never thrown away -----------------------------------------------------


def failing_writes(monkeypatch: pytest.MonkeyPatch, spool: Spool, code: int = errno.ENOSPC) -> list[int]:
    calls: list[int] = []

    def refuse(worker: str, result: dict[str, Any]) -> Path:
        calls.append(1)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(spool, "write_result", refuse)
    return calls


@pytest.mark.parametrize("on_thread", [False, True], ids=["in_line", "result_writer_thread"])
def test_a_result_that_cannot_be_written_is_held_and_only_the_write_is_retried(
    spool: Spool, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_backoff: None, on_thread: bool
) -> None:
    record = tmp_path / "runs"
    put_task(spool, "held-1", f"record={record}")
    executor = Executor(make_settings())
    if on_thread:
        executor._finisher.start_writer()  # as initialize() does in files mode
    calls = failing_writes(monkeypatch, executor.spool)
    executor._client = stub = StubQueue(["held-1"])
    try:
        executor.loop()
        executor._finisher.settle()  # the thread's failure comes back and is held
        assert runs_of(record) == 1 and calls
        assert spool.claim_path(WORKER, "held-1").exists(), "the claim stays: the run is done, its result owed"
        saved = outcomes.load_outcome(spool, WORKER, "held-1")
        assert saved is not None and saved["status"] == "completed" and saved["attempts"] == 1
        state = beat_state(executor.settings)
        assert state["state"] == "degraded" and "cannot write the result of held-1" in state["detail"]
        for _ in range(5):
            executor.loop()
        assert len(calls) >= 5 and runs_of(record) == 1 and stub.gets == 1, "only the write is retried"
        monkeypatch.undo()
        executor.loop()
        result = read_json(spool.result_path(WORKER, "held-1"))
        assert result == saved
        assert runs_of(record) == 1
        assert not spool.claim_path(WORKER, "held-1").exists()
        assert outcomes.saved_outcomes(spool, WORKER) == []
        assert beat_state(executor.settings)["state"] == "ok"
    finally:
        executor.shutdown()


def slow_writes(monkeypatch: pytest.MonkeyPatch, spool: Spool) -> threading.Event:
    """Result writes wait at a gate the test opens."""
    gate = threading.Event()
    write = spool.write_result

    def slow(worker: str, result: dict[str, Any]) -> Path:
        assert gate.wait(10)
        return write(worker, result)

    monkeypatch.setattr(spool, "write_result", slow)
    return gate


def slow_writer_executor(
    spool: Spool, make_settings, record: Path, monkeypatch: pytest.MonkeyPatch, *ids: str
) -> tuple[Executor, threading.Event]:
    """An executor with its result writer started, its queue handing out ``ids`` (one task put
    for the first), and the gate its result writes wait at."""
    put_task(spool, ids[0], f"record={record}")
    executor = Executor(make_settings())
    executor._finisher.start_writer()
    gate = slow_writes(monkeypatch, executor.spool)
    executor._client = StubQueue(list(ids))
    return executor, gate


def test_a_task_dispatched_again_while_its_result_is_on_its_way_is_a_duplicate_not_a_second_run(
    spool: Spool, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "runs"
    executor, gate = slow_writer_executor(spool, make_settings, record, monkeypatch, "twice", "twice")
    try:
        executor.loop()
        assert runs_of(record) == 1 and executor._finisher.writing("twice")
        put_task(spool, "twice", f"record={record}")  # the same id again, while its result is unwritten
        threading.Timer(0.2, gate.set).start()
        executor.loop()  # waits for the result, then finds it: the new copy is dropped, not run
        assert runs_of(record) == 1
        assert spool.result_path(WORKER, "twice").exists() and not spool.claim_path(WORKER, "twice").exists()
        assert spool.count_inbox(WORKER) == 0
    finally:
        gate.set()
        executor.shutdown()


def test_shutdown_writes_the_results_still_on_their_way(
    spool: Spool, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "runs"
    executor, gate = slow_writer_executor(spool, make_settings, record, monkeypatch, "last")
    executor.loop()
    executor.request_stop()
    assert not spool.result_path(WORKER, "last").exists()
    threading.Timer(0.2, gate.set).start()
    executor.shutdown()
    assert read_json(spool.result_path(WORKER, "last"))["status"] == "completed"
    assert not spool.claim_path(WORKER, "last").exists()


def test_a_restarted_executor_writes_the_saved_outcome_instead_of_running_the_agent_again(
    spool: Spool, make_settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = tmp_path / "runs"
    put_task(spool, "held-2", f"record={record}")
    first = Executor(make_settings())
    failing_writes(monkeypatch, first.spool)
    assert first.process("held-2") is None
    monkeypatch.undo()
    # The first executor dies here (SIGKILL): its memory is gone, the saved outcome is not.
    Executor(make_settings()).recover()
    result = read_json(spool.result_path(WORKER, "held-2"))
    assert result["attempts"] == 1 and result["status"] == "completed"
    assert runs_of(record) == 1
    assert not spool.claim_path(WORKER, "held-2").exists() and not spool.task_path(WORKER, "held-2").exists()


def test_recovery_holds_a_saved_outcome_it_cannot_write_yet_and_never_requeues_its_claim(
    spool: Spool, make_settings, monkeypatch: pytest.MonkeyPatch, no_backoff: None
) -> None:
    atomic_write_json(spool.claim_path(WORKER, "held-3"), {"task_id": "held-3", "description": "x"})
    saved = {"task_id": "held-3", "status": "completed", "attempts": 1, "duration_s": 0.1, "source": "inotify"}
    outcomes.save_outcome(spool, WORKER, saved)
    executor = Executor(make_settings())
    failing_writes(monkeypatch, executor.spool, errno.ENOTDIR)
    executor.recover()
    assert spool.claim_path(WORKER, "held-3").exists() and not spool.task_path(WORKER, "held-3").exists()
    assert executor._finisher.held.results == {"held-3": saved}
    monkeypatch.undo()
    executor._finisher.retry_held()
    assert not executor._finisher.held and executor.condition.trouble is None
    assert read_json(spool.result_path(WORKER, "held-3")) == saved


def test_an_outcome_whose_claim_is_gone_is_dropped_not_written(spool: Spool) -> None:
    outcomes.save_outcome(spool, WORKER, {"task_id": "stale-1", "status": "completed"})
    assert outcomes.settle_outcome(spool, WORKER, "stale-1") is None
    assert outcomes.saved_outcomes(spool, WORKER) == [] and not spool.has_result(WORKER, "stale-1")


def test_an_outcome_file_is_never_taken_for_a_task(spool: Spool) -> None:
    outcomes.save_outcome(spool, WORKER, {"task_id": "quiet", "status": "completed"})
    assert spool.claimed_ids(WORKER) == []


# -- class 5: health tells the truth -----------------------------------------------------------------


def test_the_beat_period_leaves_a_late_beat_its_slack_before_the_wedge_threshold() -> None:
    assert liveness.beat_period(10) == 5.0 and liveness.wedge_after(10) == 10  # the default: a wake-up per 5 s
    assert liveness.beat_period(0.5) == 0.25 and liveness.wedge_after(0.5) == 1.0  # short: a quarter
    assert liveness.beat_period(6) == 2.0  # the slack comes first
    assert liveness.beat_period(3600) == liveness.QUEUE_WAIT_MAX


@given(st.floats(min_value=0.01, max_value=1e6))
def test_a_beat_on_time_is_never_within_its_slack_of_the_wedge_threshold(interval: float) -> None:
    wedge, period = liveness.wedge_after(interval), liveness.beat_period(interval)
    assert 0 < period <= liveness.QUEUE_WAIT_MAX
    assert wedge - period >= min(liveness.BEAT_SLACK, 3 * wedge / 4)


def test_judge_calls_a_beat_older_than_one_interval_wedged(run_dir: Path) -> None:
    pulse = liveness.ExecutorBeat(run_dir, 0.5)
    pulse.set_state(liveness.OK)
    mtime = os.stat(liveness.beat_path(run_dir)).st_mtime
    info = liveness.ExecutorInfo("RUNNING", os.getpid(), mtime - 100)
    fresh = liveness.judge(run_dir, interval=2, info=info, now=mtime + 1.9)
    assert fresh is not None and not fresh["wedged"]
    stale = liveness.judge(run_dir, interval=2, info=info, now=mtime + 2.1)
    assert stale is not None and stale["wedged"]


def test_judge_gives_a_new_executor_until_the_threshold_to_beat(run_dir: Path) -> None:
    liveness.ExecutorBeat(run_dir, 0.5).set_state(liveness.DEGRADED, "agent_not_found", "old news")
    mtime = os.stat(liveness.beat_path(run_dir)).st_mtime
    newcomer = liveness.ExecutorInfo("RUNNING", os.getpid() + 1, mtime + 50)
    young = liveness.judge(run_dir, interval=1, info=newcomer, now=mtime + 50.5)
    assert young is not None and not young["wedged"] and young["state"] == "ok", "not the old pid's state"
    silent = liveness.judge(run_dir, interval=1, info=newcomer, now=mtime + 52)
    assert silent is not None and silent["wedged"]
    assert liveness.judge(run_dir, interval=1, info=liveness.ExecutorInfo("STOPPED")) is None


def write_heartbeat(spool: Spool, **fields: Any) -> None:
    import time

    beat = {"worker": WORKER, "state": "running", "epoch": time.time(), "programs": None, **fields}
    atomic_write_json(spool.heartbeat_path(WORKER), beat)


@pytest.mark.parametrize(
    ("fields", "problem"),
    [
        ({"executor": {"wedged": True, "beat_age_s": 12.5, "state": "ok"}}, "executor wedged: no progress for 12.5s"),
        ({"executor": {"wedged": False, "state": "degraded", "detail": "agent gone"}}, "executor degraded: agent gone"),
        ({"metrics": {"port": 9100, "error": "cannot serve metrics on :9100: taken"}}, "heartbeat cannot serve"),
    ],
)
def test_health_names_the_executor_and_metrics_problems(spool: Spool, fields: dict[str, Any], problem: str) -> None:
    write_heartbeat(spool, **fields)
    health = worker_health(spool, WORKER, timeout=30)
    assert not health.healthy
    assert any(p.startswith(problem) for p in health.problems), health.problems


def test_a_dead_letter_folder_that_is_a_file_is_a_named_layout_problem(spool: Spool) -> None:
    write_heartbeat(spool)
    assert worker_health(spool, WORKER, timeout=30).healthy
    spool.dead_letter_dir.rmdir()
    spool.dead_letter_dir.write_text("oops")
    assert layout_problems(spool, WORKER) == ["spool layout broken: tasks/.dead_letter is not a folder"]
    health = worker_health(spool, WORKER, timeout=30)
    assert "spool layout broken: tasks/.dead_letter is not a folder" in health.problems


def test_a_bad_task_with_a_broken_dead_letter_degrades_the_executor_and_stays_safe(spool: Spool, make_settings) -> None:
    spool.dead_letter_dir.rmdir()
    spool.dead_letter_dir.write_text("oops")
    spool.task_path(WORKER, "bad").write_text(json.dumps({"task_id": "bad", "description": 42}))
    executor = Executor(make_settings())
    assert executor.process("bad") is None  # no exception: the executor lives on
    assert spool.task_path(WORKER, "bad").exists(), "back in the inbox, not lost"
    assert beat_state(executor.settings)["reason"] == "spool_error"


def test_the_heartbeat_survives_a_taken_metrics_port_and_reports_it(make_settings) -> None:
    from activation.worker.heartbeat import Heartbeat

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        heartbeat = Heartbeat(make_settings(metrics_port=port))
        try:
            heartbeat.initialize()
            report = heartbeat.beat()
            assert report["metrics"]["error"].startswith(f"cannot serve metrics on :{port}")
        finally:
            heartbeat.shutdown()


# -- class 9: margins ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    drain=st.floats(min_value=0, max_value=200, allow_nan=False),
    grace=st.floats(min_value=0, max_value=60, allow_nan=False),
    stopwait=st.floats(min_value=1, max_value=300, allow_nan=False),
)
def test_the_drain_and_the_kill_grace_must_fit_stopwaitsecs_with_a_margin(
    drain: float, grace: float, stopwait: float
) -> None:
    env = {
        "ACTIVATION_DRAIN_TIMEOUT": repr(drain),
        "ACTIVATION_KILL_GRACE": repr(grace),
        "ACTIVATION_EXECUTOR_STOPWAITSECS": repr(stopwait),
    }
    if drain + grace + STOP_MARGIN <= stopwait:
        load_settings(env=env)
        return
    with pytest.raises(ConfigError) as caught:
        load_settings(env=env)
    message = str(caught.value)
    assert message.startswith("ACTIVATION_DRAIN_TIMEOUT:") and "\n" not in message


def test_the_defaults_leave_the_margin() -> None:
    defaults = load_settings(env={})
    assert defaults.drain_timeout + defaults.kill_grace + STOP_MARGIN <= defaults.executor_stopwaitsecs
    with pytest.raises(ConfigError, match="ACTIVATION_DRAIN_TIMEOUT"):
        load_settings(env={"ACTIVATION_DRAIN_TIMEOUT": "50"})  # the old default: 50 + 5 raced the SIGKILL at 55
