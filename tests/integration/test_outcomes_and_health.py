"""Outcomes and health at the boundary: a real worker tree under supervisord, `activation check` and
`status` run as subprocesses, the spool's files.

Issue 10: a task the OS cannot start gets an outcome (class 2), a finished run is never thrown
away (class 4), health tells the truth (class 5), the drain fits supervisord's stop (class 9).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from pathlib import Path

from activation.spool import outcome as outcomes
from activation.worker import spawn as spawning
from tests.conftest import FAKE_AGENT, wait_for
from tests.harness import WORKER_CONF, WorkerTree, listener_rescans

INTERVAL = 1.0  # the heartbeat interval of these trees; "within two intervals" is measured against it


def check(tree: WorkerTree) -> tuple[int, str]:
    done = tree.cli("check", tree.worker)
    return done.returncode, done.stdout + done.stderr


def wait_unhealthy(tree: WorkerTree, cause: str, timeout: float = 20) -> str:
    """Wait until `activation check` exits 1 naming ``cause``; return what it said."""

    def named() -> str | None:
        code, said = check(tree)
        return said if code == 1 and cause in said else None

    return str(wait_for(named, timeout, 0.1, lambda: f"check to name {cause!r}; it says {check(tree)[1]!r}"))


def wait_healthy(tree: WorkerTree, timeout: float = 20) -> None:
    wait_for(lambda: check(tree)[0] == 0, timeout, 0.1, lambda: f"a healthy check; it says {check(tree)[1]!r}")


def runs_of(record: Path) -> int:
    return len(record.read_text().splitlines()) if record.exists() else 0


def shell_agent(path: Path) -> Path:
    """A tiny, fast agent script (created late, to show a fix taking effect without a restart)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('#!/bin/sh\necho "done: $*"\n')
    path.chmod(0o755)
    return path


# -- class 2: a task the OS cannot start gets an outcome --------------------------------------------


def test_a_description_longer_than_one_argv_word_reaches_the_agent_on_stdin(make_tree) -> None:
    tree: WorkerTree = make_tree(ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
    description = "from-stdin " + "w" * (spawning.MAX_ARG_STRLEN + 1000)
    tree.write_task("huge-1", description)
    result = tree.wait_result("huge-1")
    assert result["status"] == "completed", result["stderr"][:500]
    assert result["stdout"] == f"done: {description}\n"


def test_a_description_the_template_cannot_carry_is_dead_lettered_with_a_reason(make_tree) -> None:
    agent = f"{sys.executable} {FAKE_AGENT} -p prompt={{description}}"
    tree: WorkerTree = make_tree(agent=agent, ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
    tree.write_task("huge-2", "x" * (spawning.MAX_ARG_STRLEN + 1))
    record = wait_for(lambda: tree.dead_letter("huge-2"), 20, 0.1, "the dead letter of huge-2")
    assert record["reason"] == "argv_too_long" and "{description}" in record["detail"]
    tree.write_task("short-after", "fine")  # only that task could not start: the worker is healthy
    assert tree.wait_result("short-after")["status"] == "completed"
    wait_healthy(tree)


def test_a_missing_agent_binary_keeps_300_tasks_waiting_while_check_says_why(make_tree, tmp_path: Path) -> None:
    agent = tmp_path / "bin" / "agent"
    tree: WorkerTree = make_tree(agent=f"{agent} -p -- {{description}}", ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
    said = wait_unhealthy(tree, "executor degraded")  # before any task: the preflight sees it
    assert str(agent) in said and "does not exist" in said
    ids = [f"backlog-{i:03d}" for i in range(300)]
    for task_id in ids:
        tree.write_task(task_id, "x")
    rescans = listener_rescans(tree)
    wait_for(lambda: listener_rescans(tree) >= rescans + 3, 30, 0.1, "three rescans that queue the backlog again")
    assert tree.result_ids() == [], "not one task burnt into failed"
    assert not list(tree.spool.dead_letters())
    assert tree.spool.count_inbox("w1") == 300
    assert tree.states()["executor"] == "RUNNING", "degraded, not crash-looping"
    code, said = check(tree)
    assert code == 1 and "executor degraded" in said

    shell_agent(agent)  # the operator installs the agent: everything runs, nothing twice
    wait_for(lambda: len(tree.result_ids()) == 300, 120, 0.2, "300 results")
    assert tree.result_ids() == ids
    assert {tree.result(i)["attempts"] for i in ids} == {1}  # type: ignore[index]
    wait_healthy(tree)


def test_an_agent_that_fails_every_task_at_once_backs_off_and_check_says_why(make_tree) -> None:
    tree: WorkerTree = make_tree(agent="false -- {description}", ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
    for i in range(300):
        tree.write_task(f"doomed-{i:03d}", "x")
    said = wait_unhealthy(tree, "executor degraded: the agent failed")
    assert "in a row" in said and "exit 1" in said
    assert len(tree.result_ids()) <= 20, "the backlog is not burnt into failed"
    assert tree.spool.count_inbox("w1") >= 280
    assert tree.states()["executor"] == "RUNNING"


def test_a_workdir_that_is_gone_degrades_the_worker_and_the_task_waits(make_tree, tmp_path: Path) -> None:
    workdir = tmp_path / "workdir"
    tree: WorkerTree = make_tree(ACTIVATION_AGENT_WORKDIR=str(workdir), ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
    said = wait_unhealthy(tree, "executor degraded")
    assert str(workdir) in said and "not a folder" in said
    tree.write_task("in-workdir", "x")
    assert tree.states()["executor"] == "RUNNING"
    workdir.mkdir()
    assert tree.wait_result("in-workdir")["status"] == "completed"
    wait_healthy(tree)


# -- class 4: a finished run is never thrown away -----------------------------------------------------


def test_a_results_path_that_is_not_a_folder_keeps_the_outcome_and_never_reruns_the_agent(
    make_tree, tmp_path: Path
) -> None:
    tree: WorkerTree = make_tree(ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
    results = tree.spool.results("w1")
    results.rmdir()
    results.write_text("not a folder")
    record = tmp_path / "runs"
    tree.write_task("kept-1", f"record={record}")
    said = wait_unhealthy(tree, "cannot write the result of kept-1")
    assert "saved beside its claim" in said
    saved = wait_for(lambda: outcomes.load_outcome(tree.spool, "w1", "kept-1"), 10, 0.1, "the saved outcome")
    assert saved["status"] == "completed" and saved["attempts"] == 1
    rescans = listener_rescans(tree)
    wait_for(lambda: listener_rescans(tree) >= rescans + 3, 30, 0.1, "three rescans")
    assert runs_of(record) == 1, "the agent ran once, however many rescans passed"
    assert tree.spool.claim_path("w1", "kept-1").exists()

    # The executor dies with the write still owed: its successor writes, it does not run again.
    old = tree.kill("executor")
    tree.wait_restarted("executor", old)
    wait_unhealthy(tree, "cannot write the result of kept-1")
    results.unlink()
    results.mkdir()
    result = tree.wait_result("kept-1")
    assert result == saved
    assert runs_of(record) == 1 and result["attempts"] == 1
    # The result lands first, then the claim goes: wait for the second step, not race it.
    claim = tree.spool.claim_path("w1", "kept-1")
    wait_for(lambda: not claim.exists(), 10, 0.05, "the claim removed after the result")
    assert outcomes.saved_outcomes(tree.spool, "w1") == []
    wait_healthy(tree)


# -- class 5: health tells the truth ---------------------------------------------------------------


def test_check_names_a_sigstopped_executor_and_recovers_when_it_continues(make_tree) -> None:
    tree: WorkerTree = make_tree(ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
    wait_healthy(tree)
    pid = tree.pid("executor")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_unhealthy(tree, "executor wedged", timeout=2 * INTERVAL + 10)
        assert tree.states()["executor"] == "RUNNING", "supervisord cannot see a wedge: only the beat can"
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_healthy(tree)


def test_check_names_a_sigstopped_executor_while_its_agent_runs(make_tree) -> None:
    tree: WorkerTree = make_tree(ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
    tree.write_task("long-runner", "sleep=8")
    wait_for(lambda: tree.spool.claim_path("w1", "long-runner").exists(), 10, what="the claim")
    wait_healthy(tree, 6)  # an agent that runs is progress: the executor beats from its supervision loop
    assert tree.spool.claim_path("w1", "long-runner").exists()
    pid = tree.pid("executor")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_unhealthy(tree, "executor wedged")
    finally:
        os.kill(pid, signal.SIGCONT)
    assert tree.wait_result("long-runner")["status"] in ("completed", "timeout")
    wait_healthy(tree)


def test_check_names_a_metrics_port_that_is_taken_and_the_heartbeat_keeps_beating(make_tree) -> None:
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tree: WorkerTree = make_tree(ACTIVATION_METRICS_PORT=str(port), ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
        said = wait_unhealthy(tree, f"cannot serve metrics on :{port}")
        assert "heartbeat" in said
        assert tree.states()["heartbeat"] == "RUNNING", "a taken port is a problem to report, not a crash loop"
        tree.write_task("while-taken", "x")
        assert tree.wait_result("while-taken")["status"] == "completed"
    wait_healthy(tree)  # the port is free again: the heartbeat binds it on its next try


def test_check_names_a_dead_letter_folder_that_is_a_file(make_tree) -> None:
    tree: WorkerTree = make_tree(ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
    wait_healthy(tree)
    tree.spool.dead_letter_dir.rmdir()
    tree.spool.dead_letter_dir.write_text("")
    said = wait_unhealthy(tree, "spool layout broken: tasks/.dead_letter is not a folder")
    assert "unhealthy" in said
    tree.write_task("good-while-broken", "x")
    assert tree.wait_result("good-while-broken")["status"] == "completed"
    assert tree.states() == {p: "RUNNING" for p in ("listener", "executor", "heartbeat")}


def test_status_exits_non_zero_when_a_worker_it_shows_is_unhealthy(make_tree) -> None:
    tree: WorkerTree = make_tree(ACTIVATION_HEARTBEAT_INTERVAL=str(INTERVAL))
    wait_for(lambda: tree.cli("status").returncode == 0, 20, 0.1, "a healthy status")
    tree.ctl("stop", "listener")

    def stopped_shown() -> dict | None:
        shown = tree.cli("status", "--json")
        (worker,) = json.loads(shown.stdout)
        return worker if "listener STOPPED" in worker["problems"] and shown.returncode == 1 else None

    worker = wait_for(stopped_shown, 20, 0.1, "status --json to show the stopped listener and exit 1")
    assert worker["healthy"] is False
    text = tree.cli("status")
    assert text.returncode == 1 and "SICK" in text.stdout


# -- class 9: margins ------------------------------------------------------------------------------


def test_the_executor_refuses_a_drain_that_does_not_fit_its_real_stopwaitsecs(make_tree, tmp_path: Path) -> None:
    conf = tmp_path / "worker.conf"
    conf.write_text(WORKER_CONF.read_text().replace("stopwaitsecs=55", "stopwaitsecs=10"))
    tree: WorkerTree = make_tree(start=False, ACTIVATION_DRAIN_TIMEOUT="8")
    tree.conf = conf
    tree.programs = ("listener", "heartbeat")
    tree.start()
    refusal = "ACTIVATION_DRAIN_TIMEOUT: 8 s plus ACTIVATION_KILL_GRACE 1 s plus a 5 s margin"
    wait_for(lambda: refusal in tree.log_tail(400), 30, 0.2, lambda: f"the refusal; log:\n{tree.log_tail()}")
    line = next(line for line in tree.log_tail(400).splitlines() if refusal in line)
    assert "stopwaitsecs (10 s, from supervisord's [program:executor])" in line
    assert "Traceback" not in tree.log_tail(400)


def test_a_drain_that_does_not_fit_is_refused_by_every_command_in_one_line(make_tree) -> None:
    tree: WorkerTree = make_tree(start=False)
    tree.env["ACTIVATION_DRAIN_TIMEOUT"] = "50"  # the old default: 50 + 5 = 55 raced the SIGKILL
    refused = tree.cli("status")
    assert refused.returncode == 2
    assert refused.stderr.count("\n") == 1 and "ACTIVATION_DRAIN_TIMEOUT" in refused.stderr, refused.stderr
