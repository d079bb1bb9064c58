"""A real worker tree under supervisord: tasks in, results out, whatever dies on the way."""

from __future__ import annotations

import json
import os
import time
import urllib.request
from pathlib import Path

import psutil
from click.testing import CliRunner

from activation.cli import main
from tests.conftest import wait_for
from tests.harness import PROGRAMS, WorkerTree


def test_supervisorctl_shows_every_program_running(make_tree):
    tree: WorkerTree = make_tree()
    assert tree.states() == {p: "RUNNING" for p in PROGRAMS}
    out = tree.ctl("status").stdout
    assert out.count("RUNNING") == 3, out


def test_supervisord_maps_no_openssl_and_still_answers_supervisorctl(make_tree):
    tree: WorkerTree = make_tree()
    assert tree.process is not None
    maps = Path(f"/proc/{tree.process.pid}/maps").read_text()
    assert "python" in maps  # the maps of the right process: supervisord runs in the interpreter
    assert "libcrypto" not in maps and "libssl" not in maps  # 4.6 MB of its memory
    assert tree.ctl("status").stdout.count("RUNNING") == 3


def test_dispatch_wait_through_the_cli_subprocess(make_tree):
    tree: WorkerTree = make_tree()
    done = tree.cli("dispatch", "w1", "hello world", "--meta", "team=infra", "--wait", "--wait-timeout", "30", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["status"] == "completed"
    assert result["stdout"].strip() == "done: hello world"
    assert result["metadata"] == {"team": "infra"}
    assert result["attempts"] == 1
    assert result["activation_latency_ms"] >= 0
    for field in ("started_at", "finished_at", "duration_s", "truncated", "resources", "exit_code", "stderr", "worker"):
        assert field in result


def test_dispatch_and_show_with_clirunner(make_tree, monkeypatch):
    tree: WorkerTree = make_tree()
    monkeypatch.setenv("ACTIVATION_SPOOL", str(tree.spool.root))
    runner = CliRunner()
    sent = runner.invoke(main, ["dispatch", "w1", "exit=3", "--task-id", "failing-1", "--wait", "--wait-timeout", "30"])
    assert sent.exit_code == 1, sent.output
    assert "failing-1: failed (exit 3" in sent.output
    shown = runner.invoke(main, ["show", "failing-1", "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)["record"]["status"] == "failed"
    missing = runner.invoke(main, ["show", "nope"])
    assert missing.exit_code == 1 and "no task 'nope'" in missing.output


def test_plain_and_atomic_writes_are_both_picked_up(make_tree):
    tree: WorkerTree = make_tree()
    tree.write_task("atomic-1", "a", atomic=True)
    tree.write_task("plain-1", "b", atomic=False)
    assert tree.wait_result("atomic-1")["status"] == "completed"
    assert tree.wait_result("plain-1")["status"] == "completed"


def test_burst_of_2000_tasks_gives_exactly_2000_results(make_tree):
    tree: WorkerTree = make_tree(agent="true -- {description}")
    ids = [f"burst-{i:05d}" for i in range(2000)]
    for task_id in ids:
        tree.write_task(task_id, "x")
    wait_for(lambda: len(tree.result_ids()) >= 2000, 120, 0.2, "2000 results")
    time.sleep(0.5)  # anything extra would show up now
    assert tree.result_ids() == ids
    assert not list(tree.spool.processing("w1").iterdir())
    assert tree.spool.count_inbox("w1") == 0


def test_executor_sigkilled_mid_task_gives_one_result_with_attempts_2(make_tree):
    tree: WorkerTree = make_tree()
    tree.write_task("crash-1", "sleep=2")
    wait_for(lambda: tree.spool.claim_path("w1", "crash-1").exists(), 10, what="claim")
    old = tree.kill("executor")
    tree.wait_restarted("executor", old)
    result = tree.wait_result("crash-1", 30)
    assert result["status"] == "completed"
    assert result["attempts"] == 2
    assert tree.result_ids() == ["crash-1"]


def test_listener_sigkilled_with_100_pending_does_them_all(make_tree):
    tree: WorkerTree = make_tree()
    tree.write_task("slow-0", "sleep=1")
    wait_for(lambda: tree.spool.claim_path("w1", "slow-0").exists(), 10, what="first claim")
    ids = [f"pending-{i:03d}" for i in range(100)]
    for task_id in ids:
        tree.write_task(task_id, "x")
    old = tree.kill("listener")
    tree.wait_restarted("listener", old)
    wait_for(lambda: len(tree.result_ids()) >= 101, 90, 0.2, "101 results")
    assert tree.result_ids() == sorted([*ids, "slow-0"])


def test_task_that_kills_its_executor_every_time_ends_in_the_dead_letter(make_tree, tmp_path: Path):
    tree: WorkerTree = make_tree(ACTIVATION_MAX_ATTEMPTS="3")
    runs = tmp_path / "runs"
    tree.write_task("killer-1", f"record={runs} kill-parent")
    record = wait_for(lambda: tree.dead_letter("killer-1"), 60, 0.1, "dead letter of killer-1")
    assert record["reason"] == "max_attempts"
    assert len(runs.read_text().splitlines()) == 3
    assert tree.result("killer-1") is None
    tree.wait_running()


def test_timeout_kills_the_agent_and_its_setsid_grandchild(make_tree, tmp_path: Path):
    tree: WorkerTree = make_tree()
    pidfile = tmp_path / "pids"
    tree.write_task("slowpoke", f"ignore-term ignore-int grandchild=60 pidfile={pidfile} sleep=60", timeout=1)
    result = tree.wait_result("slowpoke", 30)
    assert result["status"] == "timeout"
    pids = [int(line) for line in pidfile.read_text().split()]
    assert len(pids) == 2
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


def test_sigterm_to_supervisord_drains_the_running_task(make_tree):
    tree: WorkerTree = make_tree()
    tree.write_task("draining", "sleep=3")
    wait_for(lambda: tree.spool.claim_path("w1", "draining").exists(), 10, what="claim")
    tree.write_task("later-1", "x")
    tree.write_task("later-2", "x")
    began = time.monotonic()
    assert tree.stop(timeout=30) == 0
    assert time.monotonic() - began < 15
    assert tree.result("draining")["status"] == "completed"
    pending = sorted(p.name for p in tree.spool.inbox("w1").glob("*.json"))
    assert pending == ["later-1.json", "later-2.json"]


def test_bad_inputs_go_to_the_dead_letter_and_the_listener_lives_on(make_tree):
    tree: WorkerTree = make_tree()
    listener = tree.pid("listener")
    inbox = tree.spool.inbox("w1")
    (inbox / "corrupt.json").write_text('{"task_id": "corrupt", "descr')
    (inbox / "missing.json").write_text(json.dumps({"task_id": "missing"}))
    (inbox / "typed.json").write_text(json.dumps({"task_id": "typed", "description": 42}))
    (inbox / "mismatch.json").write_text(json.dumps({"task_id": "other", "description": "x"}))
    (inbox / "big.json").write_bytes(b'{"task_id": "big", "description": "' + b"x" * (2 * 1024 * 1024) + b'"}')
    (inbox / "latin.json").write_bytes('{"task_id": "latin", "description": "caf\u00e9"}'.encode("latin-1"))
    (inbox / "folder.json").mkdir()
    target = tree.spool.root / "elsewhere.json"
    target.write_text(json.dumps({"task_id": "link", "description": "x"}))
    os.symlink(target, inbox / "link.json")
    expected = {
        "corrupt": "invalid_json",
        "missing": "missing_field",
        "typed": "invalid_field",
        "mismatch": "id_mismatch",
        "big": "too_large",
        "latin": "not_utf8",
        "folder": "not_a_file",
        "link": "symlink",
    }
    for key, reason in expected.items():
        record = wait_for(lambda key=key: tree.dead_letter(key), 20, 0.1, f"dead letter {key}")
        assert record["reason"] == reason, (key, record)
    assert target.exists()  # a symlink's target is never touched
    tree.write_task("good-after-bad", "x")
    assert tree.wait_result("good-after-bad")["status"] == "completed"
    assert tree.pid("listener") == listener
    assert tree.states()["listener"] == "RUNNING"


def test_heartbeat_status_check_and_metrics(make_tree):
    tree: WorkerTree = make_tree()
    tree.write_task("beat-1", "x")
    tree.wait_result("beat-1")

    def beat() -> dict | None:
        try:
            data = json.loads(tree.spool.heartbeat_path("w1").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return data if data.get("counts", {}).get("completed") == 1 and data.get("programs") else None

    data = wait_for(beat, 15, 0.1, "a heartbeat that counts the result")
    assert data["programs"] == {p: "RUNNING" for p in PROGRAMS}
    assert data["listener"]["observer_alive"] is True
    assert data["wake_sources"] == ["inotify"]
    for field in ("worker", "host", "pid", "timestamp", "current_task", "queue_size", "version"):
        assert field in data

    status = tree.cli("status", "--json")
    assert status.returncode == 0, status.stderr
    (worker,) = json.loads(status.stdout)
    assert worker["worker"] == "w1" and worker["healthy"] is True
    check = tree.cli("check", "w1")
    assert check.returncode == 0, check.stderr

    port = tree.env["ACTIVATION_METRICS_PORT"]
    body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    assert 'tasks_completed_total{status="completed",worker="w1"} 1.0' in body
    assert "activation_latency_seconds_bucket" in body

    tree.ctl("stop", "listener")
    # STOPPING first, then STOPPED: wait for the one that says it is down.
    wait_for(
        lambda: (done := tree.cli("check", "w1")).returncode == 1 and "listener STOPPED" in done.stderr,
        15,
        0.2,
        "check to fail with the listener stopped",
    )
    tree.ctl("start", "listener")


def test_no_program_leaves_a_process_behind_after_stop(make_tree):
    tree: WorkerTree = make_tree()
    assert tree.process is not None
    descendants = psutil.Process(tree.process.pid).children(recursive=True)
    assert len(descendants) >= 3
    assert tree.stop(timeout=30) == 0
    _gone, alive = psutil.wait_procs(descendants, timeout=5)
    assert not alive
    assert not tree.run_dir.joinpath("queue.sock").exists()


def test_sigterm_kills_a_task_past_the_drain_and_puts_it_back(make_tree):
    tree: WorkerTree = make_tree(ACTIVATION_DRAIN_TIMEOUT="1")
    tree.write_task("too-long", "sleep=30")
    wait_for(lambda: tree.spool.claim_path("w1", "too-long").exists(), 10, what="claim")
    began = time.monotonic()
    assert tree.stop(timeout=30) == 0
    assert time.monotonic() - began < 10
    assert tree.result("too-long") is None
    assert tree.spool.task_path("w1", "too-long").exists()
    assert not tree.spool.claim_path("w1", "too-long").exists()


def test_a_restarted_executor_kills_the_agent_its_predecessor_left_running(make_tree, tmp_path: Path):
    tree: WorkerTree = make_tree()
    pidfile = tmp_path / "pids"
    tree.write_task("orphan-maker", f"pidfile={pidfile} grandchild=60 sleep=60")
    first = wait_for(lambda: pidfile.exists() and len(pidfile.read_text().split()) >= 2 and pidfile.read_text(), 15)
    old_pids = [int(p) for p in first.split()]
    old = tree.kill("executor")
    tree.wait_restarted("executor", old)
    wait_for(lambda: not any(psutil.pid_exists(p) for p in old_pids), 15, 0.1, "the old agent tree to die")


def test_a_starting_tree_is_reported_healthy_soon_not_an_interval_later(make_tree):
    tree: WorkerTree = make_tree(ACTIVATION_HEARTBEAT_INTERVAL="30")
    # The first beat saw its siblings STARTING; the next one must not wait 30 s to say RUNNING.
    wait_for(lambda: tree.cli("check", "w1").returncode == 0, 6, 0.2, "check to pass after start")


def test_an_inbox_removed_under_a_running_listener_is_made_again_and_watched_again(make_tree):
    """An operator's rm -rf of the inbox ends the inotify watch with it: the listener says so, makes
    the inbox again, restarts the watch, and a task written after that is woken by inotify, not
    found a rescan later."""
    import shutil

    tree: WorkerTree = make_tree()
    tree.write_task("before", "x")
    assert tree.wait_result("before")["status"] == "completed"
    shutil.rmtree(tree.spool.inbox(tree.worker))
    wait_for(
        lambda: "wake source inotify died; restarting it" in tree.log_text(),
        20,
        0.05,
        "the listener to see the watch end",
    )
    wait_for(lambda: tree.log_text().count("wake source inotify started") >= 2, 20, 0.05, "the watch restarted")
    assert tree.spool.inbox(tree.worker).is_dir()
    tree.write_task("after", "x")
    result = tree.wait_result("after")
    assert (result["status"], result["source"]) == ("completed", "inotify")
    assert tree.states() == {p: "RUNNING" for p in PROGRAMS}  # nothing crashed on the way
