"""The streams transport on a real three-master Redis Cluster, and through a real Sentinel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from activation.config import load_settings
from activation.errors import StreamsError
from activation.transport.streams import client as streams
from activation.transport.streams import scripts
from activation.transport.streams.client import StreamsTransport
from activation.transport.streams.connect import connect
from activation.transport.streams.keys import StreamKeys
from tests.conftest import wait_for
from tests.redis_topologies import RedisClusterOfThree, SentinelSet

LEASE = 0.2


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisClusterOfThree]:
    topology = RedisClusterOfThree(tmp_path / "cluster")
    try:
        yield topology.start()
    finally:
        topology.stop()


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    topology = SentinelSet(tmp_path / "sentinel")
    try:
        yield topology.start()
    finally:
        topology.stop()


def workers_on_every_master(cluster: RedisClusterOfThree) -> list[str]:
    """One worker name per master, so every node serves some role's scripts."""
    found: dict[int, str] = {}
    for n in range(200):
        name = f"w{n}"
        found.setdefault(cluster.port_of_slot(key_slot(StreamKeys(name).tasks.encode())), name)
        if len(found) == 3:
            return sorted(found.values())
    raise AssertionError("no worker names spread over the three masters")


def exercise_every_script(client: redis.Redis | RedisCluster, worker: str) -> None:
    """Run each script of the transport through its client method, checking each answer."""
    keys = StreamKeys(worker)
    orchestrator = StreamsTransport(client, worker, consumer="orchestrator", lease=LEASE, max_attempts=2)
    a = StreamsTransport(client, worker, consumer="a", lease=LEASE, max_attempts=2)
    b = StreamsTransport(client, worker, consumer="b", lease=LEASE, max_attempts=2)
    orchestrator.ensure_groups()
    a.beat({"state": "idle"}, ttl=30)
    assert a.replicas() == {"a": {"state": "idle"}}
    a.leave()
    assert a.replicas() == {}
    assert orchestrator.dispatch("t1", {"task_id": "t1"}).status == streams.QUEUED
    assert orchestrator.dispatch("t1", {"task_id": "t1"}).status == streams.DUPLICATE
    orchestrator.dispatch("t2", {"task_id": "t2"})
    orchestrator.dispatch("t3", {"task_id": "t3"})

    held = a.receive(0.1)
    assert held is not None and held.task_id == "t1"
    assert a.renew(held).status == streams.RENEWED
    assert a.hand_back(held).status == streams.HANDED_BACK
    taken = b.receive(0.1)  # the claim script takes the handed-back entry, the drop script its nudge
    assert taken is not None and (taken.task_id, taken.attempt) == ("t1", 1)
    assert b.complete(taken, {"exit_code": 0}).status == streams.DONE
    assert b.complete(taken, {"exit_code": 0}).status == streams.ALREADY_DONE

    bad = a.receive(0.1)
    assert bad is not None and bad.task_id == "t2"
    assert a.dead_letter(bad, "invalid_json").status == streams.DEAD

    stalled = a.receive(0.1)
    assert stalled is not None and stalled.task_id == "t3"

    def idle_past_lease() -> bool:
        entries = client.xpending_range(keys.tasks, keys.group, stalled.entry_id, stalled.entry_id, 1)
        return bool(entries) and entries[0]["time_since_delivered"] >= LEASE * 1000

    wait_for(idle_past_lease, 10, 0.01, "t3 idle past the lease")
    reclaimed = b.claim()
    assert reclaimed is not None and reclaimed.attempt == 2
    wait_for(lambda: b.claim() is None and client.xlen(keys.dead) == 2, 10, 0.02, "t3 in the dead letter")
    removed: set[str] = set()
    wait_for(lambda: removed.update(a.prune_consumers(0)) or removed == {"b", "handback"}, 5, 0.01, "pruned")
    assert [c["name"] for c in client.xinfo_consumers(keys.tasks, keys.group)] == ["a"]

    results = orchestrator.read_results()
    assert [json.loads(o.fields["result"]) for o in results] == [{"exit_code": 0}]
    orchestrator.ack_results([o.stream_id for o in results])
    dead = orchestrator.read_dead_letters()
    assert [o.task_id for o in dead] == ["t2", "t3"]
    orchestrator.ack_dead_letters([o.stream_id for o in dead])
    assert a.receive(0) is None  # reads (and drops) the hand-back's nudge, which b never needed
    assert client.xlen(keys.tasks) == 0

    orchestrator.dispatch("t4", {"task_id": "t4"})
    held = a.receive(0.1)
    assert held is not None and held.task_id == "t4"
    a.mark_started("t4", held.attempt)
    [(task_id, holder)] = orchestrator.held().items()
    assert task_id == "t4" and holder.consumer == a.consumer and holder.deliveries == 1
    assert holder.running_s is not None and 0 <= holder.running_s < 60
    assert orchestrator.cancel("t4", {"status": "cancelled"}, {"by": "test"}).status == streams.REQUESTED
    assert a.cancel_requested("t4") == {"by": "test"}
    orchestrator.dispatch("t5", {"task_id": "t5"})
    assert orchestrator.cancel("t5", {"status": "cancelled"}, {"by": "test"}).status == streams.CANCELLED
    assert orchestrator.cancel("t5", {"status": "cancelled"}, {"by": "test"}).status == streams.FINISHED
    assert a.complete(held, {"status": "cancelled"}).status == streams.DONE
    assert client.xlen(keys.tasks) == 0


def test_every_script_runs_on_a_three_master_cluster_without_crossslot(cluster, monkeypatch):
    workers = workers_on_every_master(cluster)
    client = connect(load_settings(env={"REDIS_URL": cluster.url, "REDIS_CLUSTER": "true"}))
    assert isinstance(client, RedisCluster)
    ran: set[str] = set()
    run = StreamsTransport._run

    def counting(self, name, keys, args):
        ran.add(name)
        return run(self, name, keys, args)

    monkeypatch.setattr(StreamsTransport, "_run", counting)
    try:
        for worker in workers:
            exercise_every_script(client, worker)  # a CROSSSLOT error would raise StreamsError
    finally:
        client.close()
    assert ran == set(scripts.ALL)  # a new script must be added to the exercise


def test_the_client_reaches_the_primary_through_sentinel(sentinel_set):
    settings = load_settings(env={"REDIS_SENTINELS": sentinel_set.sentinels, "ACTIVATION_TRANSPORT": "streams"})
    client = connect(settings)
    try:
        exercise_every_script(client, "marie")
        port = client.connection_pool.get_master_address()[1]  # type: ignore[attr-defined]
        assert port == sentinel_set.primary_port
    finally:
        client.close()


def test_a_sentinel_failover_loses_no_dispatched_task(sentinel_set):
    settings = load_settings(env={"REDIS_SENTINELS": sentinel_set.sentinels, "ACTIVATION_TRANSPORT": "streams"})
    client = connect(settings)
    orchestrator = StreamsTransport(client, "marie", consumer="orchestrator", lease=LEASE)
    replica = StreamsTransport(client, "marie", consumer="a", lease=LEASE)
    try:
        for n in range(20):
            orchestrator.dispatch(f"t{n}", {"task_id": f"t{n}"})
        client.wait(1, 5000)  # what the primary acknowledged has reached the replica
        assert sentinel_set.failover() == sentinel_set.replica_port

        def retried(call):  # the caller's retry: the first command after a failover may fail
            def attempt():
                try:
                    return (call(),)
                except StreamsError:
                    return None

            return wait_for(attempt, 20, 0.1, "Redis to answer after the failover")[0]

        for n in range(20, 30):
            retried(lambda n=n: orchestrator.dispatch(f"t{n}", {"task_id": f"t{n}"}))
        done = set()
        while (delivery := retried(lambda: replica.receive(0))) is not None:
            assert retried(lambda d=delivery: replica.complete(d, {"exit_code": 0})).ok
            done.add(delivery.task_id)
        assert done == {f"t{n}" for n in range(30)}
    finally:
        client.close()


@pytest.mark.parametrize("cluster_mode", ["true", "false"])
def test_an_unreachable_redis_is_a_one_line_streams_error_not_a_traceback(cluster_mode):
    from tests.harness import free_port

    settings = load_settings(
        env={"REDIS_URL": f"redis://:s3cret@127.0.0.1:{free_port()}/0", "REDIS_CLUSTER": cluster_mode}
    )
    with pytest.raises(StreamsError) as caught:
        client = connect(settings)
        StreamsTransport(client, "marie", consumer="a").dispatch("t1", {"task_id": "t1"})
    assert "\n" not in str(caught.value) and "s3cret" not in str(caught.value)
