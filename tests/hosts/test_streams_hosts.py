"""Replicas of one worker role on two worker hosts (network namespaces) in streams mode, Redis on its own.

The test process is the orchestrator's probe: it dispatches with StreamsTransport.dispatch and
reads the role's result stream on the Redis host. The agent is tests/streams_agent.py; the
replica started with STREAMS_AGENT_SLEEP is the slow one. The failure cases, through the real
orchestrator on its host, are in test_streams_stack.py.
"""

from __future__ import annotations

import pytest
import redis

from activation.transport.streams.client import StreamsTransport
from tests.conftest import wait_for
from tests.hosts.conftest import LEASE, WORKER, Hosts, streams_env
from tests.integration.test_streams_worker import (
    AGENT,
    KEYS,
    consumer_of,
    dispatch,
    results,
    stream_settled,
)


@pytest.fixture
def orchestrator(client: redis.Redis) -> StreamsTransport:
    transport = StreamsTransport(client, WORKER, consumer="orchestrator", lease=float(LEASE))
    transport.ensure_groups()
    return transport


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
