"""`activation logs TASK_ID [-f]` and `activation tasks` on the orchestrator's host in streams mode:
the task runs in a replica tree on another spool (another host, as far as the files go), and what
it does comes by Redis.

Real programs: the orchestrator and a replica each under supervisord, one redis-server.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from activation.orchestrator.endpoint import read_endpoint
from activation.transport.streams.keys import StreamKeys
from tests.conftest import wait_for
from tests.harness import BIN, RedisServer, WorkerTree, new_orchestrator, new_tree

pytestmark = pytest.mark.slow

W = "marie"


@pytest.fixture
def stack(tmp_path: Path, redis_server: RedisServer) -> Iterator[tuple[WorkerTree, WorkerTree]]:
    common = {"ACTIVATION_TRANSPORT": "streams", "REDIS_URL": redis_server.url, "ACTIVATION_LEASE": "10"}
    orchestrator = new_orchestrator(tmp_path / "orchestrator", **common)
    orchestrator.spool.init([W])
    replica = new_tree(tmp_path / "replica", W, **common)
    try:
        orchestrator.start()
        wait_for(lambda: read_endpoint(orchestrator.spool), 20, 0.1, "the orchestrator's API")
        replica.start()
        yield orchestrator, replica
    finally:
        replica.kill_everything()
        orchestrator.kill_everything()


def test_logs_follows_a_task_running_on_another_host_live_and_ends_with_its_status(stack, tmp_path):
    orchestrator, replica = stack
    gate = tmp_path / "gate"
    sent = orchestrator.cli("dispatch", W, f"stream=2 gap=0.1 gate={gate}", "--task-id", "far-1")
    assert sent.returncode == 0, sent.stderr
    follow = subprocess.Popen(
        [str(BIN / "activation"), "logs", "-f", "far-1"],
        env=orchestrator.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert follow.stdout is not None
        # The first turn arrives while the agent waits at its gate: nothing is finished anywhere.
        first = wait_for(follow.stdout.readline, 30, 0, "the first rendered line of the remote log")
        assert first.strip(), first
        assert not orchestrator.spool.has_result(W, "far-1") and not replica.spool.has_result(W, "far-1")
        gate.touch()
        out, err = follow.communicate(timeout=60)
    finally:
        follow.kill()
    assert follow.returncode == 0, err
    text = first + out
    assert "→ Bash" in text and "── done (success)" in text and "tokens in" in text, text  # rendered stream-json
    assert "far-1: completed" in err
    # Without -f, after the end: what the mirrored result holds.
    again = orchestrator.cli("logs", "far-1")
    assert again.returncode == 0 and again.stdout.strip(), again.stderr


def test_logs_of_a_task_not_started_says_so_in_one_line(stack, redis_server):
    orchestrator, replica = stack
    replica.stop()  # nobody takes it: it waits in the stream
    assert orchestrator.cli("dispatch", W, "sleep=1", "--task-id", "wait-1").returncode == 0
    shown = orchestrator.cli("logs", "wait-1")
    assert shown.returncode == 0 and shown.stdout == ""
    assert "wait-1 has printed nothing yet (or waits in the stream)" in shown.stderr
    assert len(shown.stderr.splitlines()) == 1


def test_logs_with_redis_away_is_one_line(stack, redis_server):
    orchestrator, replica = stack
    replica.stop()
    assert orchestrator.cli("dispatch", W, "sleep=1", "--task-id", "away-1").returncode == 0
    redis_server.stop()
    shown = orchestrator.cli("logs", "away-1", timeout=60)
    assert shown.returncode == 1
    assert "cannot read away-1's log from Redis" in shown.stderr and len(shown.stderr.splitlines()) == 1


def test_the_shipped_log_is_capped_and_expires(stack, redis_server):
    import redis

    orchestrator, _replica = stack
    assert orchestrator.cli("dispatch", W, "flood=200000", "--task-id", "big-1").returncode == 0
    wait_for(lambda: orchestrator.spool.has_result(W, "big-1"), 60, 0.1, "big-1's result mirrored")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        key = StreamKeys(W).log("big-1")
        shipped = sum(len(fields["text"]) for _id, fields in client.xrange(key))
        assert shipped >= 200000  # all of it went (under the cap), in whole lines or chunks
        assert 0 < client.ttl(key) <= 3600
    finally:
        client.close()


def test_tasks_shows_a_task_running_on_another_host_as_running_with_its_replica(stack, tmp_path, redis_server):
    orchestrator, _replica = stack
    gate = tmp_path / "gate"
    assert orchestrator.cli("dispatch", W, f"stream=1 gate={gate}", "--task-id", "run-1").returncode == 0
    assert orchestrator.cli("dispatch", W, "sleep=0", "--task-id", "next-1").returncode == 0  # waits behind it

    def row(task_id: str) -> dict | None:
        listed = orchestrator.cli("tasks", "--json")
        return next((r for r in json.loads(listed.stdout) if r["task_id"] == task_id), None)

    running = wait_for(
        lambda: (r := row("run-1")) and r["state"] == "running" and r["elapsed_s"] is not None and r,
        30,
        0.1,
        "run-1 listed as running",
    )
    assert running["attempt"] == 1 and running["replica"] and running["worker"] == W
    assert row("next-1")["state"] == "pending"
    table = orchestrator.cli("tasks", "--state", "running")
    assert f"{W}@" in table.stdout and "run-1" in table.stdout and "next-1" not in table.stdout
    gate.touch()
    wait_for(lambda: (r := row("run-1")) and r["state"] == "done", 30, 0.1, "run-1 done")
    redis_server.stop()
    away = orchestrator.cli("tasks", timeout=60)
    assert away.returncode == 0 and "run-1" in away.stdout
    assert away.stderr.count("cannot ask Redis which tasks run") == 1 and len(away.stderr.splitlines()) == 1


def test_dispatch_wait_shows_the_task_running_on_another_host_before_it_finishes(stack, tmp_path):
    orchestrator, _replica = stack
    gate = tmp_path / "gate"
    waiting = subprocess.Popen(
        [str(BIN / "activation"), "dispatch", W, f"stream=1 gate={gate}", "--task-id", "w-1", "--wait"],
        env=orchestrator.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert waiting.stderr is not None
        lines = [wait_for(waiting.stderr.readline, 30, 0, "the first progress line")]
        if lines[0].startswith("w-1: queued on marie"):  # a replica may hold it by the first look
            lines.append(wait_for(waiting.stderr.readline, 30, 0, "the second progress line"))
        assert lines[-1].startswith(("w-1: running on marie", "w-1: running after")), lines
        assert not orchestrator.spool.has_result(W, "w-1")
        gate.touch()
        out, err = waiting.communicate(timeout=60)
    finally:
        waiting.kill()
    assert waiting.returncode == 0, err
    assert "w-1: finished after" in err and "w-1: completed" in out
