"""Replicas of one worker role on two worker hosts (network namespaces) in streams mode, Redis on its own.

The test process is the orchestrator's probe: it dispatches with StreamsTransport.dispatch and
reads the role's result stream on the Redis host. The agent is tests/streams_agent.py; the
replica started with STREAMS_AGENT_SLEEP is the slow one.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from activation.transport.streams.client import StreamsTransport
from tests.conftest import wait_for
from tests.harness import RedisServer
from tests.hosts.conftest import WORKER, Hosts
from tests.integration.test_streams_worker import (
    AGENT,
    KEYS,
    agent_of,
    consumer_of,
    dispatch,
    held_by,
    results,
    results_of,
    stream_settled,
)

LEASE = "3"


@pytest.fixture
def client(redis_host: RedisServer) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_host.url, socket_timeout=5, decode_responses=True)
    yield connection
    connection.close()


@pytest.fixture
def orchestrator(client: redis.Redis) -> StreamsTransport:
    transport = StreamsTransport(client, WORKER, consumer="orchestrator", lease=float(LEASE))
    transport.ensure_groups()
    return transport


def streams_env(server: RedisServer, **env: str) -> dict[str, str]:
    return {"REDIS_URL": server.url, "ACTIVATION_TRANSPORT": "streams", "ACTIVATION_LEASE": LEASE, **env}


def test_tasks_over_two_worker_hosts_get_one_result_each_and_both_hosts_work(
    hosts: Hosts, redis_host, client, orchestrator, make_worker
):
    trees = [make_worker(host, agent=AGENT, **streams_env(redis_host)) for host in hosts.workers]
    ids = [f"h{n}" for n in range(20)]
    for task_id in ids:
        dispatch(orchestrator, task_id)
    wait_for(lambda: client.xlen(KEYS.results) >= len(ids), 120, 0.1, "20 results")
    done = results(client)
    assert sorted(r["task_id"] for r in done) == sorted(ids)
    for tree in trees:
        assert any(consumer_of(tree) in r["consumer"] for r in done)
        assert tree.result_ids()  # in its host's own spool
    assert {r["consumer"].split("/")[0] for r in done} == {host.name for host in hosts.workers}
    wait_for(lambda: stream_settled(client), 10, 0.05, "the task stream empty")


def test_a_host_cut_off_past_the_lease_kills_its_agent_submits_nothing_and_the_other_host_takes_over(
    hosts: Hosts, redis_host, client, orchestrator, make_worker
):
    cut_host, other_host = hosts.workers
    a = make_worker(cut_host, agent=AGENT, **streams_env(redis_host, STREAMS_AGENT_SLEEP="60"))
    dispatch(orchestrator, "c1")
    wait_for(lambda: held_by(client, a), 30, 0.02, "the first host holding c1")
    agent = wait_for(lambda: agent_of(a), 10, 0.02, "its agent running")
    b = make_worker(other_host, agent=AGENT, **streams_env(redis_host))
    cut_host.cut()
    try:
        # Cut off, it cannot renew: it kills its own agent, with nobody to tell.
        wait_for(lambda: not agent.is_running(), 30, 0.05, lambda: f"the cut-off agent killed; log:\n{a.log_tail()}")
        wait_for(lambda: results_of(client, "c1"), 30, 0.05, lambda: f"the other host's result; log:\n{b.log_tail()}")
    finally:
        cut_host.restore()
    assert "lease lost task=c1" in a.log_text()
    wait_for(lambda: not a.spool.claim_path(WORKER, "c1").exists(), 10, 0.05, "the cut-off host's claim dropped")
    # Back on the network, the first host is a replica again, and still submitted nothing.
    wait_for(lambda: any(consumer_of(a) in name for name in orchestrator.replicas()), 30, 0.2, "a back in Redis")
    [result] = results_of(client, "c1")
    assert consumer_of(b) in result["consumer"] and result["deliveries"] == "2"
    assert a.result_ids() == [] and "late result" not in a.log_text()
    dispatch(orchestrator, "c2")  # and both hosts take work again
    wait_for(lambda: results_of(client, "c2"), 30, 0.05, "a task after the cut")
