"""`activation cancel` of a running task and `activation logs -f`, against a real worker tree
(supervisord, listener, executor, heartbeat) through the subprocess CLI, and the cancel over HTTP
against a real orchestrator tree."""

from __future__ import annotations

import json
import os
import subprocess
import urllib.request
from pathlib import Path

import psutil

from tests.harness import BIN, fake_agent_command, new_orchestrator, wait_until
from tests.integration.conftest import WorkerTree
from tests.integration.test_security import api_answers


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def running_tree(tree: WorkerTree, task_id: str, pidfile: Path) -> list[int]:
    """Wait until the agent and its setsid grandchild are both up; their pids."""
    wait_until(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 2, 20, 0.05, "agent and grandchild")
    assert tree.spool.claim_path(tree.worker, task_id).exists()
    return [int(p) for p in pidfile.read_text().split()]


def test_cancel_kills_a_running_tasks_whole_tree_and_its_result_is_cancelled(make_tree, tmp_path):
    tree: WorkerTree = make_tree()
    pidfile = tmp_path / "pids"
    tree.write_task("runaway", f"ignore-int grandchild=120 pidfile={pidfile} sleep=120")
    pids = running_tree(tree, "runaway", pidfile)
    out = tree.cli("cancel", "runaway")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "runaway: cancelled (was running on w1; SIGINT, then SIGKILL after the 1 s grace)"
    assert [pid for pid in pids if alive(pid)] == [], "a process of the cancelled tree survived"
    result = tree.result("runaway")
    assert result is not None and result["status"] == "cancelled" and result["cancelled"]["by"] == "cli"
    shown = tree.cli("show", "runaway").stdout
    assert "cancelled while running by cli" in shown and "SIGINT, then SIGKILL after the 1 s grace" in shown
    # The executor goes on: the next task runs, and no request is left behind.
    tree.write_task("after", "x")
    assert tree.wait_result("after")["status"] == "completed"
    assert not list(tree.spool.processing("w1").glob("*.cancel"))
    assert tree.states() == {"listener": "RUNNING", "executor": "RUNNING", "heartbeat": "RUNNING"}


def test_cancel_a_running_task_over_the_api(make_tree, tmp_path):
    tree: WorkerTree = make_tree()
    orchestrator = new_orchestrator(tmp_path).start()
    try:
        pidfile = tmp_path / "pids"
        tree.write_task("api-runaway", f"grandchild=120 pidfile={pidfile} sleep=120")
        pids = running_tree(tree, "api-runaway", pidfile)
        url = f"http://{orchestrator.env['ACTIVATION_ADMIN_BIND']}"
        # RUNNING (startsecs=1) comes before the API listens on a loaded machine: wait for it.
        wait_until(lambda: api_answers(f"{url}/config"), 20, 0.1, "the admin API to listen")
        request = urllib.request.Request(f"{url}/tasks/api-runaway/cancel", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
            body = json.loads(response.read())
        assert body["status"] == "cancelling" and body["while"] == "running" and body["worker"] == "w1"

        def finished() -> dict | None:
            with urllib.request.urlopen(f"{url}/tasks/api-runaway", timeout=10) as response:
                answer = json.loads(response.read())
            return answer if answer["state"] == "done" else None

        answer = wait_until(finished, 20, 0.1, "the cancelled result over the API")
        assert answer["result"]["status"] == "cancelled" and answer["result"]["cancelled"]["by"] == "api"
        wait_until(lambda: not any(alive(pid) for pid in pids), 5, 0.05, "the tree to be gone")
    finally:
        orchestrator.kill_everything()


def test_logs_follow_renders_a_running_stream_json_agent_to_its_end(make_tree, tmp_path):
    tree: WorkerTree = make_tree(start=False, agent=fake_agent_command("--output-format", "stream-json", "--verbose"))
    gate = tmp_path / "go-on"
    tree.write_task("talker", f"stream=3 gap=0.05 gate={gate}")
    # Started before the worker is even up: the task is still pending, the agent has printed nothing.
    follower = subprocess.Popen(
        [str(BIN / "activation"), "logs", "-f", "talker", "--interval", "0.05"],
        env=tree.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        tree.start()
        assert follower.stdout is not None
        seen: list[str] = []
        while not any(line.startswith("→ Bash") for line in seen):
            line = follower.stdout.readline()
            assert line, f"the follower ended early: {seen} {follower.stderr.read() if follower.stderr else ''}"
            seen.append(line.rstrip("\n"))
        # The agent waits at its gate: what we saw came while it was running.
        assert tree.result("talker") is None and tree.spool.claim_path("w1", "talker").exists()
        assert seen[0].startswith("── session fake-session · model fake-model")
        assert seen[1:] == ["Turn 1: let me look.", '→ Bash {"command": "echo turn 1"}']
        gate.touch()
        rest, errors = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait(10)
    assert follower.returncode == 0, errors
    lines = rest.splitlines()
    assert lines[0] == "← turn 1" and lines[-2] == "done: stream=3 gap=0.05 gate=" + str(gate)
    assert lines[-1].startswith("── done (success)") and "$0.0369" in lines[-1] and "tokens in 300, out 60" in lines[-1]
    assert errors.strip().splitlines()[-1] == "── talker: completed"
    result = tree.wait_result("talker")
    assert result["agent"]["type"] == "result" and result["status"] == "completed"
    # After the run, `logs` prints the same from the log kept beside the result.
    again = tree.cli("logs", "talker")
    assert again.returncode == 0 and again.stdout.splitlines() == seen + lines


def test_dispatch_wait_shows_the_task_move_from_state_to_state(make_tree, tmp_path):
    tree: WorkerTree = make_tree()
    gate = tmp_path / "finish"
    waiter = subprocess.Popen(
        [str(BIN / "activation"), "dispatch", "w1", f"gate={gate}", "--task-id", "moving-1", "--wait"],
        env=tree.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiter.stderr is not None
        progress: list[str] = []
        while not any(": running" in line for line in progress):
            line = waiter.stderr.readline()
            assert line, f"dispatch --wait ended early: {progress}"
            progress.append(line.rstrip("\n"))
        assert tree.result("moving-1") is None  # the agent waits at its gate
        gate.touch()
        out, rest = waiter.communicate(timeout=30)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait(10)
    progress += rest.splitlines()
    assert waiter.returncode == 0 and out.startswith("moving-1: completed"), (out, progress)
    assert all(line.startswith("moving-1: ") for line in progress), progress
    states = [line.removeprefix("moving-1: ").split()[0] for line in progress]
    assert states[-2:] == ["running", "finished"] and set(states) <= {"queued", "running", "finished"}, progress
    assert " s running (" in progress[-1] and progress[-1].endswith(" s in all)")


def test_logs_worker_follow_prints_what_up_appends_to_var_log(tmp_path):
    from activation.spool.layout import Spool

    spool = Spool(tmp_path / "var" / "spool")
    spool.init(["marie"])
    log = tmp_path / "var" / "log" / "marie.log"
    log.parent.mkdir()
    log.write_text("INFO listener started\n")
    follower = subprocess.Popen(
        [str(BIN / "activation"), "logs", "--worker", "marie", "-f", "--interval", "0.05"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("ACTIVATION_")},
    )
    try:
        assert follower.stdout is not None
        assert follower.stdout.readline() == "INFO listener started\n"
        with open(log, "a") as handle:
            handle.write("WARNING task fix-42 failed (exit 1, 0.2s)\n")
        assert follower.stdout.readline() == "WARNING task fix-42 failed (exit 1, 0.2s)\n"
    finally:
        follower.terminate()
        follower.wait(10)
