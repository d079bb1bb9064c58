"""The Redis wake source against a real redis-server: vetting, refusals, retries, outages."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from activation.config import Settings
from activation.observability.samples import worker_metrics
from activation.spool.layout import Spool
from activation.transport import pubsub as events
from activation.worker.done_events import DoneEvents
from activation.worker.listener import Listener
from activation.worker.wake import messages as rs
from activation.worker.wake import redis as redis_wake
from activation.worker.wake.messages import MAX_MESSAGE_BYTES, vet_message
from activation.worker.wake.redis import JOIN_TIMEOUT as REDIS_JOIN_TIMEOUT
from activation.worker.wake.redis import RedisSource
from tests.conftest import WORKER, wait_for
from tests.harness import RedisServer
from tests.unit.test_sources import Recorder, write_task


class Rescans:
    """An on_subscribed callback that counts the rescans it was asked for."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.fixture
def make_source(spool: Spool) -> Iterator[Callable[..., tuple[RedisSource, Recorder, Rescans]]]:
    made: list[RedisSource] = []

    def make(url: str, *, connected: bool = True, backoff_max: float = 0.2) -> tuple[RedisSource, Recorder, Rescans]:
        rescans = Rescans()
        source = RedisSource(spool, WORKER, url, backoff_max=backoff_max, on_subscribed=rescans)
        made.append(source)
        recorder = Recorder()
        source.start(recorder)
        if connected:
            wait_for(lambda: source.connected, timeout=10, what="the subscription")
        return source, recorder, rescans

    yield make
    for source in made:
        source.stop()


@pytest.fixture
def publish(redis_server: RedisServer) -> Iterator[Callable[[bytes | str], int]]:
    client = redis.Redis.from_url(redis_server.url)

    def send(message: bytes | str) -> int:
        return int(client.publish(events.activate_channel(WORKER), message))

    yield send
    client.close()


def refused(reason: str) -> float:
    return float(worker_metrics().store.copy()["listener_refused"].get((reason,), 0.0))


# -- vetting, as a pure function ----------------------------------------------------------------


def test_vet_message_accepts_ids_and_inbox_paths_only(spool: Spool, tmp_path: Path) -> None:
    inbox = spool.inbox(WORKER)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (inbox / "escape").symlink_to(outside)
    cases: dict[bytes, tuple[str | None, str | None]] = {
        b"t1": ("t1.json", None),
        b"t1.json": ("t1.json", None),
        b"t1\n": ("t1.json", None),
        f"{inbox}/t1.json".encode(): ("t1.json", None),
        f"{spool.inbox('other')}/t1.json".encode(): (None, rs.OUTSIDE_INBOX),
        f"{inbox}/../other/t1.json".encode(): (None, rs.PARENT_REFERENCE),
        f"{inbox}/../{WORKER}/t1.json".encode(): (None, rs.PARENT_REFERENCE),
        f"{inbox}/escape/t1.json".encode(): (None, rs.OUTSIDE_INBOX),
        f"{inbox}/.processing/t1.json".encode(): (None, rs.OUTSIDE_INBOX),
        f"{inbox}/.hidden.json".encode(): (None, rs.INVALID_NAME),
        b"tasks/w1/t1.json": (None, rs.RELATIVE_PATH),
        b"/etc/passwd": (None, rs.INVALID_NAME),
        b".tmp_t1.json": (None, rs.INVALID_NAME),
        b"a b": (None, rs.INVALID_NAME),
        b"t\x001": (None, rs.INVALID_NAME),
        b"": (None, rs.EMPTY),
        b"  \n": (None, rs.EMPTY),
        b"\xff\xfe": (None, rs.NOT_UTF8),
        b"x" * (MAX_MESSAGE_BYTES + 1): (None, rs.TOO_LARGE),
    }
    for message, expected in cases.items():
        assert vet_message(message, inbox) == expected, message[:80]


# -- the source against a real server -----------------------------------------------------------


def test_ids_and_paths_wake_and_stats_say_connected(make_source, publish, redis_server: RedisServer, spool: Spool):
    source, recorder, rescans = make_source(redis_server.url)
    assert rescans.count == 1  # the first subscribe asks for a rescan too
    write_task(spool, "by-id")
    write_task(spool, "by-path")
    write_task(spool, "by-name")
    assert publish("by-id") == 1
    publish(str(spool.task_path(WORKER, "by-path")))
    publish(b"by-name.json")
    wait_for(lambda: len(recorder.calls) == 3, timeout=5, what="three notifications")
    # Not "complete": only the publisher knows whether it announced a finished file.
    assert recorder.calls == [
        ("by-id.json", "redis", False),
        ("by-path.json", "redis", False),
        ("by-name.json", "redis", False),
    ]
    status = source.status()
    assert status["configured"] and status["connected"] and status["last_error"] is None
    assert status["channel"] == "activate:w1" and status["subscribes"] == 1 and status["refused"] == {}


HOSTILE = {
    "other_path": (rs.OUTSIDE_INBOX, lambda inbox, other: f"{other}/victim.json"),
    "dot_dot": (rs.PARENT_REFERENCE, lambda inbox, other: f"{inbox}/../{other.name}/victim.json"),
    "symlink_escape": (rs.OUTSIDE_INBOX, lambda inbox, other: f"{inbox}/escape/victim.json"),
    "oversized": (rs.TOO_LARGE, lambda inbox, other: b"a" * (MAX_MESSAGE_BYTES + 1)),
    "not_utf8": (rs.NOT_UTF8, lambda inbox, other: b"\xc3\x28victim"),
    "empty": (rs.EMPTY, lambda inbox, other: b""),
    "dot_file": (rs.INVALID_NAME, lambda inbox, other: ".tmp_victim.json"),
    "dot_file_path": (rs.INVALID_NAME, lambda inbox, other: f"{inbox}/.victim.json"),
    "relative": (rs.RELATIVE_PATH, lambda inbox, other: "../other/victim.json"),
}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_each_hostile_message_is_refused_counted_and_survived(
    kind: str, make_source, publish, redis_server: RedisServer, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    reason, build = HOSTILE[kind]
    spool.init(["other"])
    inbox, other = spool.inbox(WORKER), spool.inbox("other")
    (other / "victim.json").write_text('{"task_id": "victim", "description": "x"}')
    (inbox / "escape").symlink_to(other)
    source, recorder, _ = make_source(redis_server.url)
    before = refused(reason)
    with caplog.at_level(logging.WARNING, logger="activation.listener"):
        publish(build(inbox, other))

        # The count goes up just before the line is logged, on the source's thread: wait for both.
        def logged() -> bool:
            return any("refused a message" in r.getMessage() and reason in r.getMessage() for r in caplog.records)

        wait_for(lambda: source.refusals.counts[reason] == 1 and logged(), timeout=5, what=f"the refusal ({reason})")
    assert refused(reason) == before + 1
    assert source.status()["refused"] == {reason: 1}
    # Still subscribed, still working.
    assert source.alive() and source.connected
    write_task(spool, "good")
    publish("good")
    wait_for(lambda: recorder.seen("good.json"), timeout=5, what="the next good message")
    assert recorder.names() == ["good.json"]


def test_a_flood_of_hostile_messages_logs_one_line_then_a_count(
    make_source, publish, redis_server: RedisServer, spool: Spool, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    interval = 0.5
    monkeypatch.setattr(redis_wake, "REFUSAL_LOG_INTERVAL", interval)
    source, _recorder, _ = make_source(redis_server.url)
    with caplog.at_level(logging.WARNING, logger="activation.listener"):
        started = time.monotonic()
        for _ in range(300):
            publish(b"/etc/passwd")
        wait_for(lambda: source.refusals.counts[rs.INVALID_NAME] == 300, timeout=30, what="300 refusals")
        took = time.monotonic() - started
        lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
        # The first, then at most one count per interval the flood lasted: one at most when it
        # takes under 0.5 s, a few when other tests share the cores and it takes seconds.
        assert len(lines) <= 2 + int(took / interval), (took, lines)
        # Once the interval is up, the rest are reported as a count even though the flood stopped.
        wait_for(
            lambda: any("(300 in all)" in r.getMessage() for r in caplog.records), timeout=20, what="the count line"
        )
    assert source.alive() and source.connected


def test_a_message_before_its_file_is_retried_then_picked_up(
    make_source, publish, redis_server: RedisServer, spool: Spool
) -> None:
    _source, recorder, _ = make_source(redis_server.url)
    publish("early")
    time.sleep(0.03)  # within the retry window (~1 s)
    write_task(spool, "early")
    wait_for(lambda: recorder.seen("early.json"), timeout=5, what="the retried message")
    assert recorder.names() == ["early.json"]


def test_a_message_for_a_file_that_never_comes_is_given_up_quietly(
    make_source, publish, redis_server: RedisServer, spool: Spool
) -> None:
    source, recorder, _ = make_source(redis_server.url)
    publish("phantom")
    wait_for(lambda: "phantom.json" in source._pending, timeout=5, what="the retry to be scheduled")
    wait_for(lambda: not source._pending, timeout=5, what="the retries to end")
    assert recorder.calls == [] and source.refusals.counts == {}
    # The subscriber was never blocked meanwhile.
    write_task(spool, "real")
    publish("real")
    wait_for(lambda: recorder.seen("real.json"), timeout=5)


def test_a_message_for_a_task_already_taken_is_not_retried(
    make_source, publish, redis_server: RedisServer, spool: Spool
) -> None:
    source, recorder, _ = make_source(redis_server.url)
    write_task(spool, "taken")
    assert spool.claim(WORKER, "taken") is not None  # the poll got there first
    publish("taken")
    write_task(spool, "marker")
    publish("marker")
    wait_for(lambda: recorder.seen("marker.json"), timeout=5)
    assert "taken.json" not in source._pending and not recorder.seen("taken.json")


def test_a_restart_of_redis_reconnects_and_asks_for_a_rescan(
    make_source, redis_server: RedisServer, spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="activation.listener"):
        source, recorder, rescans = make_source(redis_server.url, backoff_max=0.2)
        redis_server.stop()
        wait_for(lambda: not source.connected, timeout=10, what="the outage to be noticed")
        assert source.alive()  # an outage is not a death: the listener must not restart it
        assert source.status()["last_error"]
        time.sleep(1.0)  # several reconnect attempts at the 0.2 s cap
        redis_server.start()
        wait_for(lambda: source.connected, timeout=10, what="the resubscribe")
    assert rescans.count == 2
    assert source.status()["subscribes"] == 2 and source.status()["outages"] == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum("redis unreachable" in m for m in messages) == 1, messages  # once per outage
    assert sum("reachable again" in m for m in messages) == 1, messages
    client = redis.Redis.from_url(redis_server.url)
    try:
        write_task(spool, "after")
        assert client.publish(events.activate_channel(WORKER), "after") == 1
    finally:
        client.close()
    wait_for(lambda: recorder.seen("after.json"), timeout=5)


def test_a_subscription_dropped_again_and_again_backs_off(make_source, redis_server: RedisServer) -> None:
    source, _, rescans = make_source(redis_server.url, backoff_max=0.4)
    admin = redis.Redis.from_url(redis_server.url)
    try:
        for kills in range(1, 4):
            wait_for(lambda: source.connected, timeout=10, what="the resubscribe")
            admin.client_kill_filter(_type="pubsub")  # as an output-buffer limit would
            wait_for(lambda k=kills: source.outage.outages == k, timeout=10, what=f"outage {kills}")
    finally:
        admin.close()
    # A subscription that never lasted does not start the backoff over: the failures add up.
    assert source.outage.failures >= 3
    wait_for(lambda: source.connected, timeout=10, what="the last resubscribe")
    assert rescans.count == 4


def test_redis_unreachable_at_start_then_appearing(make_source, tmp_path: Path, spool: Spool) -> None:
    server = RedisServer(tmp_path / "late")  # a known free port, nothing listening yet
    source, recorder, rescans = make_source(server.url, connected=False, backoff_max=0.2)
    wait_for(lambda: source.status()["last_error"], timeout=5, what="the first failed connect")
    assert source.alive() and not source.connected and rescans.count == 0
    server.start()
    try:
        wait_for(lambda: source.connected, timeout=10, what="the late subscription")
        assert rescans.count == 1 and source.status()["last_error"] is None
        write_task(spool, "late")
        client = redis.Redis.from_url(server.url)
        try:
            client.publish(events.activate_channel(WORKER), "late")
        finally:
            client.close()
        wait_for(lambda: recorder.seen("late.json"), timeout=5)
    finally:
        source.stop()
        server.stop()


def test_stop_is_prompt_while_connected_and_while_down(make_source, redis_server: RedisServer, tmp_path: Path):
    up, _, _ = make_source(redis_server.url)
    down, _, _ = make_source(RedisServer(tmp_path / "never").url, connected=False, backoff_max=5)
    time.sleep(0.3)
    for source in (up, down):
        started = time.monotonic()
        source.stop()
        assert not source.alive()
        assert time.monotonic() - started < REDIS_JOIN_TIMEOUT
    assert not up.connected and not down.connected


def test_the_password_never_shows_in_errors_or_logs(tmp_path: Path, spool: Spool, caplog) -> None:
    server = RedisServer(tmp_path / "locked", password="s3cr3t-pw").start()
    try:
        wrong = f"redis://:wrong-pw-123@127.0.0.1:{server.port}/0"
        with caplog.at_level(logging.DEBUG):
            source = RedisSource(spool, WORKER, wrong, backoff_max=0.2)
            source.start(Recorder())
            try:
                wait_for(lambda: source.status()["last_error"], timeout=5, what="the refused AUTH")
                status = source.status()
                right = RedisSource(spool, WORKER, server.url, backoff_max=0.2)
                right.start(Recorder())
                try:
                    wait_for(lambda: right.connected, timeout=10)
                    shown = repr(status) + repr(right.status())
                finally:
                    right.stop()
            finally:
                source.stop()
        text = shown + "\n".join(r.getMessage() for r in caplog.records)
        assert "wrong-pw-123" not in text and "s3cr3t-pw" not in text
        assert status["url"] == f"redis://:***@127.0.0.1:{server.port}/0"
    finally:
        server.stop()


# -- the listener with a Redis source -----------------------------------------------------------


def run_listener(listener: Listener) -> threading.Thread:
    listener.initialize()

    def loop() -> None:
        while not listener.stopping.is_set():
            listener.loop()

    thread = threading.Thread(target=loop, name="listener-loop")
    thread.start()
    return thread


def stop_listener(listener: Listener, thread: threading.Thread) -> None:
    listener.request_stop()
    thread.join(5)
    listener.shutdown()


def test_listener_redis_mode_adds_polling_and_reports_redis(
    make_settings: Callable[..., Settings], tmp_path: Path, spool: Spool
) -> None:
    server = RedisServer(tmp_path / "r")  # down at start
    settings = make_settings(
        mode=("redis",), redis_url=server.url, poll_interval=0.05, rescan_interval=60, redis_backoff_max=0.2
    )
    listener = Listener(settings)
    thread = run_listener(listener)
    try:
        assert [s.name for s in listener.sources] == ["redis", "poll"]
        stats: dict[str, Any] = listener.stats()
        assert stats["redis"]["configured"] and not stats["redis"]["connected"]
        assert stats["sources"]["redis"] == {"alive": True}  # down, but not dead
        write_task(spool, "polled")  # the poll still delivers
        wait_for(lambda: "polled" in listener.work, timeout=5, what="the poll")
        server.start()
        wait_for(lambda: listener.stats()["redis"]["connected"], timeout=10, what="the subscription")
        wait_for(lambda: listener.stats()["rescans"] >= 2, timeout=5, what="the rescan after subscribing")
    finally:
        stop_listener(listener, thread)
        server.stop()
    assert not listener.stats()["redis"]["connected"]


def test_listener_rescans_after_a_resubscribe(
    make_settings: Callable[..., Settings], redis_server: RedisServer, spool: Spool
) -> None:
    # No file source and no periodic rescan within the test: only the resubscribe's rescan can
    # find a task written (and announced to nobody) during the outage.
    settings = make_settings(
        mode=("redis",), redis_url=redis_server.url, poll_interval=60, rescan_interval=60, redis_backoff_max=0.2
    )
    listener = Listener(settings)
    thread = run_listener(listener)
    try:
        wait_for(lambda: listener.stats()["redis"]["connected"], timeout=10)
        redis_server.stop()
        wait_for(lambda: not listener.stats()["redis"]["connected"], timeout=10)
        write_task(spool, "during-outage")
        time.sleep(0.2)
        assert "during-outage" not in listener.work
        redis_server.start()
        wait_for(lambda: "during-outage" in listener.work, timeout=10, what="the rescan after resubscribing")
        assert all(s.alive() for s in listener.sources)
    finally:
        stop_listener(listener, thread)


# -- done events (the executor's side) ----------------------------------------------------------


def test_done_events_are_published_and_an_outage_costs_nothing(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("activation.executor")
    client = redis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(events.done_channel(WORKER))
    done = DoneEvents(redis_server.url, WORKER, log)
    try:
        done.announce("t1")
        message = None
        deadline = time.monotonic() + 5
        while message is None and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=0.1)
        assert message is not None and message["data"] == b"t1"
        redis_server.stop()
        with caplog.at_level(logging.INFO, logger="activation.executor"):
            done.announce("t2")  # fails fast, never raises
            assert done.link.outage.down and not done.link.outage.ready()
            done.announce("t3")  # within the backoff: not even tried, so still one failure
            assert done.link.outage.failures == 1
            redis_server.start()
            wait_for(done.link.outage.ready, timeout=10, what="the backoff to pass")
            done.announce("t4")
        assert done.link.up
        messages = [r.getMessage() for r in caplog.records]
        assert sum("redis unreachable" in m for m in messages) == 1, messages
        assert sum("reachable again" in m for m in messages) == 1, messages
    finally:
        done.close()
        pubsub.close()
        client.close()
