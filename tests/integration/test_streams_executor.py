"""The executor in streams mode against a real redis-server, without supervisord: what it settles at
start (a predecessor's claims, saved outcomes, inbox files) and what it refuses to run."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis

from activation.config import Settings
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool
from activation.spool.outcome import outcome_path
from activation.transport.streams.client import Delivery, StreamsTransport
from activation.transport.streams.inbox import task_of
from activation.transport.streams.keys import HANDBACK_CONSUMER, StreamKeys
from activation.worker.executor import Executor
from activation.worker.stream_feed import StreamFeed
from tests.conftest import WORKER, wait_for
from tests.harness import RedisServer

KEYS = StreamKeys(WORKER)
SHORT = 0.3  # seconds: a lease that lapses while the test waits on Redis's clock
LONG = 60.0  # a lease that cannot lapse during a test: what happens, happens at once


@pytest.fixture
def transport(client: redis.Redis) -> Callable[..., StreamsTransport]:
    def make(consumer: str, lease: float = LONG) -> StreamsTransport:
        made = StreamsTransport(client, WORKER, consumer=consumer, lease=lease)
        made.ensure_groups()
        return made

    return make


@pytest.fixture
def executor(make_settings: Callable[..., Settings], redis_server: RedisServer) -> Callable[..., Executor]:
    """An executor of WORKER in streams mode whose replica name is ``consumer``."""
    made: list[Executor] = []

    def make(consumer: str, lease: float = LONG) -> Executor:
        settings = make_settings(transport="streams", redis_url=redis_server.url, lease=lease, kill_grace=0.1)
        ex = Executor(settings)
        feed = StreamFeed(settings, ex.spool, ex.log, ex.condition, consumer=consumer)
        ex._feed = ex._finisher.feed = ex._recovery.feed = feed  # recovery and finishing use the feed too
        made.append(ex)
        return ex

    yield make
    for ex in made:
        assert ex._feed is not None
        ex._feed.close()


def dispatched(transport: Callable[..., StreamsTransport], task_id: str) -> None:
    transport("orchestrator").dispatch(task_id, {"task_id": task_id, "description": "x"})


def claimed_by_predecessor(spool: Spool, delivery: Delivery, *, outcome: bool = False) -> dict[str, Any]:
    """What a killed executor leaves: the delivery as its claim, and, if its run ended, the saved outcome."""
    task = task_of(delivery)
    atomic_write_json(spool.claim_path(WORKER, delivery.task_id), task)
    result = {"task_id": delivery.task_id, "worker": WORKER, "status": "completed", "metadata": task["metadata"]}
    if outcome:
        atomic_write_json(outcome_path(spool, WORKER, delivery.task_id), result)
    return result


def results(client: redis.Redis) -> list[dict[str, str]]:
    return [fields for _id, fields in client.xrange(KEYS.results)]


def lapsed(client: redis.Redis, delivery: Delivery) -> bool:
    entries = client.xpending_range(KEYS.tasks, KEYS.group, delivery.entry_id, delivery.entry_id, 1)
    return bool(entries) and entries[0]["time_since_delivered"] >= SHORT * 1000


def settle_held(ex: Executor) -> None:
    wait_for(lambda: (ex.loop(), not ex._finisher.held)[1], 20, 0.01, "the held results completed and written")


def test_a_saved_outcome_is_completed_at_start_with_its_token_and_the_agent_does_not_run_again(
    spool, client, transport, executor
):
    dispatched(transport, "t1")
    delivery = transport("old-tree").receive(0)
    assert delivery is not None
    claimed_by_predecessor(spool, delivery, outcome=True)
    ex = executor("new-tree")
    ex.recover()
    settle_held(ex)
    [result] = results(client)
    assert result["consumer"] == "old-tree" and json.loads(result["result"])["task_id"] == "t1"
    assert read_json(spool.result_path(WORKER, "t1"))["status"] == "completed"
    assert not spool.claim_path(WORKER, "t1").exists() and not outcome_path(spool, WORKER, "t1").exists()
    assert client.xlen(KEYS.tasks) == 0


def test_a_predecessors_late_completion_is_refused_and_kept_locally_marked(spool, client, transport, executor):
    dispatched(transport, "t1")
    delivery = transport("old-tree", SHORT).receive(0)
    assert delivery is not None
    claimed_by_predecessor(spool, delivery, outcome=True)
    wait_for(lambda: lapsed(client, delivery), 10, 0.01, "the predecessor's lease lapsed")
    other = transport("other-host", SHORT)
    taken = other.receive(0)
    assert taken is not None and taken.attempt == 2
    assert other.complete(taken, {"task_id": "t1", "by": "other-host"}).ok
    ex = executor("new-tree", SHORT)
    ex.recover()
    settle_held(ex)
    [result] = results(client)
    assert result["consumer"] == "other-host"  # the role's result; the late one is not on the stream
    local = read_json(spool.result_path(WORKER, "t1"))
    assert local["metadata"]["stream"]["refused"].startswith("done_by_other")
    assert not spool.claim_path(WORKER, "t1").exists() and not outcome_path(spool, WORKER, "t1").exists()


def test_a_run_cut_short_by_a_crash_goes_back_at_once_with_its_delivery_counted(spool, client, transport, executor):
    dispatched(transport, "t1")
    delivery = transport("old-tree").receive(0)
    assert delivery is not None
    claimed_by_predecessor(spool, delivery)
    executor("new-tree").recover()
    assert not spool.claim_path(WORKER, "t1").exists()
    taken = transport("other-host").receive(0)  # the lease (60 s) has not lapsed: no wait was needed
    assert taken is not None and taken.attempt == 2 and taken.previous_owner == HANDBACK_CONSUMER


def test_a_predecessors_task_left_in_the_inbox_goes_back_uncounted_and_does_not_run_here(
    spool, client, transport, executor
):
    dispatched(transport, "t1")
    delivery = transport("old-tree").receive(0)
    assert delivery is not None
    atomic_write_json(spool.task_path(WORKER, "t1"), task_of(delivery))
    assert executor("new-tree").process("t1") is None
    assert not spool.task_path(WORKER, "t1").exists() and not spool.has_result(WORKER, "t1")
    taken = transport("other-host").receive(0)
    assert taken is not None and taken.attempt == 1


def test_a_task_whose_lease_another_replica_took_is_dropped_without_running(spool, client, transport, executor):
    dispatched(transport, "t1")
    ex = executor("this-tree", SHORT)
    assert ex._feed is not None
    delivery = ex._feed.take(0)
    assert delivery is not None and spool.task_path(WORKER, "t1").exists()
    wait_for(lambda: lapsed(client, delivery), 10, 0.01, "the lease lapsed")
    taken = transport("other-host", SHORT).receive(0)
    assert taken is not None
    assert ex.process("t1", source="streams") is None
    assert not spool.claim_path(WORKER, "t1").exists() and not spool.has_result(WORKER, "t1")
    assert results(client) == []  # nothing submitted; the other host's delivery holds the task


class EmptyQueue:
    """The listener's work queue with nothing in it."""

    def get(self, timeout: float) -> None:
        return None

    def close(self) -> None:
        pass


def test_a_task_sent_again_after_it_ran_here_is_completed_with_its_local_result_not_run_again(
    spool, client, transport, executor
):
    spool.write_result(WORKER, {"task_id": "t1", "worker": WORKER, "status": "completed", "stdout": "ran once"})
    dispatched(transport, "t1")  # the orchestrator re-sending what Redis lost
    ex = executor("this-tree")
    ex._client = EmptyQueue()
    assert ex._feed is not None
    ex._streams_step(ex._feed)
    [result] = results(client)
    assert json.loads(result["result"])["stdout"] == "ran once" and result["consumer"] == "this-tree"
    assert not spool.task_path(WORKER, "t1").exists() and client.xlen(KEYS.tasks) == 0


def test_an_entry_just_taken_starts_without_a_renewal_round_trip_and_its_keeper_renews_later(
    spool, client, transport, executor, monkeypatch
):
    renewals: list[str] = []
    real_renew = StreamsTransport.renew

    def counted(self: StreamsTransport, delivery: Delivery) -> Any:
        renewals.append(delivery.task_id)
        return real_renew(self, delivery)

    monkeypatch.setattr(StreamsTransport, "renew", counted)
    dispatched(transport, "fresh-1")
    ex = executor("this-tree")
    assert ex._feed is not None
    delivery = ex._feed.take(0)
    assert delivery is not None
    claim = spool.claim(WORKER, "fresh-1")
    assert claim is not None
    keeper = ex._feed.hold(read_json(claim))
    assert not isinstance(keeper, str) and renewals == []  # the lease it was just given is enough
    # The keeper's schedule still checks the token: at its first due time it renews, on Redis.
    keeper._next = 0.0
    assert keeper.should_abort() is False and renewals == ["fresh-1"] and keeper.renewals == 1
    # A delivery that is not the one just taken (a predecessor's, or one taken a while ago) is
    # renewed before it runs, as before.
    dispatched(transport, "older-1")
    later = ex._feed.take(0)
    assert later is not None
    ex._feed._fresh = (later, 0.0)  # taken long ago, as far as the monotonic clock goes
    second = spool.claim(WORKER, "older-1")
    assert second is not None
    assert not isinstance(ex._feed.hold(read_json(second)), str) and renewals == ["fresh-1", "older-1"]
