"""Real worker trees in streams mode: replicas of one worker name, each with its own spool, on one Redis.

Each tree is supervisord running supervisor_conf/worker.conf with ACTIVATION_TRANSPORT=streams;
the test is the orchestrator, dispatching with StreamsTransport.dispatch and reading the result
stream. The agent is tests/streams_agent.py: a replica started with STREAMS_AGENT_SLEEP is the
slow one, to be stopped mid-task while the other runs at once.
"""

from __future__ import annotations

import json
import shlex
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from activation.clock import iso_now
from activation.spool.atomic import read_json
from activation.spool.cancel import CannotCancel
from activation.spool.layout import Spool
from activation.transport.streams import outbox
from activation.transport.streams.client import StreamsTransport
from activation.transport.streams.keys import StreamKeys
from tests.conftest import wait_for
from tests.harness import ROOT, RedisServer, WorkerTree, new_tree
from tests.redis_topologies import DurableRedisServer

WORKER = "marie"
KEYS = StreamKeys(WORKER)
LEASE = "2.5"  # seconds: a loaded machine must not lose a lease by accident, a test waits about one
SLOW = "60"
AGENT = shlex.join([sys.executable, str(ROOT / "tests" / "streams_agent.py")]) + " -p -- {description}"


@pytest.fixture
def orchestrator(client: redis.Redis) -> StreamsTransport:
    transport = StreamsTransport(client, WORKER, consumer="orchestrator", lease=float(LEASE))
    transport.ensure_groups()
    return transport


@pytest.fixture
def replica(tmp_path: Path, redis_server: RedisServer) -> Iterator[Callable[..., WorkerTree]]:
    """A worker tree of WORKER in streams mode on its own spool (tmp_path/<name>); all torn down after."""
    trees: list[WorkerTree] = []

    def make(name: str, *, start: bool = True, url: str | None = None, **env: str) -> WorkerTree:
        env.setdefault("ACTIVATION_LEASE", LEASE)
        tree = new_tree(
            tmp_path / name,
            WORKER,
            agent=AGENT,
            REDIS_URL=url or redis_server.url,
            ACTIVATION_TRANSPORT="streams",
            **env,
        )
        trees.append(tree)
        return tree.start() if start else tree

    yield make
    for tree in trees:
        with_children(tree, signal.SIGCONT)
        tree.kill_everything()


def with_children(tree: WorkerTree, sig: int) -> None:
    if tree.process is None:
        return
    try:
        for process in [psutil.Process(tree.process.pid), *psutil.Process(tree.process.pid).children(recursive=True)]:
            process.send_signal(sig)
    except psutil.Error:
        pass


def dispatch(orchestrator: StreamsTransport, task_id: str, description: str = "work") -> None:
    orchestrator.dispatch(task_id, {"task_id": task_id, "description": description, "created_at": iso_now()})


def results(client: redis.Redis) -> list[dict[str, Any]]:
    """The result stream's entries, each with its result record parsed."""
    return [{**fields, "record": json.loads(fields["result"])} for _id, fields in client.xrange(KEYS.results)]


def results_of(client: redis.Redis, task_id: str) -> list[dict[str, Any]]:
    return [r for r in results(client) if r["task_id"] == task_id]


def holder(client: redis.Redis) -> tuple[str, int] | None:
    entries = client.xpending_range(KEYS.tasks, KEYS.group, "-", "+", 10)
    return (entries[0]["consumer"], entries[0]["times_delivered"]) if entries else None


def consumers(client: redis.Redis) -> list[str]:
    return [str(c["name"]) for c in client.xinfo_consumers(KEYS.tasks, KEYS.group)]


def consumer_of(tree: WorkerTree) -> str:
    """The tree's replica name ends in its supervisord's pid and start (keys.replica_name)."""
    assert tree.process is not None
    return f"/{tree.process.pid}-"


def held_by(client: redis.Redis, tree: WorkerTree, deliveries: int = 1) -> bool:
    found = holder(client)
    return found is not None and consumer_of(tree) in found[0] and found[1] == deliveries


def stream_settled(client: redis.Redis) -> bool:
    """No task entry is left (nudges included) and nothing is pending."""
    return client.xlen(KEYS.tasks) == 0 and holder(client) is None


def log_of(tree: WorkerTree) -> str:
    return tree.log.read_text(errors="replace")


def test_tasks_over_two_replicas_get_exactly_one_result_each_and_both_replicas_work(client, orchestrator, replica):
    a, b = replica("a"), replica("b")
    ids = [f"t{n}" for n in range(40)]
    for task_id in ids:
        dispatch(orchestrator, task_id)
    wait_for(lambda: client.xlen(KEYS.results) >= len(ids), 120, 0.1, lambda: f"40 results; a:\n{a.log_tail()}")
    done = results(client)
    assert sorted(r["task_id"] for r in done) == sorted(ids)
    assert {r["record"]["status"] for r in done} == {"completed"}
    consumers = {r["consumer"] for r in done}
    assert len(consumers) == 2 and any(consumer_of(a) in c for c in consumers)
    assert any(consumer_of(b) in c for c in consumers)
    # Each replica keeps its own runs in its local spool, so local `show` works.
    local = a.result_ids() + b.result_ids()
    assert sorted(local) == sorted(ids) and a.result_ids() and b.result_ids()
    record = a.result(a.result_ids()[0])
    assert record is not None and record["source"] == "streams" and record["attempts"] == 1
    wait_for(lambda: stream_settled(client), 10, 0.05, "the task stream empty")


def test_the_agent_gets_the_task_id_and_the_delivery_count_as_its_attempt(client, orchestrator, replica):
    replica("a")
    dispatch(orchestrator, "ident-1")
    wait_for(lambda: results_of(client, "ident-1"), 30, 0.05, "the result of ident-1")
    [result] = results_of(client, "ident-1")
    assert result["record"]["stdout"].strip() == "ran ident-1 attempt 1"
    assert result["deliveries"] == "1"


def test_after_a_sigkill_of_a_whole_tree_mid_task_the_other_replica_runs_it_at_delivery_2(
    client, orchestrator, replica
):
    a = replica("a", STREAMS_AGENT_SLEEP=SLOW)
    dispatch(orchestrator, "k1")
    wait_for(lambda: held_by(client, a), 30, 0.02, "a holding k1")
    wait_for(lambda: a.spool.claim_path(WORKER, "k1").exists(), 10, 0.02, "a running k1")
    b = replica("b")
    a.kill_everything()
    wait_for(lambda: results_of(client, "k1"), 30, 0.05, lambda: f"b to reclaim k1; b:\n{b.log_tail()}")
    [result] = results_of(client, "k1")
    assert consumer_of(b) in result["consumer"] and result["deliveries"] == "2"
    assert result["record"]["attempts"] == 2
    assert result["record"]["stdout"].strip() == "ran k1 attempt 2"
    wait_for(lambda: stream_settled(client), 10, 0.05, "the task stream empty")
    # The dead replica's consumer holds nothing now: b's heartbeat removes it once it has idled
    # PRUNE_IDLE_LEASES leases; b's own consumer stays.
    wait_for(lambda: not any(consumer_of(a) in c for c in consumers(client)), 60, 0.2, "a's consumer pruned")
    assert any(consumer_of(b) in c for c in consumers(client))


def test_an_executor_stopped_past_its_lease_kills_its_agent_and_submits_nothing(client, orchestrator, replica):
    a = replica("a", STREAMS_AGENT_SLEEP=SLOW)
    dispatch(orchestrator, "s1")
    wait_for(lambda: held_by(client, a), 30, 0.02, "a holding s1")
    wait_for(lambda: a.spool.claim_path(WORKER, "s1").exists(), 10, 0.02, "a running s1")
    agent = wait_for(lambda: agent_of(a), 10, 0.02, "a's agent")
    b = replica("b")
    executor = a.kill("executor", signal.SIGSTOP)
    wait_for(lambda: results_of(client, "s1"), 30, 0.05, lambda: f"b to take s1 over; b:\n{b.log_tail()}")
    os_kill(executor, signal.SIGCONT)
    wait_for(lambda: not agent.is_running(), 30, 0.05, lambda: f"a's agent killed; a:\n{a.log_tail()}")
    wait_for(lambda: not a.spool.claim_path(WORKER, "s1").exists(), 10, 0.05, "a's claim dropped")
    assert "lease lost task=s1" in log_of(a)
    assert "late result" not in log_of(a) and a.result_ids() == []
    [result] = results_of(client, "s1")
    assert consumer_of(b) in result["consumer"] and result["deliveries"] == "2"


def test_sigterm_hands_the_running_task_back_and_the_other_replica_runs_it_without_a_delivery_counted(
    client, orchestrator, replica
):
    a = replica("a", STREAMS_AGENT_SLEEP=SLOW, ACTIVATION_DRAIN_TIMEOUT="1")
    dispatch(orchestrator, "d1")
    wait_for(lambda: held_by(client, a), 30, 0.02, "a holding d1")
    wait_for(lambda: agent_of(a), 10, 0.02, "a's agent")
    b = replica("b")
    a.stop()
    wait_for(lambda: results_of(client, "d1"), 30, 0.05, lambda: f"b to run d1; b:\n{b.log_tail()}")
    [result] = results_of(client, "d1")
    assert consumer_of(b) in result["consumer"] and result["deliveries"] == "1"
    assert result["record"]["stdout"].strip() == "ran d1 attempt 1"
    assert "handed d1 back to the stream" in log_of(a)
    assert a.result_ids() == [] and not a.spool.claim_path(WORKER, "d1").exists()
    wait_for(lambda: stream_settled(client), 10, 0.05, "the task stream empty")


def test_a_payload_that_is_no_task_goes_to_the_dead_letter_stream_and_the_next_task_runs(client, orchestrator, replica):
    a = replica("a")
    orchestrator.dispatch("bad-1", "this is not json")
    dispatch(orchestrator, "good-1")
    wait_for(lambda: results_of(client, "good-1"), 30, 0.05, lambda: f"good-1; a:\n{a.log_tail()}")
    [(_id, dead)] = client.xrange(KEYS.dead)
    assert dead["task_id"] == "bad-1" and dead["reason"].startswith("invalid_json")
    assert dead["task"] == "this is not json"
    assert not a.spool.task_path(WORKER, "bad-1").exists() and list(a.spool.dead_letters()) == []
    wait_for(lambda: stream_settled(client), 10, 0.05, "the task stream empty")


def test_a_task_that_kills_its_executor_each_time_ends_in_the_dead_letter_after_max_deliveries(
    client, orchestrator, replica
):
    a = replica("a", ACTIVATION_MAX_ATTEMPTS="2")
    dispatch(orchestrator, "poison-1", "kill-parent")
    wait_for(lambda: client.xlen(KEYS.dead) >= 1, 60, 0.1, lambda: f"the dead letter; a:\n{a.log_tail()}")
    [(_id, dead)] = client.xrange(KEYS.dead)
    assert dead["task_id"] == "poison-1" and dead["reason"].startswith("max_deliveries")
    assert dead["deliveries"] == "2"
    assert results_of(client, "poison-1") == []
    wait_for(lambda: stream_settled(client), 10, 0.05, "poison-1 gone from the stream and the pending list")
    dispatch(orchestrator, "after-1")
    wait_for(lambda: results_of(client, "after-1"), 30, 0.05, "the next task to run")


def agent_of(tree: WorkerTree) -> psutil.Process | None:
    """The tree's running agent process (streams_agent.py), if any.

    Found among supervisord's descendants (only the executor starts agents) with no supervisorctl
    call: a look costs milliseconds, so a short run is not missed between two looks under load.
    """
    if tree.process is None:
        return None
    try:
        descendants = psutil.Process(tree.process.pid).children(recursive=True)
    except psutil.Error:
        return None
    for child in descendants:
        try:
            if "streams_agent.py" in " ".join(child.cmdline()) and child.status() != psutil.STATUS_ZOMBIE:
                return child
        except psutil.Error:
            continue
    return None


def os_kill(pid: int, sig: int) -> None:
    import os

    os.kill(pid, sig)


def heartbeat_of(tree: WorkerTree) -> dict[str, Any]:
    try:
        return dict(json.loads(tree.spool.heartbeat_path(WORKER).read_text()))
    except (OSError, ValueError):
        return {}


def test_each_replica_publishes_its_state_in_redis_and_leaves_at_a_clean_stop(client, orchestrator, replica):
    a, b = replica("a"), replica("b")
    wait_for(lambda: len(orchestrator.replicas()) == 2, 20, 0.05, "two replicas in Redis")
    states = orchestrator.replicas()
    assert {name for name in states if consumer_of(a) in name or consumer_of(b) in name} == set(states)
    for name, state in states.items():
        assert state["replica"] == name and state["worker"] == WORKER and state["state"] == "running"
        assert state["redis"] == "up" and "programs" in state
    a.stop()
    wait_for(lambda: len(orchestrator.replicas()) == 1, 20, 0.05, "a gone from the replicas")
    [left] = orchestrator.replicas()
    assert consumer_of(b) in left


def test_redis_away_degrades_the_worker_then_it_recovers_by_itself_and_loses_nothing(tmp_path, replica):
    server = DurableRedisServer(tmp_path / "durable").start()
    connection = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        orchestrator = StreamsTransport(connection, WORKER, consumer="orchestrator")
        orchestrator.ensure_groups()
        # A lease long enough that the run outlives the outage: its completion is what waits. The run
        # ends when the gate opens, once Redis is away: on a loaded machine a fixed sleep could end
        # before the test sees the agent, or before it stops Redis.
        gate = tmp_path / "mid-1.gate"
        a = replica("a", url=server.url, ACTIVATION_LEASE="30", STREAMS_AGENT_GATE=str(gate))
        dispatch(orchestrator, "mid-1")
        wait_for(lambda: agent_of(a), 30, 0.02, lambda: f"a running mid-1; a:\n{a.log_tail()}")
        server.stop()
        gate.touch()
        outcome = a.spool.processing(WORKER) / "mid-1.outcome"
        wait_for(outcome.exists, 30, 0.05, lambda: f"mid-1's outcome held; a:\n{a.log_tail()}")
        wait_for(lambda: heartbeat_of(a).get("redis") == "down", 20, 0.05, "the heartbeat saying redis is down")
        executor = wait_for(lambda: (heartbeat_of(a).get("executor") or {}).get("state") == "degraded" and a, 20)
        assert heartbeat_of(executor)["executor"]["reason"] == "streams_unreachable"
        check = wait_for(lambda: (c := a.cli("check", WORKER)).returncode == 1 and c, 30, 0.2, "check unhealthy")
        assert "unreachable" in check.stderr
        assert a.states() == {"listener": "RUNNING", "executor": "RUNNING", "heartbeat": "RUNNING"}
        server.start()  # the same port, the same AOF
        wait_for(lambda: a.cli("check", WORKER).returncode == 0, 60, 0.2, lambda: f"check healthy; a:\n{a.log_tail()}")
        wait_for(lambda: results_of(connection, "mid-1"), 30, 0.05, "mid-1's completion, once Redis is back")
        dispatch(orchestrator, "after-1")
        wait_for(lambda: results_of(connection, "after-1"), 30, 0.05, "a task dispatched after the outage")
        assert [r["task_id"] for r in results(connection)] == ["mid-1", "after-1"]
        # Locally a result is written once Redis confirmed the completion: a moment after the stream has it.
        wait_for(
            lambda: sorted(a.result_ids()) == ["after-1", "mid-1"] and not outcome.exists(),
            30,
            0.05,
            lambda: f"a's results {a.result_ids()}, mid-1's outcome settled (held: {outcome.exists()})",
        )
        log = log_of(a)
        assert log.count("(task stream): ") == 1  # one line when the outage starts, none per retry
        assert "reachable again at" in log
    finally:
        connection.close()
        server.stop()


# -- cancel: a task not received yet never runs; a running one's holder is told through Redis,
# kills its agent's tree and completes with a `cancelled` result; a finished one stays. The
# orchestrator's side is outbox.cancel on its own spool (the outbox), as `activation cancel` and
# POST /tasks/<id>/cancel call it.


@pytest.fixture
def outbox_spool(tmp_path) -> Spool:
    spool = Spool(tmp_path / "orchestrator-spool")
    spool.init([WORKER])
    return spool


def send(transport: StreamsTransport, spool: Spool, task_id: str) -> None:
    outbox.send(transport, spool, WORKER, {"task_id": task_id, "description": "work", "created_at": iso_now()})


def test_a_task_not_received_yet_is_cancelled_at_once_and_never_runs(client, orchestrator, replica, outbox_spool):
    send(orchestrator, outbox_spool, "p1")
    cancelled = outbox.cancel(orchestrator, outbox_spool, WORKER, "p1", by="cli")
    assert cancelled.status == "cancelled" and cancelled.was == "pending"
    # Here at once: the outbox file became the cancelled result.
    assert not outbox_spool.task_path(WORKER, "p1").exists()
    assert read_json(outbox_spool.result_path(WORKER, "p1"))["status"] == "cancelled"
    # In Redis: retired as a completion retires, its cancelled result on the result stream.
    assert stream_settled(client)
    [result] = results_of(client, "p1")
    assert result["record"]["status"] == "cancelled" and result["consumer"] == "cancel"
    # A replica that starts now runs nothing of it, and the id cannot go again.
    a = replica("a")
    send(orchestrator, outbox_spool, "after")
    wait_for(lambda: results_of(client, "after"), 30, 0.05, "the next task's result")
    # Locally its result is written once Redis confirmed the completion: wait for that too.
    wait_for(lambda: a.result_ids() == ["after"], 30, 0.05, lambda: f"a's results: {a.result_ids()}")
    assert orchestrator.dispatch("p1", {"task_id": "p1", "description": "again"}).status == "duplicate"


def test_a_running_task_is_cancelled_by_its_holder_and_its_tree_is_gone(client, orchestrator, replica, outbox_spool):
    a = replica("a", STREAMS_AGENT_SLEEP=SLOW)
    send(orchestrator, outbox_spool, "r1")
    wait_for(lambda: held_by(client, a), 30, 0.02, "a holding r1")
    agent = wait_for(lambda: agent_of(a), 30, 0.02, "a's agent running r1")
    cancelled = outbox.cancel(orchestrator, outbox_spool, WORKER, "r1", by="api")
    assert cancelled.status == "cancelling" and cancelled.was == "running"
    wait_for(lambda: results_of(client, "r1"), 30, 0.05, lambda: f"a's cancelled result; a:\n{a.log_tail()}")
    [result] = results_of(client, "r1")
    record = result["record"]
    assert record["status"] == "cancelled" and record["cancelled"]["by"] == "api"
    assert record["kill"]["reason"] == "cancelled"
    assert not agent.is_running()
    assert stream_settled(client)
    # The orchestrator's mirror lands it in its spool like any result.
    outbox.mirror(orchestrator, outbox_spool, WORKER)
    assert read_json(outbox_spool.result_path(WORKER, "r1"))["status"] == "cancelled"
    assert not outbox_spool.task_path(WORKER, "r1").exists()
    assert client.hget(KEYS.task("r1"), "state") == "done"


def test_a_finished_task_cannot_be_cancelled(client, orchestrator, replica, outbox_spool):
    replica("a")
    send(orchestrator, outbox_spool, "f1")
    wait_for(lambda: results_of(client, "f1"), 30, 0.05, "f1's result")
    with pytest.raises(CannotCancel, match="already finished"):
        outbox.cancel(orchestrator, outbox_spool, WORKER, "f1", by="cli")
    [result] = results_of(client, "f1")
    assert result["record"]["status"] == "completed"
