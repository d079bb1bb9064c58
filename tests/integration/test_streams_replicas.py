"""Replica processes of one worker role sharing a real Redis: spread, SIGKILL, SIGSTOP, SIGTERM.

The replicas are tests/streams_replica.py (the core's loop without a worker tree), so these test
the transport's promises between real processes; the worker-tree and network-namespace versions
of the same cases come with the wiring.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from activation.errors import StreamsError
from activation.transport.streams.keys import StreamKeys
from tests.conftest import wait_for
from tests.harness import ROOT, RedisServer
from tests.redis_topologies import DurableRedisServer

WORKER = "marie"
KEYS = StreamKeys(WORKER)
LEASE = 2.0  # long enough that a loaded machine does not lose a lease by accident


class Replica:
    def __init__(self, process: subprocess.Popen[bytes], log: Path, consumer: str) -> None:
        self.process, self.log, self.consumer = process, log, consumer

    def lines(self) -> list[list[str]]:
        return [line.split() for line in self.log.read_text().splitlines()]

    def said(self, *words: str) -> bool:
        return any(line[: len(words)] == list(words) for line in self.lines())


@pytest.fixture
def replica_on(tmp_path: Path) -> Iterator[Callable[..., Replica]]:
    """Start a replica process of WORKER on a given Redis; all are killed after the test."""
    started: list[Replica] = []

    def start(server: RedisServer, consumer: str, work: float = 0.0) -> Replica:
        log = tmp_path / f"{consumer}.log"
        argv = [sys.executable, "-m", "tests.streams_replica", "--url", server.url, "--worker", WORKER]
        argv += ["--consumer", consumer, "--lease", str(LEASE), "--work", str(work)]
        with open(log, "wb") as out:
            process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        started.append(Replica(process, log, consumer))
        wait_for(lambda: started[-1].said("ready"), 20, 0.02, f"{consumer} ready")
        return started[-1]

    yield start
    for r in started:
        if r.process.poll() is None:
            r.process.send_signal(signal.SIGCONT)
            r.process.kill()
        r.process.wait(10)


@pytest.fixture
def replica(redis_server: RedisServer, replica_on: Callable[..., Replica]) -> Callable[..., Replica]:
    return lambda consumer, work=0.0: replica_on(redis_server, consumer, work)


def dispatch(client: redis.Redis, count: int) -> None:
    from activation.transport.streams.client import StreamsTransport

    orchestrator = StreamsTransport(client, WORKER, consumer="orchestrator")
    orchestrator.ensure_groups()
    for n in range(count):
        orchestrator.dispatch(f"t{n}", {"task_id": f"t{n}", "description": "x"})


def results(client: redis.Redis) -> list[dict[str, str]]:
    return [fields for _id, fields in client.xrange(KEYS.results)]


def holder(client: redis.Redis) -> tuple[str, int] | None:
    entries = client.xpending_range(KEYS.tasks, KEYS.group, "-", "+", 10)
    return (entries[0]["consumer"], entries[0]["times_delivered"]) if entries else None


def stop(r: Replica) -> None:
    r.process.send_signal(signal.SIGTERM)
    r.process.wait(20)


def test_a_thousand_tasks_over_two_replicas_give_exactly_one_result_each_and_both_work(client, replica):
    a, b = replica("a"), replica("b")  # both ready before the first task, so both can work
    dispatch(client, 1000)
    wait_for(lambda: client.xlen(KEYS.results) >= 1000, 120, 0.1, "1000 results")
    stop(a)
    stop(b)
    done = results(client)
    assert sorted(r["task_id"] for r in done) == sorted(f"t{n}" for n in range(1000))
    by = {r["consumer"] for r in done}
    assert by == {"a", "b"}
    assert client.xlen(KEYS.tasks) == 0 and holder(client) is None


def test_after_a_sigkill_mid_task_the_other_replica_reclaims_it_at_delivery_2(client, replica):
    dispatch(client, 1)
    a = replica("a", work=60)
    wait_for(lambda: holder(client) == ("a", 1), 20, 0.02, "a holding the task")
    b = replica("b")
    a.process.kill()
    wait_for(lambda: b.said("done", "t0", "2"), 30, 0.05, "b to reclaim and complete t0")
    [result] = results(client)
    assert (result["consumer"], result["deliveries"]) == ("b", "2")


def test_an_executor_stopped_past_the_lease_gives_up_its_task_and_submits_nothing(client, replica):
    dispatch(client, 1)
    a = replica("a", work=6 * LEASE)
    wait_for(lambda: holder(client) == ("a", 1), 20, 0.02, "a holding the task")
    a.process.send_signal(signal.SIGSTOP)
    b = replica("b", work=2 * LEASE)  # b runs it for a while: a wakes while b still holds it
    wait_for(lambda: holder(client) == ("b", 2), 30, 0.05, "b to take t0 over")
    a.process.send_signal(signal.SIGCONT)
    wait_for(lambda: a.said("lost", "t0", "1"), 30, 0.05, "a to give up t0")
    wait_for(lambda: b.said("done", "t0", "2"), 30, 0.05, "b to complete t0")
    [result] = results(client)
    assert json.loads(result["result"])["by"] == "b"


def test_sigterm_hands_a_running_task_back_and_the_other_replica_takes_it_with_no_extra_delivery(client, replica):
    dispatch(client, 1)
    a = replica("a", work=60)
    wait_for(lambda: holder(client) == ("a", 1), 20, 0.02, "a holding the task")
    b = replica("b")
    a.process.send_signal(signal.SIGTERM)
    assert a.process.wait(20) == 0
    assert a.said("handed_back", "t0", "1")
    wait_for(lambda: b.said("done", "t0", "1"), 10, 0.02, "b to take the handed-back task")
    [result] = results(client)
    assert (result["consumer"], result["deliveries"]) == ("b", "1")


def test_redis_restarted_mid_run_with_aof_loses_nothing(tmp_path, replica_on):
    durable = DurableRedisServer(tmp_path / "durable").start()
    client = redis.Redis.from_url(durable.url, decode_responses=True)
    try:
        a, b = replica_on(durable, "a", work=0.01), replica_on(durable, "b", work=0.01)
        dispatch(client, 300)
        wait_for(lambda: client.xlen(KEYS.results) >= 50, 60, 0.05, "some results before the restart")
        durable.process.kill()  # SIGKILL: only what the AOF holds comes back
        durable.process.wait(5)
        durable.start()
        wait_for(lambda: _safe_xlen(client, KEYS.results) >= 300, 120, 0.1, "all 300 results")
        stop(a)
        stop(b)
        done = results(client)
        assert sorted(r["task_id"] for r in done) == sorted(f"t{n}" for n in range(300))
        assert client.xlen(KEYS.tasks) == 0 and holder(client) is None
    finally:
        client.close()
        durable.stop()


def _safe_xlen(client: redis.Redis, key: str) -> int:
    try:
        return int(client.xlen(key))
    except redis.RedisError:
        return 0


def test_replicas_killed_and_replaced_mid_run_leave_one_result_per_task_and_nothing_behind(client, replica):
    from activation.transport.streams.client import StreamsTransport

    running = [replica("a0", work=0.01), replica("b0", work=0.01), replica("c0", work=0.01)]
    dispatch(client, 1500)
    for round_, threshold in enumerate((300, 600, 900), start=1):
        wait_for(lambda t=threshold: client.xlen(KEYS.results) >= t, 120, 0.05, f"{threshold} results")
        victim = running.pop(0)
        victim.process.kill()  # whatever it held comes back after a lease, at the next delivery
        victim.process.wait(10)
        running.append(replica(f"{victim.consumer[0]}{round_}", work=0.01))  # a new process start
    wait_for(lambda: client.xlen(KEYS.results) >= 1500, 180, 0.1, "1500 results")
    for r in running:
        stop(r)
    done = results(client)
    assert sorted(r["task_id"] for r in done) == sorted(f"t{n}" for n in range(1500))
    assert client.xlen(KEYS.tasks) == 0 and holder(client) is None
    admin = StreamsTransport(client, WORKER, consumer="admin")
    wait_for(
        lambda: admin.prune_consumers(0) is not None and not client.xinfo_consumers(KEYS.tasks, KEYS.group),
        10,
        0.05,
        "every consumer pruned",
    )


def test_redis_restarted_without_persistence_mid_run_loses_nothing_once_the_outbox_is_re_sent(
    client, replica, redis_server, tmp_path
):
    from activation.spool.layout import Spool
    from activation.transport.streams.client import StreamsTransport
    from activation.transport.streams.outbox import mirror, resend_outbox, send

    spool = Spool(tmp_path / "orchestrator")
    spool.init([WORKER])
    orchestrator = StreamsTransport(client, WORKER, consumer="orchestrator")
    orchestrator.ensure_groups()
    a, b = replica("a", work=0.01), replica("b", work=0.01)
    for n in range(300):
        send(orchestrator, spool, WORKER, {"task_id": f"t{n}", "description": "x"})

    def mirrored() -> int:
        mirror(orchestrator, spool, WORKER)
        return len(list(spool.results(WORKER).glob("*.json")))

    wait_for(lambda: mirrored() >= 50, 60, 0.05, "some results mirrored before the restart")
    redis_server.restart()  # streams, groups, task records and unmirrored results are gone

    requeued: set[str] = set()

    def all_done() -> bool:  # the orchestrator's loop: re-send the outbox, mirror what came back
        try:
            requeued.update(resend_outbox(orchestrator, spool, WORKER))
            return mirrored() >= 300
        except StreamsError:
            return False

    wait_for(all_done, 120, 0.2, "all 300 results in the orchestrator's spool")
    stop(a)
    stop(b)
    assert sorted(p.stem for p in spool.results(WORKER).glob("*.json")) == sorted(f"t{n}" for n in range(300))
    assert spool.count_inbox(WORKER) == 0
    assert requeued  # the restart did lose tasks in flight: they came back from the outbox
