"""Failures of issue 12 across hosts that the stack tests leave out: a replica restarted on its own
host, replicas racing to reclaim expired entries while a frozen holder waits to be continued, and
a Sentinel failover with the master SIGKILLed mid-run.

Same stack as test_streams_stack.py (orchestrator on its host, tasks in through its admin API,
results read from its results folder); Redis is looked at directly only for what the transport
leaves there (pending list, consumers, result stream).
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from activation.orchestrator.endpoint import read_endpoint
from activation.transport.streams.client import REFUSED, Delivery, StreamsTransport
from activation.transport.streams.keys import ORCHESTRATOR_GROUP
from tests.conftest import wait_for
from tests.harness import RedisServer, WorkerTree
from tests.hosts import test_streams_stack
from tests.hosts.conftest import LEASE, WORKER, Hosts, streams_env
from tests.hosts.sentinels import SentinelHosts
from tests.hosts.test_streams_stack import Stack, completed_once, ran_by, settled
from tests.integration.test_streams_worker import (
    AGENT,
    KEYS,
    SLOW,
    agent_of,
    consumer_of,
    consumers,
    held_by,
    holder,
    stream_settled,
    with_children,
)

stack = test_streams_stack.stack  # the fixtures, shared
worker = test_streams_stack.worker


def pending_of(client: redis.Redis) -> dict[str, int]:
    """Each consumer of the role's group and how many entries it holds."""
    return {str(c["name"]): int(c["pending"]) for c in client.xinfo_consumers(KEYS.tasks, KEYS.group)}


def test_a_replica_restarted_on_its_host_is_a_new_consumer_and_its_old_one_goes_only_once_it_holds_nothing(
    client, stack, worker
):
    a = worker(0, STREAMS_AGENT_SLEEP=SLOW)
    stack.dispatch("p1")
    wait_for(lambda: held_by(client, a), 30, 0.02, "host a holding p1")
    wait_for(lambda: agent_of(a), 10, 0.02, "host a's agent running p1")
    found = holder(client)
    assert found is not None
    old = found[0]
    a.kill_everything()
    seen_while_held = [pending_of(client).get(old) == 1]  # at each look while it held p1: still a consumer?
    # The same tree again: same host, worker name and spool; a new supervisord, so a new consumer.
    a.env["STREAMS_AGENT_SLEEP"] = "0"
    a.run_dir.mkdir(parents=True, exist_ok=True)
    a.start()
    assert consumer_of(a) not in old

    def finished() -> bool:
        pending = pending_of(client)
        if (holder(client) or ("", 0))[0] == old:
            seen_while_held.append(old in pending)
        return stack.result("p1") is not None

    wait_for(finished, 60, 0.05, lambda: f"the restarted replica to reclaim p1; a:\n{a.log_tail()}")
    result = stack.result("p1") or {}
    assert all(seen_while_held)  # never pruned while it held the entry
    assert consumer_of(a) in ran_by(result) and result["attempts"] == 2  # reclaimed: a delivery counted
    assert result["status"] == "completed" and result["stdout"].strip() == "ran p1 attempt 2"
    assert stack.result_ids() == ["p1"] and completed_once(client) == ["p1"] and a.result_ids() == ["p1"]
    # Holding nothing now, the old consumer is pruned once idle long enough; the new one stays.
    wait_for(lambda: old not in consumers(client), 60, 0.2, lambda: f"{old} pruned; a:\n{a.log_tail()}")
    assert re.search(rf"idle consumer\(s\) holding nothing: .*{re.escape(old)}", a.log_text())
    assert any(consumer_of(a) in c for c in consumers(client))
    wait_for(lambda: settled(client, stack), 30, 0.1, "the task stream, pending list and outbox empty")


def take(transport: StreamsTransport, count: int) -> list[Delivery]:
    """``count`` deliveries received by ``transport`` and never renewed: their leases run out."""
    taken: list[Delivery] = []

    def more() -> bool:
        delivery = transport.receive(0.2)
        if delivery is not None:
            taken.append(delivery)
        return len(taken) == count

    wait_for(more, 30, 0, f"{count} deliveries to the probe's consumer")
    return taken


def test_three_replicas_racing_for_expired_entries_run_each_task_once_and_late_holders_are_fenced(
    hosts: Hosts, client, stack, worker, redis_host: RedisServer, make_worker: Callable[..., WorkerTree]
):
    ids = [f"x{n}" for n in range(7)]
    stack.dispatch_all(ids)
    # A replica takes one and is frozen mid-task. It starts first: a replica claims an expired
    # entry before it reads a new one, so one that took longer than a lease to start (a loaded
    # machine) would take one of the ghost's, and leave a new entry for a racer's first delivery.
    frozen = worker(0, STREAMS_AGENT_SLEEP=SLOW)
    wait_for(lambda: agent_of(frozen), 30, 0.02, lambda: f"the frozen-to-be host's agent; log:\n{frozen.log_tail()}")
    (held,) = [i for i in ids if frozen.spool.claim_path(WORKER, i).exists()]
    # A consumer of the probe's takes the other six and goes silent: their leases run out together.
    ghost = StreamsTransport(client, WORKER, consumer="ghost", lease=float(LEASE))
    taken = take(ghost, len(ids) - 1)
    executor = frozen.pause("executor")
    racers: list[WorkerTree] = []
    try:
        # Three free replicas on three more hosts, started together, race for all seven.
        for host in (hosts.workers[1], hosts.network.add_host("worker-c"), hosts.network.add_host("worker-d")):
            env = streams_env(redis_host, STREAMS_AGENT_SLEEP="0.3")
            racers.append(make_worker(host, start=False, agent=AGENT, **env).launch())
        for tree in racers:
            tree.wait_running()
        stack.wait_results(len(ids), 90, racers)
        results = {task_id: stack.result(task_id) or {} for task_id in ids}
        assert stack.result_ids() == ids and completed_once(client) == ids  # one accepted completion each
        assert all(r["status"] == "completed" and r["attempts"] >= 2 for r in results.values()), results
        # Each task ran once among the racers: no second run, concurrent or not, left a local record.
        assert sorted(task_id for t in racers for task_id in t.result_ids()) == ids
        assert not any(consumer_of(frozen) in ran_by(r) for r in results.values())
        # The silent consumer's results, late now: refused, and nothing more is recorded.
        for delivery in taken:
            assert ghost.complete(delivery, {"status": "completed", "late": True}).status == REFUSED
        assert completed_once(client) == ids
    finally:
        frozen.resume(executor)
        for tree in racers:
            with_children(tree, signal.SIGCONT)
    # Continued, the frozen host finds its lease gone: it kills its agent and submits nothing.
    wait_for(lambda: agent_of(frozen) is None, 30, 0.05, lambda: f"the frozen agent killed; log:\n{frozen.log_tail()}")
    wait_for(lambda: not frozen.spool.claim_path(WORKER, held).exists(), 10, 0.05, "the frozen host's claim dropped")
    assert f"lease lost task={held}" in frozen.log_text() or f"late result refused task={held}" in frozen.log_text()
    assert completed_once(client) == ids and stack.result_ids() == ids
    assert not any(consumer_of(frozen) in ran_by(stack.result(i) or {}) for i in ids)
    wait_for(lambda: settled(client, stack), 30, 0.1, "the task stream, pending list and outbox empty")


@pytest.fixture
def sentinel_hosts(hosts: Hosts, tmp_path: Path) -> Iterator[SentinelHosts]:
    """The primary on the Redis host, its replica on another, a Sentinel on each of three more."""
    network = hosts.network
    topology = SentinelHosts(
        tmp_path / "sentinel",
        hosts.redis,
        network.add_host("redis-b"),
        [network.add_host(f"sentinel-{n}") for n in range(3)],
    )
    try:
        yield topology.start()
    finally:
        topology.stop()


def test_a_sentinel_failover_with_the_master_sigkilled_mid_run_leaves_one_result_per_task(
    hosts: Hosts, sentinel_hosts: SentinelHosts, make_worker, make_orchestrator
):
    env = {"REDIS_SENTINELS": sentinel_hosts.sentinels, "ACTIVATION_TRANSPORT": "streams", "ACTIVATION_LEASE": LEASE}
    tree = make_orchestrator(start=False, ACTIVATION_REDIS_BACKOFF_MAX="0.5", **env)
    tree.spool.init([WORKER])
    tree.start()
    wait_for(lambda: read_endpoint(tree.spool), 20, 0.1, lambda: f"the orchestrator's API; log:\n{tree.log_tail()}")
    orchestrated = Stack(tree, None)  # type: ignore[arg-type]  # no single server here: Sentinel names it
    workers = [make_worker(h, agent=AGENT, STREAMS_AGENT_SLEEP="0.2", **env) for h in hosts.workers]
    ids = [f"f{n:02d}" for n in range(30)]
    orchestrated.dispatch_all(ids[:25])
    wait_for(lambda: len(orchestrated.result_ids()) >= 5, 60, 0.1, "the run under way")
    # The last five reach the master but never its replica: what a failover loses, the outbox has.
    primary = hosts.redis
    blocked = primary.run(["iptables", "-A", "OUTPUT", "-d", sentinel_hosts.replica_host.address, "-j", "DROP"])
    assert blocked.returncode == 0, blocked.stderr
    orchestrated.dispatch_all(ids[25:])
    sentinel_hosts.kill_primary()
    before = len(orchestrated.result_ids())
    assert before < len(ids)  # the master died mid-run
    wait_for(sentinel_hosts.replica_is_primary, 30, 0.1, "the Sentinels to promote the replica")
    orchestrated.wait_results(len(ids), 90, workers)
    assert orchestrated.result_ids() == ids
    assert {(orchestrated.result(i) or {}).get("status") for i in ids} == {"completed"}
    assert re.search(r"re-sent [1-9]\d* outbox task\(s\) of marie that Redis had lost", tree.log_text())
    client = redis.Redis(
        host=sentinel_hosts.replica_host.address, port=sentinel_hosts.replica_port, decode_responses=True
    )
    try:
        # The new primary's result stream: each task's accepted completion at most once (some were
        # accepted by the old master only), and none unread by the orchestrator.
        done = [fields["task_id"] for _id, fields in client.xrange(KEYS.results)]
        assert len(done) == len(set(done))
        wait_for(lambda: stream_settled(client) and orchestrated.outbox() == [], 30, 0.1, "the stream and outbox empty")
        assert client.xpending(KEYS.results, ORCHESTRATOR_GROUP)["pending"] == 0
    finally:
        client.close()
