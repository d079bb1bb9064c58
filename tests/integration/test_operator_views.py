"""The operator's views against a real worker tree (supervisord, listener, executor, heartbeat):
``tasks`` and ``status`` are live from the spool, and a dead letter fixed by ``dlq retry`` runs
under its own id."""

from __future__ import annotations

import json

from tests.conftest import wait_for
from tests.integration.conftest import WorkerTree


def test_a_running_task_shows_elapsed_time_and_attempt_live(make_tree):
    tree: WorkerTree = make_tree()
    tree.write_task("long-1", "sleep=30")
    tree.write_task("next-1", "x")

    def running() -> dict | None:
        rows = json.loads(tree.cli("tasks", "--json").stdout or "[]")
        return next((r for r in rows if r["task_id"] == "long-1" and r["state"] == "running"), None)

    row = wait_for(running, 20, 0.1, "long-1 running")
    assert row["attempt"] == 1 and row["worker"] == "w1" and row["elapsed_s"] >= 0
    rows = json.loads(tree.cli("tasks", "--state", "pending", "--json").stdout)
    assert [r["task_id"] for r in rows] == ["next-1"]
    plain = tree.cli("tasks").stdout
    assert "long-1" in plain and "running" in plain and "next-1" in plain
    all_running = {"listener": "RUNNING", "executor": "RUNNING", "heartbeat": "RUNNING"}

    def status_all_running() -> dict | None:
        # The heartbeat's first beats saw the programs STARTING (startsecs): wait for its next one.
        (status,) = json.loads(tree.cli("status", "w1", "--json").stdout)
        return status if status["programs"] == all_running else None

    status = wait_for(status_all_running, 20, 0.1, "the heartbeat to show every program RUNNING")
    assert status["current_task"] == "long-1" and status["queue_size"] == 1


def test_tasks_state_failed_since_1h_on_a_real_tree(make_tree):
    tree: WorkerTree = make_tree()
    tree.write_task("fails-1", "exit=3")
    tree.write_task("works-1", "x")
    tree.wait_result("fails-1")
    tree.wait_result("works-1")
    out = tree.cli("tasks", "--state", "failed", "--since", "1h")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("TASK") and len(lines) == 2 and lines[1].split()[:3] == ["fails-1", "w1", "failed"]
    status = tree.cli("status").stdout
    assert "none yet" not in status and "results: 2" in status and "failed=1" in status and "done=1" in status


def test_dlq_retry_with_a_fix_runs_under_the_same_id(make_tree):
    tree: WorkerTree = make_tree()
    tree.write_task("too-long", "x", timeout=10**7)  # over the worker's maximum: dead-lettered
    record = wait_for(lambda: tree.dead_letter("too-long"), 20, 0.1, "dead letter too-long")
    assert record["reason"] == "invalid_field"
    listed = tree.cli("dlq", "list").stdout.splitlines()
    assert listed[0].startswith("ID") and listed[1].startswith("too-long")
    fixed = tree.cli("dlq", "retry", "too-long", "--timeout", "20", "--meta", "fixed=yes")
    assert fixed.returncode == 0, fixed.stderr
    result = tree.wait_result("too-long")
    assert result["status"] == "completed" and result["metadata"] == {"fixed": "yes"}
    shown = json.loads(tree.cli("show", "too-long", "--json").stdout)
    assert shown["state"] == "done" and shown["record"]["task_id"] == "too-long"


def test_a_cancelled_pending_task_never_runs(make_tree):
    tree: WorkerTree = make_tree()
    tree.write_task("busy-1", "sleep=3")
    wait_for(lambda: tree.spool.claim_path("w1", "busy-1").exists(), 20, 0.05, "busy-1 claimed")
    tree.write_task("queued-1", "x")
    out = tree.cli("cancel", "queued-1")
    assert out.returncode == 0, out.stderr
    tree.wait_result("busy-1")
    tree.write_task("after-1", "x")  # the executor has gone past the queue entry of queued-1
    tree.wait_result("after-1")
    result = tree.result("queued-1")
    assert result is not None and result["status"] == "cancelled" and result["stdout"] == ""


def test_a_taken_metrics_port_is_one_line_and_the_worker_runs_on(make_tree):
    import socket

    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        tree: WorkerTree = make_tree(ACTIVATION_METRICS_PORT=str(port))
        tree.write_task("still-works", "x")
        assert tree.wait_result("still-works")["status"] == "completed"
        log = wait_for(
            lambda: (text := tree.log.read_text(errors="replace")) and "cannot serve metrics" in text and text,
            20,
            0.1,
            "the metrics line",
        )
        assert tree.states()["heartbeat"] == "RUNNING"
    lines = [line for line in log.splitlines() if "cannot serve metrics" in line]
    assert len(lines) == 1 and f":{port}" in lines[0] and "ACTIVATION_METRICS_PORT" in lines[0]
    assert "Traceback" not in log
