"""Redis wake-ups in a real worker tree: events wake it, hostile ones cannot hurt it, outages lose nothing."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from activation.spool.atomic import read_json
from activation.transport import pubsub as events
from activation.worker.wake.messages import MAX_MESSAGE_BYTES
from tests.conftest import wait_for
from tests.harness import RedisServer, WorkerTree

# Polling and the periodic rescan both at 30 s: within a test, only an event (or the rescan that
# follows a (re)subscribe) can explain a fast wake.
SLOW_FILES = {"ACTIVATION_MODE": "poll,redis", "ACTIVATION_POLL_INTERVAL": "30", "ACTIVATION_RESCAN_INTERVAL": "30"}
FAST = 15.0  # seconds: "at once" on a loaded 2-core machine, still far below the 30 s intervals


def beat(tree: WorkerTree) -> dict[str, Any]:
    try:
        data = read_json(tree.spool.heartbeat_path(tree.worker))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def redis_state(tree: WorkerTree) -> tuple[str | None, bool | None]:
    """(the heartbeat's own Redis state, whether the listener is subscribed), from the heartbeat file."""
    data = beat(tree)
    listener = data.get("listener") or {}
    return data.get("redis"), (listener.get("redis") or {}).get("connected")


def wait_subscribed(tree: WorkerTree, timeout: float = 30) -> dict[str, Any]:
    """Until the heartbeat shows the listener subscribed, and the rescan that follows it done."""

    def ready() -> dict[str, Any] | None:
        data = beat(tree)
        listener = data.get("listener") or {}
        redis_stats = listener.get("redis") or {}
        # rescans: one at start, one after the subscribe
        if data.get("redis") == "up" and redis_stats.get("connected") and listener.get("rescans", 0) >= 2:
            return data
        return None

    return dict(wait_for(ready, timeout, 0.05, lambda: f"the subscription; log:\n{tree.log_tail()}"))


class Publisher:
    def __init__(self, url: str, worker: str = "w1") -> None:
        self.client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        self.channel = events.activate_channel(worker)

    def __call__(self, message: bytes | str) -> int:
        return int(self.client.publish(self.channel, message))

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def publisher(redis_server: RedisServer):
    made = Publisher(redis_server.url)
    yield made
    made.close()


def test_an_event_wakes_a_worker_that_polls_every_30s(make_tree, redis_server: RedisServer, publisher: Publisher):
    tree: WorkerTree = make_tree(REDIS_URL=redis_server.url, **SLOW_FILES)
    wait_subscribed(tree)
    tree.write_task("by-id", "x")  # atomic write; no inotify in this tree, and the poll is 30 s away
    started = time.monotonic()
    assert publisher("by-id") == 1
    result = tree.wait_result("by-id", FAST)
    assert result["status"] == "completed" and result["source"] == "redis"
    assert time.monotonic() - started < FAST
    tree.write_task("by-path", "y")
    assert publisher(str(tree.spool.task_path("w1", "by-path"))) == 1  # the seed's orchestrator sends paths
    assert tree.wait_result("by-path", FAST)["source"] == "redis"


def test_hostile_messages_are_refused_and_the_worker_carries_on(
    make_tree, redis_server: RedisServer, publisher: Publisher, tmp_path: Path
):
    tree: WorkerTree = make_tree(REDIS_URL=redis_server.url, **SLOW_FILES)
    wait_subscribed(tree)
    listener_pid = tree.pid("listener")
    spool = tree.spool
    spool.init(["w2"])
    other = spool.inbox("w2")
    (other / "victim.json").write_text(json.dumps({"task_id": "victim", "description": "x"}))
    inbox = spool.inbox("w1")
    (inbox / "escape").symlink_to(other)
    hostile: list[bytes | str] = [
        f"{other}/victim.json",
        f"{inbox}/../w2/victim.json",
        f"{inbox}/escape/victim.json",
        b"v" * (MAX_MESSAGE_BYTES + 1),
        b"\xff\xfevictim",
        b"",
        ".tmp_victim.json",
        f"{inbox}/.victim.json",
        "/etc/passwd",
        "../w2/victim.json",
    ]
    for _ in range(20):  # a small flood
        for message in hostile:
            assert publisher(message) == 1

    def refused() -> int:
        stats = (beat(tree).get("listener") or {}).get("redis") or {}
        return sum((stats.get("refused") or {}).values())

    wait_for(lambda: refused() == 20 * len(hostile), 30, 0.1, lambda: f"{refused()} refusals; {tree.log_tail()}")
    tree.write_task("good", "z")
    assert publisher("good") == 1
    assert tree.wait_result("good", FAST)["source"] == "redis"
    assert tree.pid("listener") == listener_pid
    assert tree.states() == {"listener": "RUNNING", "executor": "RUNNING", "heartbeat": "RUNNING"}
    assert (other / "victim.json").exists() and tree.result("victim") is None
    assert not list(spool.dead_letters())  # refused messages are not tasks: nothing to dead-letter
    log = tree.log.read_text(errors="replace")
    assert log.count("refused a message") <= 7  # one line per reason, not one per message


def test_a_publish_nobody_hears_is_still_done_from_the_file(make_tree, redis_server: RedisServer):
    # This worker does not subscribe: the event is lost, the file delivers (poll + rescan).
    tree: WorkerTree = make_tree(
        REDIS_URL=redis_server.url,
        ACTIVATION_MODE="poll",
        ACTIVATION_POLL_INTERVAL="0.3",
        ACTIVATION_RESCAN_INTERVAL="1",
    )
    sent = tree.cli("dispatch", "w1", "unheard", "--transport", "events", "--wait", "--wait-timeout", "60", "--json")
    assert sent.returncode == 0, sent.stderr
    assert json.loads(sent.stdout)["status"] == "completed"
    assert "no worker subscribes to activate:w1" in sent.stderr


def test_redis_killed_mid_run_loses_nothing_and_the_heartbeat_shows_it(
    make_tree, redis_server: RedisServer, publisher: Publisher, tmp_path: Path
):
    tree: WorkerTree = make_tree(REDIS_URL=redis_server.url, ACTIVATION_REDIS_BACKOFF_MAX="0.5", **SLOW_FILES)
    wait_subscribed(tree)
    tree.write_task("running", "sleep=1.5")
    assert publisher("running") == 1
    wait_for(lambda: tree.spool.claim_path("w1", "running").exists(), FAST, what="the claim")
    redis_server.stop()  # mid-task: its done event will fail, its result must not
    seen: list[tuple[str | None, bool | None]] = []

    def state_is(wanted: tuple[str, bool]) -> bool:
        state = redis_state(tree)
        if not seen or seen[-1] != state:
            seen.append(state)
        return state == wanted

    wait_for(lambda: state_is(("down", False)), 30, 0.05, lambda: f"redis down in the heartbeat; {tree.log_tail()}")
    during = [f"outage-{i}" for i in range(5)]
    for task_id in during:
        tree.write_task(task_id, "x")  # nobody can announce these
    assert tree.wait_result("running", 30)["status"] == "completed"
    time.sleep(0.5)
    redis_server.start()
    wait_for(lambda: state_is(("up", True)), 30, 0.05, lambda: f"redis up in the heartbeat; {tree.log_tail()}")
    # Polling and the periodic rescan are 30 s away: the rescan after the resubscribe does these.
    for task_id in during:
        assert tree.wait_result(task_id, FAST)["status"] == "completed"
    assert ("down", False) in seen and seen[-1] == ("up", True)
    tree.write_task("after", "x")
    assert Publisher(redis_server.url)("after") == 1
    assert tree.wait_result("after", FAST)["source"] == "redis"
    assert tree.result_ids() == sorted(["after", "running", *during])
    log = tree.log.read_text(errors="replace")
    # Once per outage and program, not once per attempt: the subscriber, the heartbeat key and the
    # done events each say it once.
    down = [line for line in log.splitlines() if "redis unreachable at" in line]
    for program in ("listener", "heartbeat", "executor"):
        assert sum(f"activation.{program}:" in line for line in down) <= 1, down
    assert any("activation.listener:" in line for line in down), down


def test_redis_absent_at_start_the_worker_runs_on_files(make_tree, tmp_path: Path):
    absent = RedisServer(tmp_path / "absent")  # never started: nothing listens on its port
    tree: WorkerTree = make_tree(
        REDIS_URL=absent.url,
        ACTIVATION_MODE="poll,redis",
        ACTIVATION_POLL_INTERVAL="0.2",
        ACTIVATION_REDIS_BACKOFF_MAX="1",
    )
    tree.write_task("files-only", "x")
    assert tree.wait_result("files-only", 30)["source"] in ("poll", "rescan")

    def with_listener_stats() -> dict[str, Any] | None:
        data = beat(tree)
        return data if "redis" in (data.get("listener") or {}) else None

    data = dict(wait_for(with_listener_stats, 10, what="a heartbeat with the listener's stats"))
    assert data["redis"] == "down"
    listener = data["listener"]
    assert listener["redis"]["configured"] is True and listener["redis"]["connected"] is False
    assert listener["redis"]["last_error"]
    assert listener["sources"]["redis"]["alive"] is True  # down, not dead

    def health() -> dict[str, Any]:
        status = tree.cli("status", "--json")
        (found,) = json.loads(status.stdout)
        assert status.returncode == (0 if found["healthy"] else 1), status.stderr  # status exits 1 on a sick worker
        return dict(found)

    # Healthy, once a beat has seen every program RUNNING: Redis down is no problem of the worker.
    wait_for(lambda: health()["healthy"], 30, 0.2, lambda: f"a healthy status: {health()['problems']}")
    time.sleep(1.5)
    assert tree.states() == {"listener": "RUNNING", "executor": "RUNNING", "heartbeat": "RUNNING"}
    assert "redis unreachable at" in tree.log.read_text(errors="replace")


def test_dispatch_wait_returns_on_the_done_event(make_tree, redis_server: RedisServer):
    tree: WorkerTree = make_tree(REDIS_URL=redis_server.url, **SLOW_FILES)
    wait_subscribed(tree)
    watcher = redis.Redis.from_url(redis_server.url)
    pubsub = watcher.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events.done_channel("w1"))
    try:
        started = time.monotonic()
        sent = tree.cli("dispatch", "w1", "quick", "--transport", "events", "--wait", "--wait-timeout", "60", "--json")
        elapsed = time.monotonic() - started
        assert sent.returncode == 0, sent.stderr
        result = json.loads(sent.stdout)
        assert result["status"] == "completed" and result["source"] == "redis"
        assert elapsed < FAST
        message = None
        deadline = time.monotonic() + 10
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
        assert message is not None and message["data"] == result["task_id"].encode()
    finally:
        pubsub.close()
        watcher.close()


def test_the_password_never_shows_anywhere(make_tree, tmp_path: Path):
    password = "pw-Zq81xVv-secret"
    server = RedisServer(tmp_path / "locked", password=password).start()
    try:
        tree: WorkerTree = make_tree(REDIS_URL=server.url, ACTIVATION_REDIS_BACKOFF_MAX="0.5", **SLOW_FILES)
        wait_subscribed(tree)
        env_dump = tmp_path / "agent-env.json"
        sent = tree.cli(
            "dispatch", "w1", f"env={env_dump}", "--transport", "events", "--wait", "--wait-timeout", "60", "--json"
        )
        assert sent.returncode == 0, sent.stderr
        task_id = json.loads(sent.stdout)["task_id"]
        # An outage, so that every error path logs too.
        server.stop()
        wait_for(lambda: redis_state(tree) == ("down", False), 30, 0.05, "redis down")
        tree.write_task("in-outage", "x")
        server.start()
        wait_for(lambda: redis_state(tree) == ("up", True), 30, 0.05, "redis up")
        tree.wait_result("in-outage", FAST)
        status = tree.cli("status", "--json")
        status_text = tree.cli("status")
        client = redis.Redis.from_url(server.url)
        try:
            key = client.get(events.heartbeat_key("w1")) or b""
        finally:
            client.close()
        outputs = {
            "dispatch output": sent.stdout + sent.stderr,
            "supervisord log": tree.log.read_text(errors="replace"),
            "heartbeat file": tree.spool.heartbeat_path("w1").read_text(),
            "heartbeat key": key.decode(errors="replace"),
            "status --json": status.stdout + status.stderr,
            "status": status_text.stdout + status_text.stderr,
            "result": tree.spool.result_path("w1", task_id).read_text(),
            "agent environment": env_dump.read_text(),
        }
        assert "redis unreachable at redis://:***@" in outputs["supervisord log"]
        assert "REDIS_URL" not in json.loads(outputs["agent environment"])
        for where, text in outputs.items():
            assert text, where
            assert password not in text, f"the password shows in the {where}"
    finally:
        server.stop()
