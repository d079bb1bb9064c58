"""agent.py: argv and environment of the agent, output capture, and the end of its whole tree."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from activation.errors import ConfigError
from activation.process_start import start_ticks, ticks_now
from activation.worker import agent
from activation.worker.agent import AgentRun, run_agent
from activation.worker.agent_inputs import agent_environment, build_argv
from activation.worker.spawn import CannotStart
from tests.conftest import FAKE_AGENT, wait_for

FAKE = [sys.executable, str(FAKE_AGENT), "-p", "--"]

HOSTILE = [
    "plain words with  two spaces",
    "it's \"quoted\" and 'single'",
    "$(touch {marker}) `touch {marker}` ; touch {marker} && echo | cat",
    "-rf --help",
    "{task_id} {description} {unknown}",
    "new\nline\ttab \\ backslash",
    "*.json ~ $HOME ${PATH}",
    "ünïcödé ✓",
]


@pytest.fixture
def subreaper() -> Iterator[None]:
    """Make the test process adopt orphans, as the executor does; undone afterwards."""
    assert agent.become_subreaper(True)
    yield
    agent.become_subreaper(False)


def run(description: str, *, timeout: float = 10.0, kill_grace: float = 0.5, output_limit: int = 1 << 20) -> AgentRun:
    return run_agent(
        [*FAKE, description], env=dict(os.environ), timeout=timeout, kill_grace=kill_grace, output_limit=output_limit
    )


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def read_pids(path: Path) -> list[int]:
    return [int(line) for line in path.read_text().split()]


# -- argv and environment ---------------------------------------------------------------------


@pytest.mark.parametrize("description", HOSTILE)
def test_build_argv_keeps_any_description_as_exactly_one_argument(description: str) -> None:
    assert build_argv("claude -p -- {description}", description) == ["claude", "-p", "--", description]
    argv = build_argv("agent --id={task_id} 'two words' --prompt={description}", description, task_id="t-1")
    assert argv == ["agent", "--id=t-1", "two words", f"--prompt={description}"]


def test_build_argv_rejects_a_template_that_cannot_be_split() -> None:
    with pytest.raises(ConfigError, match="ACTIVATION_AGENT_COMMAND"):
        build_argv("claude -p '{description}", "x")


def test_hostile_descriptions_reach_the_agent_verbatim_and_no_shell_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for template in HOSTILE:
        description = template.replace("{marker}", str(marker))
        result = run(description)
        assert result.exit_code == 0, result.stderr
        assert result.stdout == f"done: {description}\n"
    assert not marker.exists()


def test_agent_environment_strips_activation_secrets_and_adds_the_task() -> None:
    base = {
        "PATH": "/usr/bin",
        "ANTHROPIC_API_KEY": "the agent needs this one",
        "ACTIVATION_SPOOL": "/spool",
        "ACTIVATION_ADMIN_TOKEN": "s1",
        "REDIS_URL": "redis://:s2@redis/0",
        "REDIS_PASSWORD": "s3",
        "ACTIVATION_DB_PASSWORD": "s4",
        "ACTIVATION_SOME_TOKEN": "s5",
        "PROMETHEUS_MULTIPROC_DIR": "/run/metrics",
    }
    env = agent_environment(base, "t-1", "w1", attempt=2)
    assert env == {
        "PATH": "/usr/bin",
        "ANTHROPIC_API_KEY": "the agent needs this one",
        "ACTIVATION_SPOOL": "/spool",
        "ACTIVATION_TASK_ID": "t-1",
        "ACTIVATION_WORKER": "w1",
        "ACTIVATION_ATTEMPT": "2",
    }
    assert base["ACTIVATION_ADMIN_TOKEN"] == "s1"  # the caller's mapping is left alone


def test_the_agent_process_sees_exactly_the_filtered_environment(tmp_path: Path) -> None:
    dump = tmp_path / "env.json"
    base = {"PATH": os.environ.get("PATH", "/usr/bin"), "REDIS_URL": "redis://:secret@x/0", "KEEP": "1"}
    env = agent_environment(base, "t-9", "w9")
    result = run_agent([*FAKE, f"env={dump}"], env=env, timeout=10, kill_grace=0.5, output_limit=1000)
    assert result.exit_code == 0, result.stderr
    seen = json.loads(dump.read_text())
    assert seen["ACTIVATION_TASK_ID"] == "t-9" and seen["ACTIVATION_WORKER"] == "w9" and seen["KEEP"] == "1"
    assert "REDIS_URL" not in seen


def test_stdin_is_dev_null() -> None:
    result = run("stdin-check")
    assert result.stdout.splitlines()[0] == "stdin: empty"


# -- exit codes, output, resources ------------------------------------------------------------


def test_exit_code_output_and_resources_of_a_plain_run() -> None:
    result = run("hello exit=3")
    assert (result.exit_code, result.signal, result.timed_out, result.aborted) == (3, None, False, False)
    assert result.stdout == "done: hello exit=3\n" and result.stderr == ""
    assert result.stdout_bytes == len(result.stdout) and not result.truncated
    assert result.pid is not None and result.killed_pids == []
    assert result.cpu_seconds > 0 and result.rss_peak_bytes > 1024 * 1024
    assert 0 < result.duration_s < 10
    assert abs(result.started_at_wall - time.time()) < 10


def test_flood_on_both_streams_is_capped_without_deadlock() -> None:
    size = 20 * 1000 * 1000
    began = time.monotonic()
    result = run(f"flood={size} flood-err={size}", timeout=60, output_limit=1000)
    assert time.monotonic() - began < 30
    assert result.exit_code == 0, result.stderr[:200]
    assert result.stdout_bytes == size + len(f"done: flood={size} flood-err={size}\n")
    assert result.stderr_bytes == size
    assert len(result.stdout) == 1000 and len(result.stderr) == 1000
    assert result.truncated


def test_a_missing_binary_cannot_start_and_it_is_the_whole_workers_fault(tmp_path: Path) -> None:
    with pytest.raises(CannotStart) as caught:
        run_agent([str(tmp_path / "no-such-agent"), "x"], env={}, timeout=1, kill_grace=0.1, output_limit=100)
    assert caught.value.reason == "agent_not_found" and caught.value.whole_worker
    assert "no-such-agent" in caught.value.detail and "No such file" in caught.value.detail


def test_a_non_executable_binary_cannot_start(tmp_path: Path) -> None:
    script = tmp_path / "agent.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)
    with pytest.raises(CannotStart) as caught:
        run_agent([str(script)], env={}, timeout=1, kill_grace=0.1, output_limit=100)
    assert caught.value.reason == "agent_not_executable" and caught.value.whole_worker


def test_a_missing_workdir_is_named_as_the_workdir_not_the_agent(tmp_path: Path) -> None:
    gone = tmp_path / "gone"
    with pytest.raises(CannotStart) as caught:
        run_agent([*FAKE, "x"], env={}, timeout=1, kill_grace=0.1, output_limit=100, cwd=str(gone))
    assert caught.value.reason == "workdir_missing" and str(gone) in caught.value.detail


def test_stdin_data_reaches_the_agent_whole_then_eof() -> None:
    description = "stdin-proof " + "z" * (300 * 1024)  # past a pipe's 64 KiB and one argv word's 128 KiB
    result = run_agent(
        [*FAKE], env={}, timeout=30, kill_grace=0.5, output_limit=1024 * 1024, stdin_data=description.encode()
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == f"done: {description}\n"


# -- the whole tree ends with the task ----------------------------------------------------------


def test_timeout_interrupts_an_agent_that_handles_sigint() -> None:
    began = time.monotonic()
    result = run("sleep=30", timeout=0.3, kill_grace=5)
    assert result.timed_out and not result.aborted
    assert (result.exit_code, result.signal) == (-signal.SIGINT, "SIGINT")
    assert time.monotonic() - began < 3  # it went at SIGINT, long before the 5 s grace ended


def test_timeout_kills_a_signal_ignoring_agent_and_its_setsid_grandchild(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    began = time.monotonic()
    result = run(f"ignore-term ignore-int grandchild=60 pidfile={pidfile} sleep=60", timeout=1.0, kill_grace=0.5)
    elapsed = time.monotonic() - began
    pids = read_pids(pidfile)
    assert len(pids) == 2, "the agent wrote its pid and its grandchild's"
    assert result.timed_out
    assert (result.exit_code, result.signal) == (-signal.SIGKILL, "SIGKILL")
    assert set(pids) <= set(result.killed_pids)
    assert all(gone(pid) for pid in pids), [pid for pid in pids if not gone(pid)]
    assert 1.4 <= elapsed < 4  # timeout + grace, and not much more


def test_a_grandchild_left_behind_by_a_fast_agent_is_killed(subreaper: None, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    result = run(f"grandchild=60 pidfile={pidfile}", kill_grace=0.3)
    agent_pid, grandchild = read_pids(pidfile)
    assert result.exit_code == 0 and not result.timed_out
    assert grandchild in result.killed_pids and agent_pid not in result.killed_pids
    assert gone(grandchild)


def test_an_older_child_of_the_caller_is_not_taken_for_the_agents(subreaper: None, tmp_path: Path) -> None:
    # Both are children of this process when the run looks for leftovers; only the one born
    # after the agent's spawn is the agent's. Start times count in clock ticks (10 ms): one born
    # in the agent's own tick would count as the agent's, so the run waits for the next tick.
    older = subprocess.Popen(["sleep", "30"])
    try:
        wait_for(lambda: ticks_now() > int(start_ticks(older.pid) or ticks_now()), 5, 0.005, "the next clock tick")
        pidfile = tmp_path / "pids"
        result = run(f"grandchild=60 pidfile={pidfile}", kill_grace=0.3)
        _, grandchild = read_pids(pidfile)
        assert grandchild in result.killed_pids and gone(grandchild)
        assert older.pid not in result.killed_pids and older.poll() is None
    finally:
        older.kill()
        older.wait()


def test_a_run_leaves_no_zombie_child_behind(subreaper: None, tmp_path: Path) -> None:
    """The background subshell exits while the agent runs; when the agent exits, its zombie is
    re-parented to us (a subreaper), a child nobody else waits for. The run reaps it, so the
    executor's cheap "any zombie?" check (waitid WNOWAIT) finds none afterwards."""
    marker = tmp_path / "slept"
    script = f"(sleep 0.2; touch {marker}) & sleep 1; exit 0"
    result = run_agent(["sh", "-c", script], env=dict(os.environ), timeout=10, kill_grace=0.5, output_limit=1 << 16)
    assert result.exit_code == 0 and marker.exists()
    try:
        leftover = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        leftover = None
    assert leftover is None, f"a zombie child was left: pid {leftover.si_pid}"


def test_without_subreaper_a_leftover_holding_the_pipe_does_not_block_the_run(tmp_path: Path) -> None:
    # Not a subreaper: the orphan goes to PID 1, out of reach; the run must still end promptly.
    pidfile = tmp_path / "pids"
    began = time.monotonic()
    try:
        result = run(f"grandchild=30 pidfile={pidfile}", kill_grace=0.3)
        assert result.exit_code == 0
        assert result.stdout.startswith("done: ")
        assert time.monotonic() - began < 5
    finally:
        for pid in read_pids(pidfile)[1:]:
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
                wait_for(lambda pid=pid: gone(pid), 5, what=f"grandchild {pid} to die")


def test_should_abort_stops_the_run_as_aborted(tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    stop_at = time.monotonic() + 0.3
    began = time.monotonic()
    result = run_agent(
        [*FAKE, f"ignore-int pidfile={pidfile} sleep=30"],
        env=dict(os.environ),
        timeout=60,
        kill_grace=0.3,
        output_limit=1000,
        should_abort=lambda: time.monotonic() >= stop_at,
    )
    assert result.aborted and not result.timed_out
    assert result.exit_code == -signal.SIGKILL
    assert time.monotonic() - began < 3
    assert all(gone(pid) for pid in read_pids(pidfile))


def test_without_pidfd_the_exit_is_noticed_by_polling(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "pidfd_open")
    assert run("exit=4").exit_code == 4
    result = run("sleep=30", timeout=0.3, kill_grace=0.3)
    assert result.timed_out and result.exit_code == -signal.SIGINT
