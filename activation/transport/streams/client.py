"""The typed Python face of the streams transport: dispatch, receive, renew, complete, hand back.

One `StreamsTransport` serves one worker role, as one consumer (a name unique to this process
start). It reads one entry at a time and only when asked, which the caller does only when its
executor is free: no prefetch, because an entry's lease clock starts at delivery.

Refusals (a lease another consumer took, a late result) are values (`Verdict`), never
exceptions; `StreamsError` means Redis could not be reached or answered nonsense. Nothing here
retries on its own: every script is safe to replay (dispatch and complete are idempotent, a
replayed renew renews), so the caller retries on its own schedule.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import redis

from activation.config import Settings
from activation.errors import DispatchError, StreamsError
from activation.spool.readers import replica_or_unreadable
from activation.spool.records import ReplicaState
from activation.spool.task import MAX_TASK_BYTES, TASK_ID_PATTERN, is_valid_task_id
from activation.transport.pubsub import describe
from activation.transport.streams import scripts
from activation.transport.streams.connect import REDIS_ERRORS, RedisClient, connect
from activation.transport.streams.keys import HANDBACK_CONSUMER, ORCHESTRATOR_GROUP, StreamKeys, consumer_name

log = logging.getLogger("activation.streams")

MAX_BLOCK = 5.0  # seconds; connect.SOCKET_TIMEOUT must stay above it
CLAIM_SCAN = 10  # pending entries one claim looks at

# Verdict statuses
QUEUED = "queued"
DUPLICATE = "duplicate"
RENEWED = "renewed"
DONE = "done"
ALREADY_DONE = "already_done"
HANDED_BACK = "handed_back"
DEAD = "dead"
REFUSED = "refused"
CANCELLED = "cancelled"
REQUESTED = "requested"
FINISHED = "finished"
UNKNOWN = "unknown"
# Dead-letter reasons given here
MAX_DELIVERIES = "max_deliveries"


@dataclasses.dataclass(frozen=True)
class Token:
    """The fencing token of one delivery: who received it, and at which delivery count."""

    consumer: str
    deliveries: int


@dataclasses.dataclass(frozen=True)
class Delivery:
    """One task entry, held by this consumer until it is completed, handed back or dead-lettered."""

    entry_id: str
    task_id: str
    task: str  # the task record as JSON, as dispatched
    token: Token
    previous_owner: str | None = None  # set when the entry was reclaimed from another consumer

    @property
    def attempt(self) -> int:
        """Which delivery this is, 1 for the first: what the agent gets as its attempt number."""
        return self.token.deliveries


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The answer of a script. ``status`` is one of the constants above; ``reason`` is set on refusal."""

    status: str
    detail: str = ""
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status != REFUSED


@dataclasses.dataclass(frozen=True)
class Dispatched:
    status: str  # QUEUED or DUPLICATE
    state: str  # the task id's state: queued, done or dead
    entry_id: str


@dataclasses.dataclass(frozen=True)
class Held:
    """A task entry a replica holds: who, and at which delivery (the attempt it runs)."""

    consumer: str
    deliveries: int
    running_s: float | None = None  # since its agent started, when the holder said so


@dataclasses.dataclass(frozen=True)
class LogEntry:
    """Lines of a running task's output, as its holder shipped them."""

    stream_id: str
    attempt: int
    text: str


@dataclasses.dataclass(frozen=True)
class Outcome:
    """An entry of a result or dead-letter stream, as the orchestrator reads it."""

    stream_id: str
    task_id: str
    fields: dict[str, str]


class StreamsTransport:
    """The streams transport of one worker role, as one consumer."""

    def __init__(
        self,
        client: RedisClient,
        worker: str,
        *,
        consumer: str | None = None,
        lease: float = 120.0,
        max_attempts: int = 3,
        retention: float = 7 * 86400.0,
    ) -> None:
        self.client = client
        self.keys = StreamKeys(worker)
        self.consumer = consumer or consumer_name()
        self.lease_ms = max(1, int(lease * 1000))
        self.max_attempts = max_attempts
        self.retention_ms = max(1, int(retention * 1000))
        self._scripts = {name: client.register_script(source) for name, source in scripts.ALL.items()}

    @classmethod
    def from_settings(cls, settings: Settings, client: RedisClient | None = None) -> StreamsTransport:
        return cls(
            client if client is not None else connect(settings),
            settings.require_worker(),
            lease=settings.lease,
            max_attempts=settings.max_attempts,
            retention=settings.stream_retention,
        )

    # -- the orchestrator's side: dispatch ----------------------------------------------------

    def dispatch(self, task_id: str, task: Mapping[str, Any] | str, *, allow_dead: bool = False) -> Dispatched:
        """Add a task entry, once per task id: a known id adds nothing and says where it is.

        ``allow_dead`` lets a dead-lettered id go again (`dlq retry`). An invalid task id or a
        task over the spool's size limit is a DispatchError, before anything is sent.
        """
        if not is_valid_task_id(task_id):
            raise DispatchError(f"task_id {task_id[:140]!r} does not match {TASK_ID_PATTERN.pattern}")
        payload = task if isinstance(task, str) else json.dumps(task, sort_keys=True)
        if len(payload.encode("utf-8")) > MAX_TASK_BYTES:
            raise DispatchError(f"task {task_id} is larger than {MAX_TASK_BYTES} bytes")
        reply = self._run(
            "dispatch",
            [self.keys.tasks, self.keys.task(task_id)],
            [self.keys.group, task_id, payload, "1" if allow_dead else "0"],
        )
        return Dispatched(status=reply[0], state=reply[1], entry_id=reply[2])

    # -- a replica's side: receive, renew, complete, hand back ---------------------------------

    def receive(self, block: float = 1.0) -> Delivery | None:
        """The next entry for this consumer, or None after ``block`` seconds. Call only when free.

        An entry idle past the lease (its holder died or stalled) comes first; one that has had
        its max deliveries goes to the dead letter on the way. Then a new entry, waiting up to
        ``block`` seconds; a nudge (a hand-back's wake-up) sends it back to claiming.
        """
        if not 0 <= block <= MAX_BLOCK:
            raise ValueError(f"block must be between 0 and {MAX_BLOCK} s, got {block}")
        deadline = time.monotonic() + block
        for _ in range(CLAIM_SCAN * 2):
            claimed = self.claim()
            if claimed is not None:
                return claimed
            entry = self._read_new(max(0.0, deadline - time.monotonic()))
            if entry is None:
                return None
            entry_id, fields = entry
            if "task_id" in fields:
                return Delivery(entry_id, fields["task_id"], fields.get("task", ""), Token(self.consumer, 1))
            # A nudge: drop it, then claim what it announced (or, if another took it, wait on).
            self._run("drop", [self.keys.tasks], [self.keys.group, entry_id])
        return None

    def claim(self) -> Delivery | None:
        """Claim the oldest entry idle past the lease; exhausted ones are dead-lettered on the way."""
        for _ in range(CLAIM_SCAN):
            reply = self._run(
                "claim",
                [self.keys.tasks],
                [self.keys.group, self.consumer, self.lease_ms, self.max_attempts, CLAIM_SCAN],
            )
            if reply[0] == "none":
                return None
            entry_id, owner, deliveries, fields = reply[1], reply[2], int(reply[3]), _pairs(reply[4])
            delivery = Delivery(
                entry_id, fields.get("task_id", ""), fields.get("task", ""), Token(self.consumer, deliveries), owner
            )
            if reply[0] == "claimed":
                log.info("claimed task=%s entry=%s from=%s delivery=%d", delivery.task_id, entry_id, owner, deliveries)
                return delivery
            reason = f"{MAX_DELIVERIES}: delivered {deliveries} times, the limit is {self.max_attempts}"
            verdict = self.dead_letter(delivery, reason, last_owner=owner)
            log.warning(
                "dead-lettered task=%s entry=%s last_owner=%s deliveries=%d: %s",
                delivery.task_id,
                entry_id,
                owner,
                deliveries,
                verdict.status,
            )
        return None

    def renew(self, delivery: Delivery) -> Verdict:
        """Reset the lease, if this delivery's token still holds it and it has not lapsed."""
        reply = self._run(
            "renew",
            [self.keys.tasks],
            [self.keys.group, delivery.entry_id, delivery.token.consumer, delivery.token.deliveries, self.lease_ms],
        )
        return _verdict(reply)

    def complete(self, delivery: Delivery, result: Mapping[str, Any]) -> Verdict:
        """Record the result and retire the entry, in one script; a late result is refused."""
        payload = json.dumps(result, sort_keys=True)
        digest = hashlib.sha256(payload.encode()).hexdigest()
        reply = self._run(
            "complete",
            [self.keys.tasks, self.keys.results, self.keys.task(delivery.task_id)],
            [
                self.keys.group,
                delivery.entry_id,
                delivery.token.consumer,
                delivery.token.deliveries,
                delivery.task_id,
                payload,
                digest,
                self.retention_ms,
            ],
        )
        verdict = _verdict(reply)
        if not verdict.ok:
            log.warning("late result refused task=%s entry=%s: %s", delivery.task_id, delivery.entry_id, verdict.detail)
        return verdict

    def hand_back(self, delivery: Delivery, *, count_delivery: bool = False) -> Verdict:
        """Give a held entry back for immediate pickup by another consumer, counting no delivery.

        ``count_delivery``: the delivery was an attempt after all (its run was cut short by a
        crash), so the next claim counts one more, as after a lapsed lease, but at once.
        """
        reply = self._run(
            "hand_back",
            [self.keys.tasks],
            [
                self.keys.group,
                delivery.entry_id,
                delivery.token.consumer,
                delivery.token.deliveries,
                HANDBACK_CONSUMER,
                "1" if count_delivery else "0",
            ],
        )
        return _verdict(reply)

    def dead_letter(self, delivery: Delivery, reason: str, *, last_owner: str | None = None) -> Verdict:
        """Move a held entry to the dead-letter stream with its payload, count, last owner, reason."""
        reply = self._run(
            "dead_letter",
            [self.keys.tasks, self.keys.dead, self.keys.task(delivery.task_id)],
            [
                self.keys.group,
                delivery.entry_id,
                delivery.token.consumer,
                delivery.token.deliveries,
                delivery.task_id,
                reason,
                last_owner or delivery.token.consumer,
                self.retention_ms,
            ],
        )
        return _verdict(reply)

    def cancel(self, task_id: str, result: Mapping[str, Any], request: Mapping[str, Any]) -> Verdict:
        """Cancel a queued task id: CANCELLED (retired now, ``result`` recorded), REQUESTED (the
        holder, named in ``detail``, is asked), FINISHED (``detail``: done or dead) or UNKNOWN."""
        reply = self._run(
            "cancel",
            [self.keys.tasks, self.keys.results, self.keys.task(task_id)],
            [
                self.keys.group,
                task_id,
                json.dumps(result, sort_keys=True),
                self.retention_ms,
                HANDBACK_CONSUMER,
                json.dumps(request, sort_keys=True),
            ],
        )
        return _verdict(reply)

    def cancel_requested(self, task_id: str) -> dict[str, Any] | None:
        """The cancel request a holder of ``task_id`` must act on, or None."""
        raw = self._redis(lambda: self.client.hget(self.keys.task(task_id), "cancel"))
        if raw is None:
            return None
        try:
            request = json.loads(raw)
        except ValueError:
            request = None
        return request if isinstance(request, dict) else {"by": "?"}

    def prune_consumers(self, idle: float) -> list[str]:
        """Remove consumers idle over ``idle`` seconds that hold nothing pending; their names."""
        reply = self._run("prune_consumers", [self.keys.tasks], [self.keys.group, int(idle * 1000), self.consumer])
        return [str(name) for name in reply]

    # -- heartbeats: one per replica -------------------------------------------------------------

    def beat(self, state: Mapping[str, Any], ttl: float) -> None:
        """Publish this replica's state for ``ttl`` seconds."""
        self._run(
            "beat",
            [self.keys.replica(self.consumer), self.keys.replicas],
            [self.consumer, json.dumps(state, sort_keys=True), max(1, int(ttl * 1000))],
        )

    def leave(self) -> None:
        """Remove this replica's heartbeat at a clean exit."""
        self._run("leave", [self.keys.replica(self.consumer), self.keys.replicas], [self.consumer])

    def replicas(self) -> dict[str, ReplicaState]:
        """Each live replica of the role and the state it last published (spool.readers: a hostile
        one reads as state ``unreadable``, with its one-line ``problem``)."""
        names = self._run("live_replicas", [self.keys.replicas], [])
        found: dict[str, ReplicaState] = {}
        for name in names:
            key = self.keys.replica(name)
            raw = self._redis(lambda key=key: self.client.get(key))  # type: ignore[misc]
            if raw is not None:
                found[str(name)] = replica_or_unreadable(raw, str(name))
        return found

    def held(self, limit: int = 1000) -> dict[str, Held]:
        """The task ids replicas hold now (running, or about to), at most ``limit``; a drained task
        waiting for its next taker is not held."""
        pending = self._redis(lambda: self.client.xpending_range(self.keys.tasks, self.keys.group, "-", "+", limit))
        pending = [p for p in pending or () if p.get("consumer") != HANDBACK_CONSUMER]
        if not pending:
            return {}

        def entries() -> Any:
            pipe = self.client.pipeline(transaction=False)
            for p in pending:
                pipe.xrange(self.keys.tasks, p["message_id"], p["message_id"])
            return pipe.execute()

        ids = {}
        for p, entry in zip(pending, self._redis(entries), strict=True):
            task_id = entry[0][1].get("task_id") if entry else None
            if isinstance(task_id, str) and is_valid_task_id(task_id):
                ids[task_id] = p

        def starts() -> Any:
            pipe = self.client.pipeline(transaction=False)
            for task_id in ids:
                pipe.hmget(self.keys.task(task_id), "started_ms", "started_attempt")
            return pipe.execute()

        now_s, now_us = self._redis(self.client.time)  # one clock with the starts': Redis's
        found = {}
        for (task_id, p), (started_ms, attempt) in zip(ids.items(), self._redis(starts), strict=True):
            deliveries = int(p["times_delivered"])
            running = None
            if started_ms and str(started_ms).isdigit() and str(attempt) == str(deliveries):
                running = max(0.0, now_s + now_us / 1e6 - int(started_ms) / 1000)
            found[task_id] = Held(str(p["consumer"]), deliveries, running)
        return found

    def mark_started(self, task_id: str, attempt: int) -> None:
        """Record that the agent of this delivery started, for `held` (see scripts.STARTED)."""
        self._run("started", [self.keys.task(task_id)], [attempt])

    # -- a running task's output, for `activation logs` on another host (worker/log_ship.py) -----

    def append_log(self, task_id: str, attempt: int, texts: Sequence[str], *, ttl: int, cap: int) -> None:
        """Add lines of ``task_id``'s output (its ``attempt``-th delivery); the stream keeps about
        ``cap`` entries and lives ``ttl`` seconds after its last append."""
        key = self.keys.log(task_id)

        def append() -> None:
            pipe = self.client.pipeline(transaction=False)
            for text in texts:
                pipe.xadd(key, {"attempt": attempt, "text": text}, maxlen=cap, approximate=True)
            pipe.expire(key, ttl)
            pipe.execute()

        self._redis(append)

    def read_log(self, task_id: str, after: str = "0", *, block: float = 0.0, count: int = 100) -> list[LogEntry]:
        """Entries of ``task_id``'s shipped output after the stream id ``after``; waits up to ``block`` s."""
        if not 0 <= block <= MAX_BLOCK:
            raise ValueError(f"block must be between 0 and {MAX_BLOCK} s, got {block}")
        key = self.keys.log(task_id)
        reply = self._redis(lambda: self.client.xread({key: after}, count=count, block=int(block * 1000) or None))
        found = []
        for _stream, entries in reply or ():
            for stream_id, fields in entries:
                attempt = str((fields or {}).get("attempt", ""))
                found.append(LogEntry(stream_id, int(attempt) if attempt.isdigit() else 0, str(fields.get("text", ""))))
        return found

    # -- the orchestrator's side: results and dead letters --------------------------------------

    def read_results(self, block: float = 0.0, count: int = 100) -> list[Outcome]:
        """Results not yet acknowledged by the orchestrator (its own unacked first), oldest first."""
        return self._read_outcomes(self.keys.results, block, count)

    def read_dead_letters(self, block: float = 0.0, count: int = 100) -> list[Outcome]:
        return self._read_outcomes(self.keys.dead, block, count)

    def ack_results(self, stream_ids: Sequence[str]) -> None:
        self._ack(self.keys.results, stream_ids)

    def ack_dead_letters(self, stream_ids: Sequence[str]) -> None:
        self._ack(self.keys.dead, stream_ids)

    def task_record(self, task_id: str) -> dict[str, str]:
        """The task id's small key: state (queued, done, dead), entry, and the recorded result."""
        record: dict[str, str] = self._redis(lambda: self.client.hgetall(self.keys.task(task_id)))
        return record

    # -- plumbing -------------------------------------------------------------------------------

    def ensure_groups(self) -> None:
        """Create the task group and the orchestrator's groups at 0, with their streams, if missing.

        After a Redis restart without persistence (NOGROUP) this is what recreates them.
        """
        for stream, group in (
            (self.keys.tasks, self.keys.group),
            (self.keys.results, ORCHESTRATOR_GROUP),
            (self.keys.dead, ORCHESTRATOR_GROUP),
        ):
            try:
                self.client.xgroup_create(stream, group, id="0", mkstream=True)
                log.info("created group %s on %s at 0", group, stream)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise StreamsError(f"XGROUP CREATE {stream} failed: {describe(exc)}") from None
            except REDIS_ERRORS as exc:
                raise StreamsError(f"XGROUP CREATE {stream} failed: {describe(exc)}") from None

    def _run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        return self._redis(lambda: self._scripts[name](keys=keys, args=args))

    def _redis(self, call: Callable[[], Any]) -> Any:
        """Run one command; on NOGROUP (Redis lost its data) recreate the groups and run it once more."""
        try:
            return call()
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise StreamsError(f"streams transport of {self.keys.worker}: {describe(exc)}") from None
            # First use, or Redis restarted without persistence and lost streams and groups.
            log.warning("no consumer group for %s (NOGROUP): creating the groups at 0", self.keys.worker)
        except REDIS_ERRORS as exc:
            raise StreamsError(f"streams transport of {self.keys.worker}: {describe(exc)}") from None
        self.ensure_groups()
        try:
            return call()
        except REDIS_ERRORS as exc:
            raise StreamsError(f"streams transport of {self.keys.worker}: {describe(exc)}") from None

    def _read_new(self, block: float) -> tuple[str, dict[str, str]] | None:
        reply = self._redis(
            lambda: self.client.xreadgroup(
                self.keys.group, self.consumer, {self.keys.tasks: ">"}, count=1, block=int(block * 1000) or None
            )
        )
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                return entry_id, dict(fields or {})
        return None

    def _read_outcomes(self, stream: str, block: float, count: int) -> list[Outcome]:
        if not 0 <= block <= MAX_BLOCK:
            raise ValueError(f"block must be between 0 and {MAX_BLOCK} s, got {block}")
        found: list[Outcome] = []
        # Our own unacknowledged entries first (a crash between reading and mirroring), then new.
        for start, wait in (("0", None), (">", int(block * 1000) or None)):

            def read(start: str = start, wait: int | None = wait) -> Any:
                return self.client.xreadgroup(
                    ORCHESTRATOR_GROUP, ORCHESTRATOR_GROUP, {stream: start}, count=count, block=wait
                )

            reply = self._redis(read)
            trimmed = []
            for _stream, entries in reply or ():
                for stream_id, fields in entries:
                    if fields:
                        found.append(Outcome(stream_id, fields.get("task_id", ""), dict(fields)))
                    else:
                        trimmed.append(stream_id)  # trimmed by age before we mirrored it
            self._ack(stream, trimmed)
            if found:
                break
        return found

    def _ack(self, stream: str, stream_ids: Sequence[str]) -> None:
        if stream_ids:
            self._redis(lambda: self.client.xack(stream, ORCHESTRATOR_GROUP, *stream_ids))


def _pairs(flat: Sequence[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _verdict(reply: Sequence[Any]) -> Verdict:
    if reply[0] == REFUSED:
        return Verdict(REFUSED, str(reply[2]), str(reply[1]))
    return Verdict(str(reply[0]), str(reply[1]) if len(reply) > 1 else "")
