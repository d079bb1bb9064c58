"""Random interleavings of three replicas against a real redis-server, checked against a model.

Hypothesis drives dispatch, receive, renew, complete, hand-back and lease expiry in any order;
after every step, each dispatched task id is in exactly one place (the stream, one result, or
one dead letter), and every script's answer is the one the fencing rules predict.
"""

from __future__ import annotations

import json

import redis
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test

from activation.transport.streams import client as streams
from activation.transport.streams.client import Delivery, StreamsTransport
from activation.transport.streams.keys import HANDBACK_CONSUMER, StreamKeys

WORKER = "marie"
KEYS = StreamKeys(WORKER)
LEASE = 60.0  # never reached on its own: the `expire` rule ages entries past it on purpose
MAX_ATTEMPTS = 3
CONSUMERS = ("a", "b", "c")
TASK_IDS = [f"t{n}" for n in range(6)]


def test_any_interleaving_of_three_replicas_keeps_every_task_in_exactly_one_place(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)

    class Replicas(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            client.flushall()
            self.replicas = {
                name: StreamsTransport(client, WORKER, consumer=name, lease=LEASE, max_attempts=MAX_ATTEMPTS)
                for name in CONSUMERS
            }
            self.orchestrator = StreamsTransport(client, WORKER, consumer="orchestrator", lease=LEASE)
            self.orchestrator.ensure_groups()
            self.held: dict[str, Delivery | None] = dict.fromkeys(CONSUMERS)
            self.dispatched: set[str] = set()
            self.results: dict[str, tuple[str, int, str]] = {}  # task -> (consumer, delivery, payload)

        def pel(self, entry_id: str) -> dict | None:
            entries = client.xpending_range(KEYS.tasks, KEYS.group, entry_id, entry_id, 1)
            return entries[0] if entries else None

        def holds(self, delivery: Delivery) -> bool:
            p = self.pel(delivery.entry_id)
            return bool(p) and (p["consumer"], p["times_delivered"]) == (
                delivery.token.consumer,
                delivery.token.deliveries,
            )

        @rule(task_id=st.sampled_from(TASK_IDS))
        def dispatch(self, task_id: str) -> None:
            outcome = self.orchestrator.dispatch(task_id, {"task_id": task_id})
            assert outcome.status == (streams.DUPLICATE if task_id in self.dispatched else streams.QUEUED)
            self.dispatched.add(task_id)

        @rule(name=st.sampled_from(CONSUMERS))
        def receive(self, name: str) -> None:
            if self.held[name] is not None:
                return  # a busy replica does not read: no prefetch
            delivery = self.replicas[name].receive(0)
            if delivery is not None:
                assert 1 <= delivery.attempt <= MAX_ATTEMPTS
                assert self.holds(delivery)
                assert delivery.task_id not in self.results
            self.held[name] = delivery

        @rule()
        def expire(self) -> None:
            """Every pending entry's lease lapses at once (a stall, a cut, a dead host)."""
            for p in client.xpending_range(KEYS.tasks, KEYS.group, "-", "+", 100):
                client.xclaim(
                    KEYS.tasks,
                    KEYS.group,
                    p["consumer"],
                    0,
                    [p["message_id"]],
                    idle=int(LEASE * 1000) + 1,
                    justid=True,
                )

        @rule(name=st.sampled_from(CONSUMERS))
        def renew(self, name: str) -> None:
            delivery = self.held[name]
            if delivery is None:
                return
            p = self.pel(delivery.entry_id)
            expected = self.holds(delivery) and p is not None and p["time_since_delivered"] < LEASE * 1000
            verdict = self.replicas[name].renew(delivery)
            assert verdict.ok == expected, verdict
            if not verdict.ok:
                self.held[name] = None  # the worker kills its agent and submits nothing

        @rule(name=st.sampled_from(CONSUMERS), code=st.integers(0, 1))
        def complete(self, name: str, code: int) -> None:
            delivery = self.held[name]
            if delivery is None:
                return
            payload = json.dumps({"exit_code": code}, sort_keys=True)
            token = (delivery.token.consumer, delivery.token.deliveries, payload)
            recorded = self.results.get(delivery.task_id)
            if recorded is not None:
                expected = streams.ALREADY_DONE if recorded == token else streams.REFUSED
            else:
                expected = streams.DONE if self.holds(delivery) else streams.REFUSED
            verdict = self.replicas[name].complete(delivery, {"exit_code": code})
            assert verdict.status == expected, verdict
            if verdict.status == streams.DONE:
                self.results[delivery.task_id] = token
            if verdict.status != streams.ALREADY_DONE and expected != streams.DONE:
                self.held[name] = None
            # A DONE holder keeps its delivery for a while, to try an identical or a changed retry.

        @rule(name=st.sampled_from(CONSUMERS))
        def drop_done(self, name: str) -> None:
            delivery = self.held[name]
            if delivery is not None and delivery.task_id in self.results:
                self.held[name] = None

        @rule(name=st.sampled_from(CONSUMERS))
        def hand_back(self, name: str) -> None:
            delivery = self.held[name]
            if delivery is None:
                return
            expected = self.holds(delivery) and delivery.task_id not in self.results
            before = self.pel(delivery.entry_id)
            verdict = self.replicas[name].hand_back(delivery)
            assert verdict.ok == expected, verdict
            if verdict.ok:
                after = self.pel(delivery.entry_id)
                assert before is not None and after is not None
                assert after["consumer"] == HANDBACK_CONSUMER
                assert after["times_delivered"] == before["times_delivered"] - 1  # counted back on claim
            self.held[name] = None

        @invariant()
        def every_task_is_in_exactly_one_place(self) -> None:
            queued = [f["task_id"] for _id, f in client.xrange(KEYS.tasks) if "task_id" in f]
            done = [f["task_id"] for _id, f in client.xrange(KEYS.results)]
            dead = [f["task_id"] for _id, f in client.xrange(KEYS.dead)]
            places = queued + done + dead
            assert sorted(places) == sorted(self.dispatched), (queued, done, dead)
            assert sorted(done) == sorted(self.results)

        @invariant()
        def nothing_is_pending_on_anyone_else(self) -> None:
            owners = {p["consumer"] for p in client.xpending_range(KEYS.tasks, KEYS.group, "-", "+", 100)}
            assert owners <= {*CONSUMERS, HANDBACK_CONSUMER}

    try:
        run_state_machine_as_test(Replicas, settings=settings(max_examples=60, stateful_step_count=40, deadline=None))
    finally:
        client.close()
