"""The executor's part of `activation cancel` and `activation logs`: a cancel request kills the
running tree and gives a `cancelled` result; the agent's output lands in its log as it arrives and
beside the result after; a stream-json run's envelope survives the output limit."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from activation.spool import cancel as cancels
from activation.spool import tasklog
from activation.spool.layout import Spool
from tests.conftest import WORKER, wait_for
from tests.unit import test_executor
from tests.unit.test_executor import gone, put_task

make_executor = test_executor.make_executor  # the same fixture as the executor's own tests


def in_background(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, name="helper")
    thread.start()
    return thread


def test_a_cancel_request_kills_the_whole_tree_and_the_result_is_cancelled(
    spool: Spool, make_executor, tmp_path: Path
) -> None:
    pidfile = tmp_path / "pids"
    put_task(spool, "runaway", f"ignore-int grandchild=60 pidfile={pidfile} sleep=60")
    executor = make_executor(kill_grace=0.3)

    def cancel_once_running() -> None:
        wait_for(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2, 10, 0.01, "agent and grandchild")
        cancels.cancel_task(spool, "runaway", by="test")

    helper = in_background(cancel_once_running)
    try:
        result = executor.process("runaway")
    finally:
        helper.join(10)
    assert result is not None and result["status"] == "cancelled"
    assert result["cancelled"]["by"] == "test" and result["cancelled"]["while"] == "running"
    assert result["kill"]["reason"] == "cancelled" and result["kill"]["signals"] == ["SIGINT", "SIGKILL"]
    for pid in (int(p) for p in pidfile.read_text().split()):
        assert gone(pid), f"process {pid} of the cancelled tree is alive"
    assert not cancels.request_path(spool, WORKER, "runaway").exists()
    assert not spool.claim_path(WORKER, "runaway").exists()


def test_a_request_for_a_task_that_finished_is_cleaned_up(spool: Spool, make_executor) -> None:
    put_task(spool, "quick", "x")
    assert make_executor().process("quick")["status"] == "completed"
    with pytest.raises(cancels.CannotCancel, match="already finished"):
        cancels.cancel_task(spool, "quick")
    # one written by a canceller that raced the end: the canceller, or the next start, removes it
    cancels.request_path(spool, WORKER, "quick").write_text("{}")
    make_executor().recover()
    assert not cancels.request_path(spool, WORKER, "quick").exists()


def test_the_agents_output_is_in_its_log_while_it_runs_and_beside_the_result_after(spool: Spool, make_executor) -> None:
    put_task(spool, "talks", "stream=3 gap=0.2")
    running = tasklog.running_log_path(spool, WORKER, "talks")
    seen: list[bytes] = []

    def watch() -> None:
        seen.append(
            wait_for(
                lambda: running.exists() and b'"tool_use"' in running.read_bytes() and running.read_bytes(),
                10,
                0.01,
                "the first events in the log",
            )
        )

    helper = in_background(watch)
    try:
        result = make_executor().process("talks")
    finally:
        helper.join(10)
    assert seen and b'"type": "result"' not in seen[0], "the log was read while the agent was still talking"
    assert result is not None and result["agent"]["type"] == "result" and result["agent"]["num_turns"] == 3
    kept = tasklog.finished_log_path(spool, WORKER, "talks")
    assert not running.exists() and kept.read_text().splitlines()[-1] == result["stdout"].splitlines()[-1]


def test_a_stream_json_envelope_survives_the_output_limit(spool: Spool, make_executor) -> None:
    put_task(spool, "long-talk", "stream=200 gap=0")
    result = make_executor(output_limit=4096, agent_command=_stream_agent()).process("long-talk")
    assert result is not None and result["truncated"] is True and result["output_limit"] == 4096
    assert result["agent"] is not None and result["agent"]["num_turns"] == 200
    assert result["status"] == "completed"
    log = tasklog.finished_log_path(spool, WORKER, "long-talk").read_text().splitlines()
    assert json.loads(log[-1])["type"] == "result" and len(log) == 1 + 200 * 2 + 2


def _stream_agent() -> str:
    from tests.harness import fake_agent_command

    return fake_agent_command("--output-format", "stream-json", "--verbose")


def test_failures_and_timeouts_log_at_warning(spool: Spool, make_executor, caplog) -> None:
    caplog.set_level(logging.INFO, logger="activation")
    put_task(spool, "bad", "exit=3")
    put_task(spool, "slow", "sleep=30", timeout=0.3)
    put_task(spool, "fine", "x")
    executor = make_executor(kill_grace=0.2)
    for task_id in ("bad", "slow", "fine"):
        executor.process(task_id)
    levels = {
        r.getMessage().split()[1]: r.levelno
        for r in caplog.records
        if r.getMessage().startswith("task ") and "(exit" in r.getMessage()
    }
    assert levels == {"bad": logging.WARNING, "slow": logging.WARNING, "fine": logging.INFO}
    slow = json.loads(spool.result_path(WORKER, "slow").read_text())
    assert slow["kill"] == {"reason": "timeout", "timeout_s": 0.3, "kill_grace_s": 0.2, "signals": ["SIGINT"]}


def test_a_claim_cancelled_while_no_executor_ran_is_cancelled_at_recovery_not_run(spool: Spool, make_executor) -> None:
    from tests.unit.test_executor import put_claim

    put_claim(spool, "orphan", attempts=1, metadata={"k": "v"})
    cancels.request_cancel(spool, WORKER, "orphan", by="api")
    make_executor().recover()
    result = json.loads(spool.result_path(WORKER, "orphan").read_text())
    assert result["status"] == "cancelled" and result["cancelled"]["by"] == "api"
    assert result["cancelled"]["while"] == "running" and result["metadata"] == {"k": "v"}
    assert not spool.claim_path(WORKER, "orphan").exists() and not spool.task_path(WORKER, "orphan").exists()
    assert not cancels.request_path(spool, WORKER, "orphan").exists()
