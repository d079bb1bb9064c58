"""The streams transport's scripts against a real redis-server: each case by name."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
import redis

from activation.errors import DispatchError
from activation.transport.streams import client as streams
from activation.transport.streams.client import Delivery, StreamsTransport
from activation.transport.streams.keys import HANDBACK_CONSUMER, ORCHESTRATOR_GROUP, StreamKeys, consumer_name
from tests.conftest import wait_for

WORKER = "marie"
KEYS = StreamKeys(WORKER)
LEASE = 0.2  # seconds: short, because expiry is waited for (by polling Redis), never slept


@pytest.fixture
def make(client: redis.Redis) -> Callable[..., StreamsTransport]:
    """A transport for one consumer of WORKER (a replica, as far as Redis can tell)."""

    def build(consumer: str, **options: Any) -> StreamsTransport:
        options.setdefault("lease", LEASE)
        return StreamsTransport(client, WORKER, consumer=consumer, **options)

    return build


def task(task_id: str) -> dict[str, str]:
    return {"task_id": task_id, "description": f"do {task_id}"}


def pending(client: redis.Redis) -> list[dict[str, Any]]:
    return list(client.xpending_range(KEYS.tasks, KEYS.group, "-", "+", 1000))


def wait_lapsed(client: redis.Redis, delivery: Delivery, lease: float = LEASE) -> None:
    """Wait, on Redis's clock, until the entry has been idle past the lease."""

    def lapsed() -> bool:
        entries = client.xpending_range(KEYS.tasks, KEYS.group, delivery.entry_id, delivery.entry_id, 1)
        return bool(entries) and entries[0]["time_since_delivered"] >= lease * 1000

    wait_for(lapsed, 10, 0.01, f"{delivery.entry_id} idle past the lease")


def results_of(client: redis.Redis, task_id: str) -> list[dict[str, str]]:
    return [fields for _id, fields in client.xrange(KEYS.results) if fields["task_id"] == task_id]


# -- dispatch ---------------------------------------------------------------------------------


def test_dispatching_the_same_task_id_twice_gives_one_entry(make, client):
    orchestrator = make("orchestrator")
    first = orchestrator.dispatch("t1", task("t1"))
    second = orchestrator.dispatch("t1", task("t1"))
    assert (first.status, second.status) == (streams.QUEUED, streams.DUPLICATE)
    assert second.entry_id == first.entry_id and second.state == "queued"
    assert client.xlen(KEYS.tasks) == 1


@pytest.mark.parametrize(
    ("task_id", "payload", "message"),
    [
        ("../etc", {"task_id": "../etc", "description": "x"}, "does not match"),
        ("big", {"task_id": "big", "description": "x" * (1024 * 1024)}, "larger than"),
    ],
)
def test_an_invalid_id_or_an_oversized_task_is_refused_before_anything_is_sent(make, client, task_id, payload, message):
    with pytest.raises(DispatchError, match=message):
        make("orchestrator").dispatch(task_id, payload)
    assert not client.exists(KEYS.tasks) and not client.exists(KEYS.task(task_id))


def test_a_completed_task_id_is_not_dispatched_again(make, client):
    orchestrator, replica = make("orchestrator"), make("a")
    orchestrator.dispatch("t1", task("t1"))
    delivery = replica.receive(0)
    assert replica.complete(delivery, {"exit_code": 0}).status == streams.DONE
    again = orchestrator.dispatch("t1", task("t1"))
    assert (again.status, again.state) == (streams.DUPLICATE, "done")
    assert client.xlen(KEYS.tasks) == 0 and replica.receive(0) is None


def test_a_queued_task_id_whose_entry_was_lost_is_sent_again(make, client):
    orchestrator = make("orchestrator")
    first = orchestrator.dispatch("t1", task("t1"))
    client.xdel(KEYS.tasks, first.entry_id)
    again = orchestrator.dispatch("t1", task("t1"))
    assert again.status == streams.QUEUED and again.entry_id != first.entry_id
    assert orchestrator.dispatch("t1", task("t1")).status == streams.DUPLICATE
    assert client.xlen(KEYS.tasks) == 1


def test_the_task_stream_is_never_trimmed_by_length(make, client):
    orchestrator = make("orchestrator")
    for n in range(2000):
        orchestrator.dispatch(f"t{n}", task(f"t{n}"))
    assert client.xlen(KEYS.tasks) == 2000


def test_all_keys_of_a_worker_share_one_hash_tag():
    names = [KEYS.tasks, KEYS.results, KEYS.dead, KEYS.task("t1")]
    assert {name[: name.index("}") + 1] for name in names} == {"{activation:marie}"}
    assert KEYS.group == WORKER


# -- receiving --------------------------------------------------------------------------------


def test_a_process_started_again_under_the_same_host_gets_another_consumer_name():
    code = "from activation.transport.streams.keys import consumer_name; print(consumer_name(host='box'))"
    names = {
        subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
        for _ in range(2)
    }
    assert len(names) == 2 and consumer_name(host="box") not in names


def test_receive_takes_one_entry_at_a_time_with_no_prefetch(make, client):
    orchestrator, replica = make("orchestrator"), make("a")
    for n in range(3):
        orchestrator.dispatch(f"t{n}", task(f"t{n}"))
    delivery = replica.receive(0)
    assert delivery is not None and delivery.task_id == "t0" and delivery.attempt == 1
    assert json.loads(delivery.task) == task("t0")
    assert [(p["message_id"], p["consumer"]) for p in pending(client)] == [(delivery.entry_id, "a")]


def test_receive_waits_for_a_new_entry_and_returns_none_when_there_is_none(make):
    assert make("a").receive(0.05) is None


# -- leases -----------------------------------------------------------------------------------


def test_renew_resets_the_idle_time_without_counting_a_delivery(make, client):
    make("orchestrator").dispatch("t1", task("t1"))
    replica = make("a", lease=30)
    delivery = replica.receive(0)
    wait_for(lambda: pending(client)[0]["time_since_delivered"] >= 20, 5, 0.005, "some idle time")
    assert replica.renew(delivery).status == streams.RENEWED
    entry = pending(client)[0]
    assert entry["time_since_delivered"] < 20 and entry["times_delivered"] == 1 and entry["consumer"] == "a"


def test_renew_is_refused_after_another_consumer_claimed(make, client):
    make("orchestrator").dispatch("t1", task("t1"))
    a, b = make("a"), make("b")
    held = a.receive(0)
    wait_lapsed(client, held)
    taken = b.receive(0)
    assert taken is not None and taken.entry_id == held.entry_id and taken.attempt == 2
    assert taken.previous_owner == "a"
    verdict = a.renew(held)
    assert (verdict.status, verdict.reason) == (streams.REFUSED, "not_holder")
    assert "b holds" in verdict.detail


def test_renew_is_refused_once_the_lease_lapsed_even_if_nobody_took_it(make, client):
    make("orchestrator").dispatch("t1", task("t1"))
    a = make("a")
    held = a.receive(0)
    wait_lapsed(client, held)
    verdict = a.renew(held)
    assert (verdict.status, verdict.reason) == (streams.REFUSED, "expired")


# -- completion -------------------------------------------------------------------------------


def test_completion_records_the_result_and_retires_the_entry(make, client):
    make("orchestrator").dispatch("t1", task("t1"))
    a = make("a")
    delivery = a.receive(0)
    verdict = a.complete(delivery, {"exit_code": 0, "output": "fine"})
    assert verdict.status == streams.DONE
    assert client.xlen(KEYS.tasks) == 0 and pending(client) == []
    [result] = results_of(client, "t1")
    assert json.loads(result["result"]) == {"exit_code": 0, "output": "fine"}
    assert (result["consumer"], result["deliveries"], result["entry"]) == ("a", "1", delivery.entry_id)
    record = a.task_record("t1")
    assert record["state"] == "done" and record["result_entry"] == verdict.detail
    assert client.pttl(KEYS.task("t1")) > 0  # kept for the retention, then the id may run again


def test_a_late_completion_is_refused_after_another_consumer_took_the_lease(make, client):
    make("orchestrator").dispatch("t1", task("t1"))
    a, b = make("a"), make("b")
    late = a.receive(0)
    wait_lapsed(client, late)
    current = b.receive(0)
    verdict = a.complete(late, {"exit_code": 0, "by": "a"})
    assert (verdict.status, verdict.reason) == (streams.REFUSED, "not_holder")
    assert results_of(client, "t1") == [] and client.xlen(KEYS.tasks) == 1
    assert b.complete(current, {"exit_code": 0, "by": "b"}).status == streams.DONE
    late_again = a.complete(late, {"exit_code": 0, "by": "a"})
    assert (late_again.status, late_again.reason) == (streams.REFUSED, "done_by_other")
    assert [json.loads(r["result"])["by"] for r in results_of(client, "t1")] == ["b"]


def test_an_identical_retry_of_a_completion_says_already_done(make, client):
    make("orchestrator").dispatch("t1", task("t1"))
    a = make("a")
    delivery = a.receive(0)
    first = a.complete(delivery, {"exit_code": 0})
    retry = a.complete(delivery, {"exit_code": 0})
    assert (first.status, retry.status) == (streams.DONE, streams.ALREADY_DONE)
    assert retry.detail == first.detail and len(results_of(client, "t1")) == 1


def test_a_different_result_from_the_same_holder_after_completion_is_refused(make, client):
    make("orchestrator").dispatch("t1", task("t1"))
    a = make("a")
    delivery = a.receive(0)
    a.complete(delivery, {"exit_code": 0})
    verdict = a.complete(delivery, {"exit_code": 1})
    assert (verdict.status, verdict.reason) == (streams.REFUSED, "done_by_other")
    assert len(results_of(client, "t1")) == 1


def test_a_completion_for_another_task_id_is_refused(make, client):
    orchestrator, a = make("orchestrator"), make("a")
    orchestrator.dispatch("t1", task("t1"))
    delivery = a.receive(0)
    forged = Delivery(delivery.entry_id, "t2", delivery.task, delivery.token)
    assert a.complete(forged, {"exit_code": 0}).reason == "wrong_task"
    assert client.xlen(KEYS.tasks) == 1 and a.task_record("t2") == {}


# -- reclaim and dead letter ------------------------------------------------------------------


def test_exactly_one_of_three_concurrent_reclaimers_wins_each_entry(make, client, redis_server):
    # The holder's lease is long: with the short one, a slow loop re-claims what it already holds.
    orchestrator, dead = make("orchestrator"), make("dead", lease=600)
    held = []
    for n in range(60):
        orchestrator.dispatch(f"t{n}", task(f"t{n}"))
        held.append(dead.receive(0))
    assert len({d.entry_id for d in held}) == 60, "the holder received one entry twice"
    # Age every entry past a 30 s lease at once (no delivery counted), so that no entry a
    # reclaimer has just won can lapse again while the others are still claiming.
    client.xclaim(KEYS.tasks, KEYS.group, "dead", 0, [d.entry_id for d in held], idle=60_000, justid=True)
    connections = [redis.Redis.from_url(redis_server.url, decode_responses=True) for _ in range(3)]
    reclaimers = [StreamsTransport(c, WORKER, consumer=f"r{n}", lease=30) for n, c in enumerate(connections)]
    won: dict[str, list[str]] = {r.consumer: [] for r in reclaimers}
    start = threading.Barrier(3)

    failed: dict[str, BaseException] = {}

    def reclaim(reclaimer: StreamsTransport) -> None:
        start.wait()
        try:
            while (delivery := reclaimer.claim()) is not None:
                won[reclaimer.consumer].append(delivery.entry_id)
        except BaseException as exc:  # shown in the assertion below, not lost in a thread's stderr
            failed[reclaimer.consumer] = exc

    threads = [threading.Thread(target=reclaim, args=(r,)) for r in reclaimers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)  # each claim is one script; a loaded disk (Redis's AOF fsync) slows them all
    assert not any(thread.is_alive() for thread in threads), f"reclaimers still claiming: {won}"
    for connection in connections:
        connection.close()
    assert not failed, f"a reclaimer raised: {failed!r}"
    claimed = [entry for entries in won.values() for entry in entries]
    assert sorted(claimed) == sorted(d.entry_id for d in held)  # each entry once, none lost
    owners = {p["message_id"]: (p["consumer"], p["times_delivered"]) for p in pending(client)}
    for consumer, entries in won.items():
        assert all(owners[entry] == (consumer, 2) for entry in entries)


def test_an_entry_at_max_deliveries_goes_to_the_dead_letter_and_leaves_stream_and_pending_list(make, client):
    make("orchestrator").dispatch("poison", task("poison"))
    a, b, c = make("a", max_attempts=2), make("b", max_attempts=2), make("c", max_attempts=2)
    first = a.receive(0)
    wait_lapsed(client, first)
    second = b.receive(0)
    assert second.attempt == 2
    wait_lapsed(client, second)
    assert c.receive(0) is None  # nothing left to run: it went to the dead letter on the way
    assert client.xlen(KEYS.tasks) == 0 and pending(client) == []
    [(_id, dead)] = client.xrange(KEYS.dead)
    assert json.loads(dead["task"]) == task("poison")
    assert (dead["task_id"], dead["deliveries"], dead["last_owner"]) == ("poison", "2", "b")
    assert dead["reason"].startswith("max_deliveries")
    assert a.task_record("poison")["state"] == "dead"
    verdict = b.complete(second, {"exit_code": 0})
    assert verdict.status == streams.REFUSED


def test_a_holder_can_dead_letter_its_own_entry_with_a_reason(make, client):
    make("orchestrator").dispatch("t1", task("t1"))
    a = make("a")
    delivery = a.receive(0)
    assert a.dead_letter(delivery, "invalid_json: not a task").status == streams.DEAD
    [(_id, dead)] = client.xrange(KEYS.dead)
    assert (dead["reason"], dead["last_owner"], dead["deliveries"]) == ("invalid_json: not a task", "a", "1")
    assert client.xlen(KEYS.tasks) == 0 and pending(client) == []


def test_a_dead_lettered_task_id_goes_again_only_when_asked(make, client):
    orchestrator, a = make("orchestrator"), make("a")
    orchestrator.dispatch("t1", task("t1"))
    a.dead_letter(a.receive(0), "bad")
    assert orchestrator.dispatch("t1", task("t1")).status == streams.DUPLICATE
    again = orchestrator.dispatch("t1", task("t1"), allow_dead=True)
    assert (again.status, again.state) == (streams.QUEUED, "queued")
    assert a.receive(0).attempt == 1


# -- hand-back on drain -----------------------------------------------------------------------


def test_a_handed_back_task_is_taken_at_once_by_a_blocked_reader_and_counts_no_delivery(make, client, redis_server):
    make("orchestrator").dispatch("t1", task("t1"))
    a = make("a", lease=120)
    held = a.receive(0)
    connection = redis.Redis.from_url(redis_server.url, decode_responses=True)
    b = StreamsTransport(connection, WORKER, consumer="b", lease=120)
    taken: list[Delivery | None] = []
    reader = threading.Thread(target=lambda: taken.append(b.receive(streams.MAX_BLOCK)))
    reader.start()
    wait_for(lambda: _blocked(client), 5, 0.01, "b blocked on the stream")
    assert a.hand_back(held).status == streams.HANDED_BACK
    reader.join(10)
    connection.close()
    # Within one blocking read of 5 s, far less than the 120 s lease: taken because it was nudged.
    [delivery] = taken
    assert delivery is not None and delivery.entry_id == held.entry_id
    assert delivery.attempt == 1 and delivery.previous_owner == HANDBACK_CONSUMER
    assert [(p["consumer"], p["times_delivered"]) for p in pending(client)] == [("b", 1)]
    assert client.xlen(KEYS.tasks) == 1  # the nudge is gone, the task entry stays until completed
    assert a.complete(held, {"exit_code": 0}).status == streams.REFUSED
    assert b.complete(delivery, {"exit_code": 0}).status == streams.DONE


def _blocked(client: redis.Redis) -> bool:
    return any(c.get("cmd") == "xreadgroup" and c.get("flags", "").find("b") >= 0 for c in client.client_list())


def test_a_task_handed_back_at_its_last_delivery_still_runs_once_more(make, client):
    make("orchestrator").dispatch("t1", task("t1"))
    a, b = make("a", max_attempts=1), make("b", max_attempts=1)
    held = a.receive(0)
    assert a.hand_back(held).status == streams.HANDED_BACK
    delivery = b.receive(0)
    assert delivery is not None and delivery.attempt == 1
    assert client.xlen(KEYS.dead) == 0


def test_hand_back_is_refused_for_a_token_that_no_longer_holds(make, client):
    make("orchestrator").dispatch("t1", task("t1"))
    a, b = make("a"), make("b")
    held = a.receive(0)
    wait_lapsed(client, held)
    b.receive(0)
    verdict = a.hand_back(held)
    assert (verdict.status, verdict.reason) == (streams.REFUSED, "not_holder")
    assert [(p["consumer"], p["times_delivered"]) for p in pending(client)] == [("b", 2)]


# -- consumers --------------------------------------------------------------------------------


def test_idle_consumers_are_removed_only_once_they_hold_nothing_pending(make, client):
    orchestrator = make("orchestrator")
    for n in range(3):
        orchestrator.dispatch(f"t{n}", task(f"t{n}"))
    holder, idle, me = make("holder"), make("idle"), make("me")
    holder.receive(0)  # holds t0, and goes quiet (a stalled or dead replica)
    idle.complete(idle.receive(0), {"exit_code": 0})  # did its work and left
    me.complete(me.receive(0), {"exit_code": 0})

    def consumers() -> dict[str, int]:
        return {c["name"]: c["pending"] for c in client.xinfo_consumers(KEYS.tasks, KEYS.group)}

    wait_for(lambda: all(c["idle"] > 50 for c in client.xinfo_consumers(KEYS.tasks, KEYS.group)), 5, 0.01, "idle")
    assert me.prune_consumers(0.05) == ["idle"]
    assert consumers() == {"holder": 1, "me": 0}


# -- Redis restarted without persistence ------------------------------------------------------


def test_after_a_restart_without_persistence_the_groups_are_recreated_at_0(make, client, redis_server):
    orchestrator, a = make("orchestrator"), make("a")
    orchestrator.dispatch("t1", task("t1"))
    a.receive(0)
    redis_server.restart()  # the fixture's server has no persistence: streams and groups are gone
    assert a.receive(0) is None  # NOGROUP, answered by recreating the groups
    groups = {g["name"]: g["last-delivered-id"] for g in client.xinfo_groups(KEYS.tasks)}
    assert groups == {WORKER: "0-0"}
    assert {g["name"] for g in client.xinfo_groups(KEYS.results)} == {ORCHESTRATOR_GROUP}
    assert orchestrator.dispatch("t1", task("t1")).status == streams.QUEUED  # the outbox re-sends
    assert a.receive(0).task_id == "t1"


def test_a_holder_whose_entry_was_lost_in_a_restart_is_refused(make, client, redis_server):
    make("orchestrator").dispatch("t1", task("t1"))
    a = make("a")
    held = a.receive(0)
    redis_server.restart()
    verdict = a.complete(held, {"exit_code": 0})
    assert (verdict.status, verdict.reason) == (streams.REFUSED, "not_pending")


# -- results and dead letters for the orchestrator --------------------------------------------


def test_the_orchestrator_reads_each_result_until_it_acknowledges_it(make):
    orchestrator, a = make("orchestrator"), make("a")
    orchestrator.ensure_groups()
    for n in range(3):
        orchestrator.dispatch(f"t{n}", task(f"t{n}"))
        a.complete(a.receive(0), {"exit_code": n})
    first = orchestrator.read_results()
    assert [o.task_id for o in first] == ["t0", "t1", "t2"]
    assert [o.task_id for o in orchestrator.read_results()] == ["t0", "t1", "t2"]  # not acked yet
    orchestrator.ack_results([o.stream_id for o in first[:2]])
    assert [o.task_id for o in orchestrator.read_results()] == ["t2"]
    orchestrator.ack_results([first[2].stream_id])
    assert orchestrator.read_results() == []


def test_results_and_dead_letters_are_trimmed_by_age(make, client):
    orchestrator = make("orchestrator")
    a = make("a", retention=0.3)
    orchestrator.dispatch("old", task("old"))
    orchestrator.dispatch("bad", task("bad"))
    a.complete(a.receive(0), {"exit_code": 0})
    a.dead_letter(a.receive(0), "bad")
    [(old_id, _)] = client.xrange(KEYS.results)
    [(bad_id, _)] = client.xrange(KEYS.dead)

    def redis_ms() -> int:
        seconds, micros = client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    newest = max(int(old_id.split("-")[0]), int(bad_id.split("-")[0]))
    wait_for(lambda: redis_ms() > newest + 300, 5, 0.01, "Redis's clock past the retention of both")
    orchestrator.dispatch("new", task("new"))
    orchestrator.dispatch("worse", task("worse"))
    a.complete(a.receive(0), {"exit_code": 0})
    a.dead_letter(a.receive(0), "worse")
    assert [f["task_id"] for _id, f in client.xrange(KEYS.results)] == ["new"]
    assert [f["task_id"] for _id, f in client.xrange(KEYS.dead)] == ["worse"]


# -- leases kept by the executor's loop -------------------------------------------------------


def test_a_lease_kept_by_the_executor_loop_outlives_the_lease_and_a_stalled_one_is_lost(make, client):
    import time

    from activation.transport.streams.lease import LeaseKeeper

    make("orchestrator").dispatch("t1", task("t1"))
    lease = 2.0
    a, b = make("a", lease=lease), make("b", lease=lease)
    sent = time.monotonic()
    held = a.receive(0)
    keeper = LeaseKeeper(lambda: a.renew(held), lease, held_since=sent, task_id="t1")

    def kept_past_the_lease() -> bool:
        assert keeper.should_abort() is False  # the supervise loop's tick
        return time.monotonic() - sent > 1.5 * lease and keeper.renewals >= 4

    wait_for(kept_past_the_lease, 20, 0.02, "renewals past the lease")
    assert [(p["consumer"], p["times_delivered"]) for p in pending(client)] == [("a", 1)]
    assert b.claim() is None
    # The executor stalls (SIGSTOP): no more ticks. The lease lapses on Redis, b takes it over.
    wait_lapsed(client, held, lease)
    taken = b.claim()
    assert taken is not None and taken.attempt == 2
    assert keeper.should_abort() is True  # woken up (SIGCONT): kill the agent, submit nothing
    assert a.complete(held, {"exit_code": 0}).status == streams.REFUSED


# -- heartbeats -------------------------------------------------------------------------------


def test_each_replica_has_one_heartbeat_that_expires_with_its_ttl(make, client):
    a, b = make("a"), make("b")
    a.beat({"state": "idle"}, ttl=30)
    b.beat({"state": "busy", "task_id": "t1"}, ttl=0.2)
    a.beat({"state": "busy", "task_id": "t2"}, ttl=30)  # a replaces its own, never adds one
    assert a.replicas() == {"a": {"state": "busy", "task_id": "t2"}, "b": {"state": "busy", "task_id": "t1"}}
    wait_for(lambda: set(a.replicas()) == {"a"}, 5, 0.02, "b's heartbeat to expire")
    assert client.ttl(KEYS.replica("a")) > 0
    a.leave()
    assert a.replicas() == {} and not client.exists(KEYS.replica("a"))


def test_a_renewal_against_a_hung_redis_fails_within_the_socket_timeout_instead_of_hanging(redis_server):
    import signal

    from activation.config import load_settings
    from activation.errors import StreamsError
    from activation.transport.streams.connect import connect

    settings = load_settings(env={"REDIS_URL": redis_server.url})
    keeper_client = connect(settings, socket_timeout=0.3)
    transport = StreamsTransport(keeper_client, WORKER, consumer="a", lease=30)
    transport.dispatch("t1", task("t1"))
    held = transport.receive(0)
    assert redis_server.process is not None
    redis_server.process.send_signal(signal.SIGSTOP)  # a cut network: no answer, no error
    try:
        with pytest.raises(StreamsError, match=r"[Tt]imeout"):
            transport.renew(held)
    finally:
        redis_server.process.send_signal(signal.SIGCONT)
        keeper_client.close()
