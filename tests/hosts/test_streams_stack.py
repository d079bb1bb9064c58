"""The whole streams stack across hosts: the real orchestrator on the orchestrator host, Redis on its
host, and worker trees of the SAME worker name on the two worker hosts, each on its own spool.

Tasks go in through the orchestrator's admin API on its host's address (from the probe, as a
user would); results are read where a user reads them: the orchestrator's results folder. Redis
is looked at directly only for what the transport leaves behind there (task stream, pending list,
consumers). The agent is tests/streams_agent.py; STREAMS_AGENT_SLEEP makes one replica slow.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import redis

from activation.orchestrator.endpoint import read_endpoint
from activation.transport.streams.keys import ORCHESTRATOR_GROUP
from tests.conftest import wait_for
from tests.harness import RedisServer, WorkerTree
from tests.hosts.conftest import WORKER, Hosts, streams_env
from tests.integration.test_orchestrator import call
from tests.integration.test_streams_worker import (
    AGENT,
    KEYS,
    SLOW,
    agent_of,
    consumer_of,
    consumers,
    held_by,
    stream_settled,
    with_children,
)

# The soak's size: 2,000 by default, so that `make test` stays inside its time; ACTIVATION_SOAK_TASKS=10000
# for the full soak of issue 12. Its time limits grow with it (the pytest timeout, the wait for results).
SOAK_TASKS = int(os.environ.get("ACTIVATION_SOAK_TASKS") or 2000)
QUICK_AGENT = "/bin/true -p -- {description}"  # an agent that exits at once


class Stack:
    """The orchestrator tree in its host, and what a test does through it."""

    def __init__(self, tree: WorkerTree, server: RedisServer) -> None:
        self.tree = tree
        self.server = server
        self.url = f"http://{tree.env['ACTIVATION_ADMIN_BIND']}"
        self.token = tree.env["ACTIVATION_ADMIN_TOKEN"]

    def dispatch(self, task_id: str, description: str = "work") -> None:
        body = {"worker": WORKER, "description": description, "task_id": task_id}
        status, answer = call(self.url, "POST", "/tasks", body, token=self.token)
        assert status == 202 and answer["transport"] == "streams", answer

    def dispatch_all(self, ids: Iterable[str]) -> None:
        with ThreadPoolExecutor(4) as pool:  # the API serves each request on its own thread
            list(pool.map(self.dispatch, ids))

    def result(self, task_id: str) -> dict[str, Any] | None:
        status, task = call(self.url, "GET", f"/tasks/{task_id}", token=self.token)
        return task["result"] if status == 200 and task.get("state") == "done" else None

    def results(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in self.tree.spool.results(WORKER).glob("*.json")]

    def result_ids(self) -> list[str]:
        return sorted(p.stem for p in self.tree.spool.results(WORKER).glob("*.json"))

    def outbox(self) -> list[str]:
        return self.tree.spool.inbox_names(WORKER)

    def wait_results(self, count: int, timeout: float, trees: Iterable[WorkerTree] = ()) -> None:
        watched = list(trees)

        def tails() -> str:
            return "\n".join(f"--- {t.log}:\n{t.log_tail(15)}" for t in [self.tree, *watched])

        wait_for(
            lambda: len(self.result_ids()) >= count,
            timeout,
            0.2 if count < 500 else 1.0,
            lambda: f"{count} results;\n{tails()}",
        )


def ran_by(result: dict[str, Any]) -> str:
    """The replica (consumer) whose delivery the result completed."""
    return str(result["metadata"]["stream"]["consumer"])


def completed_once(client: redis.Redis) -> list[str]:
    """The task ids on the role's result stream, one per completion the transport accepted."""
    return sorted(fields["task_id"] for _id, fields in client.xrange(KEYS.results))


def audit_clean(tree: WorkerTree) -> None:
    audit = tree.cli("audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr


@pytest.fixture
def stack(redis_host: RedisServer, make_orchestrator: Callable[..., WorkerTree]) -> Stack:
    tree = make_orchestrator(start=False, **streams_env(redis_host, ACTIVATION_REDIS_BACKOFF_MAX="0.5"))
    tree.spool.init([WORKER])  # the role's outbox, so it can be dispatched to before a replica beats
    tree.start()
    wait_for(lambda: read_endpoint(tree.spool), 20, 0.1, lambda: f"the orchestrator's API; log:\n{tree.log_tail()}")
    return Stack(tree, redis_host)


@pytest.fixture
def worker(
    hosts: Hosts, redis_host: RedisServer, make_worker: Callable[..., WorkerTree]
) -> Iterator[Callable[..., WorkerTree]]:
    """A worker tree of WORKER in streams mode in worker host 0 or 1; stopped ones are let go after."""
    made: list[WorkerTree] = []

    def make(index: int, *, agent: str = AGENT, **env: str) -> WorkerTree:
        tree = make_worker(hosts.workers[index], agent=agent, **streams_env(redis_host, **env))
        made.append(tree)
        return tree

    yield make
    for tree in made:
        with_children(tree, signal.SIGCONT)  # a paused one must be able to die


def settled(client: redis.Redis, stack: Stack) -> bool:
    """No task entry or pending delivery in Redis, no result unread by the orchestrator, an empty outbox."""
    unread = client.xpending(KEYS.results, ORCHESTRATOR_GROUP)["pending"]
    return stream_settled(client) and unread == 0 and stack.outbox() == []


@pytest.mark.timeout(600)
def test_a_thousand_tasks_over_two_hosts_get_one_result_each_and_every_spool_audits_clean(
    hosts: Hosts, client, stack, worker
):
    a, b = worker(0, agent=QUICK_AGENT), worker(1, agent=QUICK_AGENT)
    ids = [f"k{n:04d}" for n in range(1000)]
    stack.dispatch_all(ids)
    stack.wait_results(len(ids), 500, (a, b))
    assert stack.result_ids() == sorted(ids) and completed_once(client) == sorted(ids)  # one result each
    assert {r["status"] for r in stack.results()} == {"completed"}
    # Both hosts did work, each task ran once on one of them, and their results reached the orchestrator.
    assert a.result_ids() and b.result_ids() and sorted(a.result_ids() + b.result_ids()) == sorted(ids)
    assert {ran_by(r).split("/")[0] for r in stack.results()} == {host.name for host in hosts.workers}
    wait_for(lambda: settled(client, stack), 30, 0.1, "the task stream, pending list and outbox empty")
    for tree in (stack.tree, a, b):
        audit_clean(tree)


def test_a_host_whose_tree_is_sigkilled_mid_task_is_relieved_at_delivery_2_with_one_result(client, stack, worker):
    a = worker(0, STREAMS_AGENT_SLEEP=SLOW)
    stack.dispatch("k1")
    wait_for(lambda: held_by(client, a), 30, 0.02, "host a holding k1")
    wait_for(lambda: agent_of(a), 10, 0.02, "host a's agent running k1")
    b = worker(1)
    a.kill_everything()
    result = wait_for(lambda: stack.result("k1"), 60, 0.1, lambda: f"b to reclaim k1; b:\n{b.log_tail()}")
    assert consumer_of(b) in ran_by(result) and result["attempts"] == 2
    assert result["stdout"].strip() == "ran k1 attempt 2"
    assert stack.result_ids() == ["k1"] and b.result_ids() == ["k1"]
    wait_for(lambda: settled(client, stack), 30, 0.1, "the task stream, pending list and outbox empty")


def test_a_host_cut_off_past_the_lease_kills_its_agent_while_cut_and_its_late_result_is_never_the_result(
    hosts: Hosts, client, stack, worker
):
    cut_host = hosts.workers[0]
    a = worker(0, STREAMS_AGENT_SLEEP=SLOW)
    stack.dispatch("c1")
    wait_for(lambda: held_by(client, a), 30, 0.02, "host a holding c1")
    agent = wait_for(lambda: agent_of(a), 10, 0.02, "host a's agent running c1")
    b = worker(1)
    cut_host.cut()
    try:
        # Cut off, it cannot renew: it kills its own agent, with nobody to tell, while still cut.
        wait_for(lambda: not agent.is_running(), 30, 0.05, lambda: f"the cut-off agent killed; a:\n{a.log_tail()}")
        assert cut_host.is_cut() and "lease lost task=c1" in a.log_text()
        result = wait_for(lambda: stack.result("c1"), 60, 0.1, lambda: f"b's result of c1; b:\n{b.log_tail()}")
    finally:
        cut_host.restore()
    assert consumer_of(b) in ran_by(result) and result["attempts"] == 2
    wait_for(lambda: not a.spool.claim_path(WORKER, "c1").exists(), 10, 0.05, "the cut-off host's claim dropped")
    # Back on the network: it is a replica again, and submitted nothing for c1.
    wait_for(lambda: any(consumer_of(a) in c for c in consumers(client)), 30, 0.2, "host a back in Redis")
    assert a.result_ids() == [] and "late result" not in a.log_text()
    assert stack.result_ids() == ["c1"] and ran_by(stack.result("c1") or {}) == ran_by(result)
    stack.dispatch("c2")  # and the stack works on
    wait_for(lambda: stack.result("c2"), 30, 0.1, "a task after the cut")


def test_an_executor_stopped_past_the_lease_then_continued_submits_nothing_and_there_is_one_result(
    client, stack, worker
):
    a = worker(0, STREAMS_AGENT_SLEEP=SLOW)
    stack.dispatch("s1")
    wait_for(lambda: held_by(client, a), 30, 0.02, "host a holding s1")
    agent = wait_for(lambda: agent_of(a), 10, 0.02, "host a's agent running s1")
    b = worker(1)
    executor = a.pause("executor")
    try:
        result = wait_for(lambda: stack.result("s1"), 60, 0.1, lambda: f"b to take s1 over; b:\n{b.log_tail()}")
    finally:
        a.resume(executor)
    wait_for(lambda: not agent.is_running(), 30, 0.05, lambda: f"a's agent killed; a:\n{a.log_tail()}")
    wait_for(lambda: not a.spool.claim_path(WORKER, "s1").exists(), 10, 0.05, "a's claim dropped")
    assert "lease lost task=s1" in a.log_text()
    assert "late result" not in a.log_text() and a.result_ids() == []
    assert consumer_of(b) in ran_by(result) and result["attempts"] == 2
    assert stack.result_ids() == ["s1"]
    wait_for(lambda: settled(client, stack), 30, 0.1, "the task stream, pending list and outbox empty")


def test_sigterm_to_a_host_mid_task_hands_the_task_back_and_the_other_host_runs_it_uncounted(client, stack, worker):
    # Leases far longer than the drain: only the hand-back can get d1 to b uncounted. With the
    # short LEASE, a loaded machine could hold a's renewals back past it mid-drain; b would then
    # claim the lapsed entry as a second delivery.
    a = worker(0, STREAMS_AGENT_SLEEP=SLOW, ACTIVATION_DRAIN_TIMEOUT="1", ACTIVATION_LEASE="20")
    stack.dispatch("d1")
    wait_for(lambda: held_by(client, a), 30, 0.02, "host a holding d1")
    wait_for(lambda: agent_of(a), 10, 0.02, "host a's agent running d1")
    b = worker(1, ACTIVATION_LEASE="20")
    a.stop()
    result = wait_for(lambda: stack.result("d1"), 60, 0.1, lambda: f"b to run d1; b:\n{b.log_tail()}")
    assert consumer_of(b) in ran_by(result) and result["attempts"] == 1
    assert result["stdout"].strip() == "ran d1 attempt 1"
    assert "handed d1 back to the stream" in a.log_text()
    assert a.result_ids() == [] and stack.result_ids() == ["d1"]
    wait_for(lambda: settled(client, stack), 30, 0.1, "the task stream, pending list and outbox empty")


@pytest.mark.parametrize("lose_data", [False, True], ids=["aof", "no-persistence"])
def test_redis_restarted_mid_run_loses_no_task(client, stack, worker, lose_data):
    a, b = worker(0, STREAMS_AGENT_SLEEP="0.2"), worker(1, STREAMS_AGENT_SLEEP="0.2")
    ids = [f"r{n:03d}" for n in range(60)]
    stack.dispatch_all(ids)
    wait_for(lambda: len(stack.result_ids()) >= 10, 120, 0.1, "the run under way")
    before = len(stack.result_ids())
    stack.server.restart(lose_data=lose_data)
    assert before < len(ids)  # the restart came mid-run
    stack.wait_results(len(ids), 300, (a, b))
    assert stack.result_ids() == sorted(ids)
    if not lose_data:  # the AOF kept the result stream: one accepted completion per task
        assert completed_once(client) == sorted(ids)
    assert {r["status"] for r in map(stack.result, ids) if r} == {"completed"}
    if lose_data:  # whether or not the orchestrator saw the outage first, it re-sent what Redis lost
        assert re.search(r"re-sent [1-9]\d* outbox task\(s\) of marie that Redis had lost", stack.tree.log_text())
    wait_for(lambda: settled(client, stack), 60, 0.1, "the task stream, pending list and outbox empty")
    for tree in (stack.tree, a, b):
        audit_clean(tree)


@pytest.mark.timeout(300 + SOAK_TASKS * 0.15)
def test_a_soak_of_quick_tasks_leaves_streams_pending_lists_and_consumers_clean(client, stack, worker):
    """SOAK_TASKS tasks (2,000 unless ACTIVATION_SOAK_TASKS says, e.g. 10,000) with an agent that exits at once."""
    a, b = worker(0, agent=QUICK_AGENT), worker(1, agent=QUICK_AGENT)
    ids = [f"soak{n:05d}" for n in range(SOAK_TASKS)]
    stack.dispatch_all(ids)
    stack.wait_results(len(ids), 200 + SOAK_TASKS * 0.1, (a, b))
    assert stack.result_ids() == sorted(ids) and completed_once(client) == sorted(ids)
    assert sorted(a.result_ids() + b.result_ids()) == sorted(ids)
    wait_for(lambda: settled(client, stack), 60, 0.1, "the task stream, pending list and outbox empty")
    # Bounded: the two replicas, and at most the hand-back consumer; none per task or per restart.
    assert len(consumers(client)) <= 3 and all(
        consumer_of(a) in c or consumer_of(b) in c or c == "handback" for c in consumers(client)
    )
    for tree in (stack.tree, a, b):
        audit_clean(tree)
