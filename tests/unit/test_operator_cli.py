"""``activation tasks``, ``status``, ``results purge``, ``where``: the CLI against a real spool
folder (CliRunner), with tasks placed where the executor and the listener would put them."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from activation.cli import main
from activation.spool.atomic import atomic_write_json
from activation.spool.layout import Spool
from activation.spool.listing import Query, list_tasks
from activation.spool.retention import Sweeper, purge
from tests.harness import free_port

DAY = 86400.0


def _result(spool: Spool, worker: str, task_id: str, status: str, *, age: float = 0.0, **fields: object) -> Path:
    path = spool.result_path(worker, task_id)
    record = {
        "task_id": task_id,
        "worker": worker,
        "status": status,
        "attempts": 1,
        "duration_s": 0.5,
        "exit_code": 0 if status == "completed" else 1,
        "description": f"do {task_id}",
        **fields,
    }
    atomic_write_json(path, record)
    if age:
        stamp = time.time() - age
        os.utime(path, (stamp, stamp))
    return path


def _pending(spool: Spool, worker: str, task_id: str, **fields: object) -> Path:
    path = spool.task_path(worker, task_id)
    atomic_write_json(path, {"task_id": task_id, "description": f"do {task_id}", **fields})
    return path


def _claimed(spool: Spool, worker: str, task_id: str, attempts: int = 0) -> Path:
    _pending(spool, worker, task_id, attempts=attempts)
    claim = spool.claim(worker, task_id)
    assert claim is not None
    return claim


@pytest.fixture
def cli(spool: Spool, monkeypatch: pytest.MonkeyPatch):
    spool.init(["marie", "anga"])
    monkeypatch.setenv("ACTIVATION_SPOOL", str(spool.root))
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(main, list(args), catch_exceptions=False)

    return invoke


def test_tasks_lists_every_state_with_a_header(spool, cli):
    _claimed(spool, "marie", "fix-42", attempts=1)
    _pending(spool, "anga", "next-1")
    _result(spool, "marie", "ok-1", "completed")
    _result(spool, "anga", "bad-1", "failed")
    _result(spool, "anga", "slow-1", "timeout")
    _result(spool, "anga", "stop-1", "cancelled")
    (spool.dead_letter_dir / "gone-1.json").write_text(
        json.dumps(
            {
                "task_id": "gone-1",
                "worker": "marie",
                "reason": "max_attempts",
                "detail": "3 attempts",
                "dead_at": "2026-01-01T00:00:00+00:00",
                "task": {"task_id": "gone-1", "description": "x"},
            }
        )
    )
    out = cli("tasks")
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert lines[0].split()[:4] == ["TASK", "WORKER", "STATE", "ATTEMPT"]
    states = {line.split()[0]: line.split()[2] for line in lines[1:]}
    assert states == {
        "fix-42": "running",
        "next-1": "pending",
        "ok-1": "done",
        "bad-1": "failed",
        "slow-1": "timeout",
        "stop-1": "cancelled",
        "gone-1": "dead",
    }
    assert lines[1].startswith("fix-42"), "running tasks come first"
    running = lines[1].split()
    assert running[3] == "2" and "running" in lines[1], "attempt is the claim's attempts + 1, with the elapsed time"
    assert "max_attempts: 3 attempts" in out.output


def test_tasks_state_failed_since_1h(spool, cli):
    _result(spool, "marie", "old-fail", "failed", age=2 * 3600)
    _result(spool, "marie", "new-fail", "failed", age=60)
    _result(spool, "marie", "new-ok", "completed", age=60)
    out = cli("tasks", "--state", "failed", "--since", "1h", "--json")
    assert out.exit_code == 0, out.output
    assert [(r["task_id"], r["state"]) for r in json.loads(out.output)] == [("new-fail", "failed")]


def test_tasks_worker_filter_and_limit_newest_first(spool, cli):
    for i in range(5):
        _result(spool, "marie", f"m{i}", "completed", age=100 - i)
    _result(spool, "anga", "a0", "completed")
    rows = json.loads(cli("tasks", "--worker", "marie", "--limit", "3", "--json").output)
    assert [r["task_id"] for r in rows] == ["m4", "m3", "m2"]


def test_tasks_bad_since_is_one_line(cli):
    out = cli("tasks", "--since", "soon")
    assert out.exit_code == 2 and out.output.count("\n") == 1 and "--since" in out.output


def test_tasks_reads_at_most_limit_results(spool, monkeypatch):
    spool.init(["marie"])
    for i in range(300):
        _result(spool, "marie", f"t{i:04d}", "completed", age=1000 - i)
    import activation.spool.readers as readers

    reads = []
    real = readers.read_json
    monkeypatch.setattr(readers, "read_json", lambda p: reads.append(p) or real(p))
    rows = list_tasks(spool, Query(limit=10))
    assert [r.task_id for r in rows] == [f"t{i:04d}" for i in range(299, 289, -1)]
    assert len(reads) == 10


def test_status_is_live_from_the_spool_without_a_heartbeat_lag(spool, cli):
    # The heartbeat says the worker is idle with nothing done; the spool says otherwise.
    atomic_write_json(
        spool.heartbeat_path("marie"),
        {
            "worker": "marie",
            "epoch": time.time(),
            "state": "running",
            "current_task": None,
            "queue_size": 0,
            "counts": {},
            "programs": {"listener": "RUNNING", "executor": "RUNNING", "heartbeat": "RUNNING"},
        },
    )
    _claimed(spool, "marie", "fix-42")
    _pending(spool, "marie", "next-1")
    _pending(spool, "marie", "next-2")
    _result(spool, "marie", "ok-1", "completed")
    _result(spool, "marie", "ok-2", "failed")
    out = cli("status", "marie")
    assert out.exit_code == 0, out.output
    assert "task=fix-42" in out.output and "queue=2" in out.output
    assert "none yet" not in out.output and "results: 2" in out.output
    assert "done=1" in out.output and "failed=1" in out.output
    (data,) = json.loads(cli("status", "marie", "--json").output)
    assert data["current_task"] == "fix-42" and data["queue_size"] == 2 and data["results_total"] == 2
    assert data["healthy"] is True and data["programs"]["executor"] == "RUNNING"
    assert data["heartbeat_current_task"] is None


def test_status_unknown_worker_is_one_line(cli):
    out = cli("status", "nobody")
    assert out.exit_code == 1 and "no worker 'nobody'" in out.output


def test_watch_prints_plain_snapshots_when_not_a_terminal(spool, cli):
    _pending(spool, "marie", "next-1")
    out = cli("tasks", "--watch", "--interval", "0.1", "--count", "2")
    assert out.exit_code == 0, out.output
    assert out.output.count("-- 20") == 2 and out.output.count("\nnext-1 ") == 2
    status = cli("status", "--watch", "--interval", "0.1", "--count", "2")
    assert status.exit_code == 0 and status.output.count("-- 20") == 2 and "\x1b[" not in status.output


def test_rich_is_not_imported_without_watch(spool, cli):
    import sys

    sys.modules.pop("rich", None)
    sys.modules.pop("rich.live", None)
    cli("tasks")
    cli("status")
    assert "rich.live" not in sys.modules


def test_results_purge_keeps_the_last_7_days(spool, cli):
    _result(spool, "marie", "old", "completed", age=8 * DAY)
    _result(spool, "anga", "older", "failed", age=30 * DAY)
    _result(spool, "marie", "recent", "completed", age=6 * DAY)
    dry = cli("results", "purge", "--older-than", "7d", "--dry-run", "--json")
    assert sorted(p["task_id"] for p in json.loads(dry.output)["purged"]) == ["old", "older"]
    assert spool.has_result("marie", "old")
    done = cli("results", "purge", "--older-than", "7d")
    assert done.exit_code == 0 and "2 result(s) deleted" in done.output
    assert not spool.has_result("marie", "old") and not spool.has_result("anga", "older")
    assert spool.has_result("marie", "recent")


def test_sweeper_applies_the_ttl_a_bounded_step_at_a_time(spool):
    spool.init(["marie"])
    for i in range(25):
        _result(spool, "marie", f"old{i}", "completed", age=8 * DAY)
    _result(spool, "marie", "recent", "completed", age=DAY)
    sweeper = Sweeper(spool, 7 * DAY, budget=10, rest=3600, interval=0)
    now = time.time()
    steps = [sweeper.step(now) for _ in range(3)]  # 26 entries, 10 looked at per step
    assert sum(steps) == 25 and all(0 < n <= 10 for n in steps), steps
    assert sweeper.step(now) == 0  # resting after a full pass: no scan at all
    assert spool.has_result("marie", "recent") and sweeper.deleted == 25
    # A result that arrives with an old mtime (a restore) waits for the next pass: at most a
    # tenth of the TTL, since the oldest kept ("recent", a day old) expires only in 6 days.
    _result(spool, "marie", "restored", "completed", age=8 * DAY)
    assert sweeper.step(now + 3601) == 0
    assert sweeper.step(now + 0.7 * DAY + 1) == 1 and not spool.has_result("marie", "restored")


def test_after_a_pass_the_sweeper_rests_until_the_oldest_kept_result_can_expire(spool):
    spool.init(["marie", "anga"])
    _result(spool, "marie", "young", "completed", age=DAY)
    _result(spool, "anga", "oldest", "completed", age=7 * DAY - 7200)  # expires in two hours
    sweeper = Sweeper(spool, 7 * DAY, budget=100, rest=60, interval=0)
    now = time.time()
    assert sweeper.step(now) == 0  # one pass over both folders, nothing expired yet
    assert sweeper.step(now + 7200 - 120) == 0 and spool.has_result("anga", "oldest"), "not due: no scan"
    assert sweeper.step(now + 7200 + 1) == 1 and not spool.has_result("anga", "oldest")
    assert spool.has_result("marie", "young")


def test_the_sweepers_rest_is_bounded_by_the_least_rest_and_a_tenth_of_the_ttl(spool):
    spool.init(["marie"])
    sweeper = Sweeper(spool, 7 * DAY, budget=100, rest=60, interval=0)
    now = time.time()
    assert sweeper.step(now) == 0  # an empty history: the longest rest, a tenth of the TTL
    _result(spool, "marie", "copied-in", "completed", age=30 * DAY)
    assert sweeper.step(now + 0.7 * DAY - 1) == 0
    assert sweeper.step(now + 0.7 * DAY) == 1
    # A result it cannot delete (a folder under a result's name) keeps the next pass a minimum rest away.
    stuck = spool.result_path("marie", "stuck")
    stuck.mkdir()
    os.utime(stuck, (now - 30 * DAY, now - 30 * DAY))
    later = now + 1.4 * DAY  # the pass that deleted "copied-in" kept nothing: the longest rest again
    assert sweeper.step(later) == 0 and sweeper.skipped == 1
    assert sweeper.step(later + 61) == 0 and sweeper.skipped == 2, "tried again after the least rest"


def test_purge_and_sweeper_ignore_dot_files(spool):
    spool.init(["marie"])
    tmp = spool.results("marie") / ".tmp_x.json"
    tmp.write_text("{}")
    os.utime(tmp, (0, 0))
    assert purge(spool, DAY) == []
    assert tmp.exists()


def test_where_names_the_spool_and_its_source(spool, cli):
    out = cli("where")
    assert out.exit_code == 0 and str(spool.root) in out.output and "ACTIVATION_SPOOL" in out.output


def test_cli_finds_the_project_spool_by_walking_up(tmp_path, monkeypatch):
    project = tmp_path / "project"
    Spool(project / "var" / "spool").init(["marie"])
    deep = project / "src" / "deep"
    deep.mkdir(parents=True)
    monkeypatch.delenv("ACTIVATION_SPOOL", raising=False)
    monkeypatch.chdir(deep)
    out = CliRunner().invoke(main, ["where", "--json"])
    assert out.exit_code == 0, out.output
    data = json.loads(out.output)
    assert data["spool"] == str(project / "var" / "spool") and "walking up" in data["source"]


def test_cli_never_reports_on_a_stray_spool(tmp_path, monkeypatch):
    monkeypatch.delenv("ACTIVATION_SPOOL", raising=False)
    monkeypatch.chdir(tmp_path)
    for args in (["tasks"], ["status"], ["dispatch", "marie", "hello"]):
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 1 and "no spool here" in out.output, (args, out.output)
    assert not (tmp_path / "var").exists()


def _dead(spool: Spool, task_id: str, **task: object) -> None:
    record = {
        "task_id": task_id,
        "worker": "marie",
        "reason": "invalid_field",
        "detail": "timeout too large",
        "dead_at": "2026-01-01T00:00:00+00:00",
        "source": "x",
        "task": {"task_id": task_id, "description": "old words", **task},
    }
    atomic_write_json(spool.dead_letter_path(task_id), record)


def test_dlq_list_has_a_header_and_show_is_readable(spool, cli):
    _dead(spool, "fix-7", timeout=10, metadata={"team": "a"})
    listed = cli("dlq", "list").output.splitlines()
    assert listed[0].split()[:3] == ["ID", "WORKER", "REASON"] and listed[1].startswith("fix-7")
    shown = cli("dlq", "show", "fix-7").output
    for line in (
        "reason:       invalid_field: timeout too large",
        "timeout:      10 s",
        "metadata:     team=a",
        "description:  old words",
    ):
        assert line in shown, shown


def test_dlq_retry_fixes_the_task_and_keeps_its_id(spool, cli):
    _dead(spool, "fix-7", timeout=10, metadata={"team": "a"})
    out = cli("dlq", "retry", "fix-7", "--description", "new words", "--timeout", "5", "--meta", "ticket=42")
    assert out.exit_code == 0, out.output
    shown = json.loads(cli("show", "fix-7", "--json").output)
    assert shown["state"] == "pending" and shown["worker"] == "marie"
    task = shown["record"]
    assert task["task_id"] == "fix-7" and task["description"] == "new words" and task["timeout"] == 5
    assert task["metadata"] == {"team": "a", "ticket": "42"}
    assert task["history"][0]["was"] == {"description": "old words", "timeout": 10, "metadata": {"team": "a"}}
    assert task["history"][-1]["reason"] == "invalid_field"


def test_dlq_retry_refuses_a_fix_that_breaks_the_contract(spool, cli):
    _dead(spool, "fix-8")
    out = cli("dlq", "retry", "fix-8", "--description", "   ")
    assert out.exit_code == 1 and "still invalid" in out.output
    assert json.loads(cli("show", "fix-8", "--json").output)["state"] == "dead"
    assert cli("dlq", "retry", "--all", "--timeout", "3").exit_code == 2


def test_cancel_a_pending_task_gives_a_cancelled_result(spool, cli):
    _pending(spool, "marie", "later-1", metadata={"k": "v"})
    out = cli("cancel", "later-1")
    assert out.exit_code == 0 and "later-1: cancelled" in out.output
    assert not spool.task_path("marie", "later-1").exists()
    assert not spool.claim_path("marie", "later-1").exists()
    result = json.loads(spool.result_path("marie", "later-1").read_text())
    assert result["status"] == "cancelled" and result["metadata"] == {"k": "v"} and result["started_at"] is None
    rows = json.loads(cli("tasks", "--state", "cancelled", "--json").output)
    assert [r["task_id"] for r in rows] == ["later-1"]


def test_cancel_refuses_what_is_finished_or_unknown_in_one_line(spool, cli):
    _result(spool, "marie", "over-1", "completed")
    for task_id, words in (("over-1", "already finished"), ("nope", "no task")):
        out = cli("cancel", task_id)
        assert out.exit_code == 1 and words in out.output and out.output.count("\n") == 1, out.output


def test_cancel_of_a_running_task_asks_its_executor(spool, cli):
    from activation.spool.cancel import request_path

    _claimed(spool, "marie", "busy-1")
    out = cli("cancel", "busy-1", "--no-wait", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {
        "task_id": "busy-1",
        "worker": "marie",
        "status": "cancelling",
        "while": "running",
        "path": str(request_path(spool, "marie", "busy-1")),
    }
    assert json.loads(request_path(spool, "marie", "busy-1").read_text())["by"] == "cli"
    assert spool.claim_path("marie", "busy-1").exists(), "only the executor ends a running task"
    out = cli("cancel", "busy-1", "--wait-timeout", "0.1")  # no executor here to act on it
    assert out.exit_code == 1 and "has not ended it within 0.1 s" in out.output and out.output.count("\n") == 1


def test_logs_of_an_unknown_or_bad_id_is_one_line(cli):
    for args, code in ((("logs", "nope"), 1), (("logs", "bad/id"), 2), (("logs",), 2), (("logs", "-f", "nope"), 1)):
        out = cli(*args)
        assert out.exit_code == code and out.output.count("\n") == 1 and "Traceback" not in out.output, out.output


def test_logs_renders_a_finished_tasks_stream_json_and_passes_plain_lines(spool, cli):
    from activation.spool.tasklog import finished_log_path

    _result(spool, "marie", "talked-1", "completed")
    events = [
        {"type": "assistant", "message": {"content": [{"type": "text", "text": "Hello there."}]}},
        {"type": "result", "subtype": "success", "total_cost_usd": 0.5, "usage": {"output_tokens": 7}},
    ]
    lines = [json.dumps(e) for e in events[:1]] + ["a plain stderr line", json.dumps(events[1])]
    finished_log_path(spool, "marie", "talked-1").write_text("\n".join(lines) + "\n")
    out = cli("logs", "talked-1")
    assert out.exit_code == 0
    rendered = ["Hello there.", "a plain stderr line", "── done (success) · $0.5000 · tokens out 7"]
    assert out.output.splitlines() == rendered
    raw = cli("logs", "talked-1", "--raw")
    assert raw.output.splitlines() == lines
    followed = cli("logs", "-f", "talked-1")  # already finished: prints it all and exits 0
    assert followed.exit_code == 0 and "Hello there." in followed.output


def test_logs_of_a_result_without_a_log_shows_what_the_result_kept(spool, cli):
    _result(spool, "marie", "old-1", "completed", stdout="the old output\n")
    out = cli("logs", "old-1")
    assert out.exit_code == 0 and out.output.splitlines()[-1] == "the old output"


def test_logs_worker_prints_the_trees_log_from_var_log(spool, cli):
    folder = spool.root.parent / "log"
    folder.mkdir()
    (folder / "marie.log").write_text("INFO executor started\n")
    out = cli("logs", "--worker", "marie")
    assert out.exit_code == 0 and out.output == "INFO executor started\n"
    out = cli("logs", "--worker", "nobody")
    assert out.exit_code == 1 and "there are: marie" in out.output and out.output.count("\n") == 1


def test_purge_deletes_the_log_with_its_result(spool, cli):
    from activation.spool.tasklog import finished_log_path

    _result(spool, "marie", "old-2", "completed", age=8 * DAY)
    finished_log_path(spool, "marie", "old-2").write_text("output\n")
    _result(spool, "marie", "new-2", "completed")
    finished_log_path(spool, "marie", "new-2").write_text("output\n")
    assert cli("results", "purge", "--older-than", "7d").exit_code == 0
    assert not finished_log_path(spool, "marie", "old-2").exists()
    assert finished_log_path(spool, "marie", "new-2").exists()


def test_sweeper_steps_at_most_once_per_interval(spool):
    spool.init(["marie"])
    _result(spool, "marie", "old-a", "completed", age=8 * DAY)
    sweeper = Sweeper(spool, 7 * DAY, interval=10)
    now = time.time()
    _result(spool, "marie", "old-b", "completed", age=8 * DAY)
    assert sweeper.step(now) == 2
    _result(spool, "marie", "old-c", "completed", age=8 * DAY)
    assert sweeper.step(now + 5) == 0 and spool.has_result("marie", "old-c")


def test_status_counts_at_most_the_newest_cap_of_the_last_hour(spool, cli, monkeypatch):
    import activation.spool.status as status

    monkeypatch.setattr(status, "RECENT_CAP", 3)
    for i in range(5):
        _result(spool, "marie", f"r{i}", "completed", age=60 - i)
    (data,) = json.loads(cli("status", "marie", "--json").output)
    assert data["results_total"] == 5 and data["recent_counts"] == {"done": 3} and data["recent_capped"] is True


def test_make_up_with_claude_on_path_uses_the_json_envelope_and_a_workdir_per_worker(tmp_path, monkeypatch):
    from activation.cli import localstack
    from activation.config import load_settings

    monkeypatch.setattr(localstack.shutil, "which", lambda program: f"/usr/bin/{program}")
    env = {"ACTIVATION_SPOOL": str(tmp_path / "var" / "spool"), "ACTIVATION_RUN_DIR": str(tmp_path / "var" / "run")}
    settings = load_settings(env)
    agent, fake = localstack.agent_command(settings)
    assert not fake and agent == "claude --output-format json -p -- {description}"
    worker_env = localstack.worker_environment(settings, "marie", 0, agent)
    assert worker_env["ACTIVATION_AGENT_WORKDIR"] == str(tmp_path / "var" / "work" / "marie")
    assert (tmp_path / "var" / "work" / "marie").is_dir()
    # What the user set wins: their template, their workdir.
    own = load_settings(
        {**env, "ACTIVATION_AGENT_COMMAND": "claude -p -- {description}", "ACTIVATION_AGENT_WORKDIR": "/srv"}
    )
    assert localstack.agent_command(own)[0] == "claude -p -- {description}"
    assert localstack.worker_environment(own, "marie", 0, "x")["ACTIVATION_AGENT_WORKDIR"] == "/srv"


def test_make_up_in_a_folder_too_deep_for_its_sockets_fails_in_one_line_and_starts_nothing(tmp_path):
    # A checkout deep in the tree: supervisord would exit at once with "AF_UNIX path too long".
    deep = tmp_path / ("d" * 60) / "var" / "run"
    env = {
        "ACTIVATION_SPOOL": str(tmp_path / "var" / "spool"),
        "ACTIVATION_RUN_DIR": str(deep),
        "ACTIVATION_METRICS_PORT": "0",
        "ACTIVATION_ADMIN_BIND": f"127.0.0.1:{free_port()}",
    }
    out = CliRunner().invoke(main, ["up", "--workers", "marie"], env=env, catch_exceptions=False)
    assert out.exit_code != 0
    (line,) = out.output.strip().splitlines()
    assert f"socket {deep / 'marie' / 'supervisor.sock'} would be" in line, line
    assert "set ACTIVATION_RUN_DIR to a shorter folder" in line, line
    assert not (tmp_path / "var").exists() and not deep.exists()


def test_make_up_checks_every_tree_s_socket_and_takes_one_that_just_fits(tmp_path):
    from activation.cli.stackcheck import LONGEST_SOCKET, MAX_SOCKET_PATH, check_socket_paths
    from activation.errors import ConfigError

    room = MAX_SOCKET_PATH - len(f"{tmp_path}//{LONGEST_SOCKET}".encode())
    fits = tmp_path / ("f" * room)
    check_socket_paths({"marie": tmp_path, "orchestrator": fits})  # exactly MAX_SOCKET_PATH bytes
    with pytest.raises(ConfigError, match="orchestrator's socket"):
        check_socket_paths({"marie": tmp_path, "orchestrator": tmp_path / ("f" * (room + 1))})


# -- records another process wrote are not trusted (spool/readers.py) ----------------------------

HOSTILE_RESULTS = [
    b'{"task_id": "bad-1", "status": "completed", "duration_s": "fast"}',  # ill-typed
    b'{"task_id": "bad-1", "stat',  # truncated
    b"[1, 2, 3]",
    b'{"task_id": "bad-1", "status": {"nested": true}, "exit_code": []}',
]


@pytest.mark.parametrize("data", HOSTILE_RESULTS)
def test_a_hostile_result_is_one_note_in_tasks_status_and_show(spool, cli, data):
    _result(spool, "marie", "ok-1", "completed")
    spool.result_path("marie", "bad-1").write_bytes(data)

    listed = cli("tasks")
    assert listed.exit_code == 0, listed.output
    assert "ok-1" in listed.output and "bad-1" not in listed.output.splitlines()[1]
    (note,) = [line for line in listed.output.splitlines() if line.startswith("note:")]
    assert "skipped 1 result file(s)" in note and "marie/bad-1.json" in note

    status = cli("status", "marie")
    assert "note: skipped 1 result file(s)" in status.output and "done=1" in status.output

    shown = cli("show", "bad-1")
    assert shown.exit_code == 1
    assert shown.output.splitlines()[0].startswith("bad-1: done (worker marie")
    (error,) = [line for line in shown.output.splitlines() if line.startswith("activation: ")]
    assert "bad-1.json" in error and "Traceback" not in shown.output


@pytest.mark.parametrize(
    "data",
    [
        b'{"worker": "marie", "state": "running", "epoch": "now", "programs": null}',
        b'{"worker": "marie", "state": "running", "epoch": 1e999, "counts": {"completed": "3"}}',
        b'{"worker": "anga", "state": "running"}',  # another worker's name in marie's file
        b'{"worker": "marie", "programs": ["RUNNING"]}',
        b"\xff\xfe{",
    ],
)
def test_a_hostile_heartbeat_makes_an_honest_sick_status_in_one_line(spool, cli, data):
    spool.heartbeat_path("marie").write_bytes(data)
    out = cli("status", "marie")
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert "SICK" in out.output and "problems: unreadable heartbeat: marie.json: " in out.output
    (data_out,) = json.loads(cli("status", "marie", "--json").output)
    assert data_out["healthy"] is False and data_out["alive"] is False


def test_a_hostile_dead_letter_is_one_note_in_dlq_list_tasks_and_show(spool, cli):
    _dead(spool, "fix-7")
    atomic_write_json(spool.dead_letter_path("bad-2"), {"task_id": "bad-2", "reason": 42, "dead_at": ["x"]})
    spool.dead_letter_path("bad-3").write_bytes(b'{"task_id": "bad-3", "rea')

    listed = cli("dlq", "list")
    assert listed.exit_code == 0, listed.output
    lines = listed.output.splitlines()
    assert lines[1].startswith("fix-7") and len(lines) == 3
    assert lines[2].startswith("note: skipped 2 dead-letter record(s) that are not valid: bad-")
    as_json = cli("dlq", "list", "--json")
    assert [d["id"] for d in json.loads(as_json.stdout)] == ["fix-7"]

    tasks = cli("tasks", "--state", "dead").output
    assert "unreadable: bad-2.json: dead letter: reason must be a non-empty string, got int" in tasks

    for command in (("show", "bad-2"), ("dlq", "show", "bad-3")):
        out = cli(*command)
        assert out.exit_code == 1 and "Traceback" not in out.output
        (error,) = [line for line in out.output.splitlines() if line.startswith("activation: ")]
        assert "bad-" in error, out.output
