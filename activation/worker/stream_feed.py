"""The executor's side of the streams transport (ACTIVATION_TRANSPORT=streams).

The executor is the consumer: when it is free it takes one entry (inbox.take_one writes it into
the local inbox), claims and runs it as any task. This module speaks to the stream for it: the
lease renewed at claim and kept while the agent runs, the completion, the hand-back, the stream's
dead letter, and what becomes of a stream claim a killed executor left. A task file from the
stream carries its delivery's fencing token (``metadata.stream``), so a task put back in the
local inbox, a claim or a held outcome always knows which delivery it is.

Local moves stay the executor's; the stream is the truth for a streamed task: once it is handed
back, dead-lettered or its lease lost, the local copy is only dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from activation.config import Settings
from activation.errors import BadTask, StreamsError
from activation.spool import outcome as outcomes
from activation.spool.layout import Spool
from activation.spool.readers import peek_record, result_record
from activation.spool.records import ResultRecord
from activation.spool.task import task_id_of, task_record
from activation.transport.streams.client import Delivery, StreamsTransport, Verdict
from activation.transport.streams.connect import SOCKET_TIMEOUT
from activation.transport.streams.inbox import STREAM_METADATA, delivery_metadata, delivery_of, take_one
from activation.transport.streams.keys import replica_name
from activation.transport.streams.lease import RENEWALS_PER_LEASE, LeaseKeeper
from activation.transport.streams.link import StreamsLink
from activation.worker.liveness import Condition
from activation.worker.log_ship import LogShipper
from activation.worker.stream_answers import DROPPED, IDLE_BLOCK, NOT_STREAMED, PUT_BACK

T = TypeVar("T")

CANCEL_POLL = 1.0  # seconds between looks for an orchestrator's cancel of the running task
STREAMS_UNREACHABLE = "streams_unreachable"
REFUSED = "refused"  # metadata.stream.refused of a local result whose completion was refused


def streamed(record: dict[str, Any] | ResultRecord) -> Delivery | None:
    """The delivery a task (or its result) came from; None for a task that never was on the stream."""
    metadata = record.get("metadata")
    if not isinstance(metadata, dict) or STREAM_METADATA not in metadata:
        return None
    try:
        return delivery_of(cast(dict[str, Any], record))
    except BadTask:
        return None  # a token that does not parse names no delivery: run it as a local task


def refused_copy(result: ResultRecord, verdict: Verdict) -> ResultRecord:
    """The local record of a late result: the same, with ``metadata.stream.refused`` saying why."""
    late = cast(ResultRecord, dict(result))
    metadata = dict(late.get("metadata") or {})
    token = dict(metadata.get(STREAM_METADATA) or {})
    token[REFUSED] = f"{verdict.reason}: {verdict.detail}"
    metadata[STREAM_METADATA] = token
    late["metadata"] = metadata
    return late


class StreamFeed:
    """One replica's consumer of its role's task stream, for the executor."""

    def __init__(
        self,
        settings: Settings,
        spool: Spool,
        log: logging.Logger,
        condition: Condition,
        *,
        consumer: str | None = None,
    ) -> None:
        self.spool = spool
        self.condition = condition
        self.worker = settings.require_worker()
        self.log = log
        self.lease = settings.lease
        self.max_timeout = settings.max_task_timeout
        self.consumer = consumer or replica_name(run_dir=settings.run_dir)
        consequence = "no task is taken or completed until it is back; finished outcomes are held"
        self.link = StreamsLink(settings, consumer=self.consumer, log=log, what="task stream", consequence=consequence)
        # Renewals get a client of their own with a socket timeout well under the lease: a renewal
        # stuck on a cut network must not hold the supervise loop past the moment to give up.
        self.renew_timeout = min(SOCKET_TIMEOUT, max(0.05, settings.lease / 8))
        self.leases = StreamsLink(
            settings,
            consumer=self.consumer,
            log=log,
            what="lease renewals",
            consequence="the task waits in the local inbox",
            socket_timeout=self.renew_timeout,
        )
        # The keeper gives up this much before the lease ends: the agent tree's kill grace plus a
        # renewal that hangs for its whole socket timeout (LeaseKeeper's docstring).
        self.margin = min(settings.kill_grace + self.renew_timeout, settings.lease / 2)
        self._completed: set[str] = set()  # held results whose completion Redis confirmed
        self._late: set[str] = set()  # results whose completion was refused: another run is the role's
        self._next_cancel_poll = 0.0
        self._fresh: tuple[Delivery, float] | None = None  # the last entry taken, and when the read was sent
        self._shipper: LogShipper | None = None  # the running task's log, copied to Redis
        self._start_told = False  # whether Redis knows the running task's agent started

    @property
    def down(self) -> bool:
        return self.link.outage.down or self.leases.outage.down

    def describe_outage(self) -> str:
        error = self.link.outage.last_error or self.leases.outage.last_error or "unreachable"
        return f"the task stream is unreachable ({error}); no task is taken or completed until it is back"

    def ready(self) -> bool:
        return self.link.ready()

    def pause_left(self) -> float:
        return self.link.pause_left()

    def close(self) -> None:
        self.link.close()
        self.leases.close()

    # -- taking and holding ---------------------------------------------------------------------

    def _call(self, link: StreamsLink, command: Callable[[StreamsTransport], T]) -> T | None:
        """``command`` through ``link``; the stream's reachability becomes the executor's condition."""
        value = link.call(command)
        if self.down:
            self.condition.dependency_down(STREAMS_UNREACHABLE, self.describe_outage())
        else:
            self.condition.dependency_up()
        return value

    def take(self, block: float = IDLE_BLOCK) -> Delivery | None:
        """One entry into the local inbox (call only when the executor is free); raises OSError."""
        sent = time.monotonic()  # before the read: the lease Redis counts from delivery starts later
        delivery = self._call(
            self.link, lambda t: take_one(t, self.spool, self.worker, block=block, max_timeout=self.max_timeout)
        )
        self._fresh = (delivery, sent) if delivery is not None else None
        return delivery

    def hold(self, task: dict[str, Any]) -> LeaseKeeper | str:
        """Before a claimed task's agent starts: renew its lease once (a refusal runs nothing).

        The keeper to run the agent with (its ``should_abort`` renews every quarter lease), or
        NOT_STREAMED, PUT_BACK or DROPPED.
        """
        delivery = streamed(task)
        if delivery is None:
            return NOT_STREAMED
        if not self.ours(delivery):
            return PUT_BACK  # received by a predecessor tree and never started: back, uncounted
        fresh, self._fresh = self._fresh, None
        if (
            fresh is not None
            and fresh[0].entry_id == delivery.entry_id
            and fresh[0].token == delivery.token
            and time.monotonic() - fresh[1] < self.lease / RENEWALS_PER_LEASE
        ):
            # Received by this very process moments ago (well inside the first quarter lease):
            # its lease is as good as a renewal's, counted from before the read. The keeper's
            # first renewal checks the token; no round trip sits between the entry and the agent.
            return self._keeper(delivery, fresh[1])
        answer = self.renew_at_claim(delivery, time.monotonic())
        if answer is None:
            return PUT_BACK  # the local inbox keeps it until Redis answers; the lease lapses or not
        if isinstance(answer, Verdict):
            self.drop_local(delivery.task_id)
            self.log.warning(
                "task %s not started: its lease is gone (%s: %s)",
                delivery.task_id,
                answer.reason,
                answer.detail,
                extra={"worker": self.worker, "task_id": delivery.task_id, "event": "lease_lost"},
            )
            return DROPPED
        return answer

    def renew_at_claim(self, delivery: Delivery, sent: float) -> LeaseKeeper | Verdict | None:
        """Renew once before the agent starts: the keeper to run with, the refusal, or None (unreachable).

        ``sent`` is when the renewal was sent (monotonic): the keeper counts the lease from then.
        """
        verdict = self._call(self.leases, lambda t: t.renew(delivery))
        if verdict is None or not verdict.ok:
            return verdict
        return self._keeper(delivery, sent)

    def _keeper(self, delivery: Delivery, held_since: float) -> LeaseKeeper:
        """The keeper of ``delivery``'s lease, counted from ``held_since`` (monotonic)."""

        def renew() -> Verdict:
            # The keeper retries on its own schedule and logs; here only the condition follows.
            try:
                answer = self.leases.transport.renew(delivery)
            except StreamsError as exc:
                self.condition.dependency_down(STREAMS_UNREACHABLE, f"lease renewals fail ({exc})")
                raise
            self.condition.dependency_up()
            return answer

        return LeaseKeeper(renew, self.lease, held_since=held_since, margin=self.margin, task_id=delivery.task_id)

    def cancel_request(self, task_id: str) -> dict[str, Any] | None:
        """The orchestrator's request to cancel the running ``task_id`` (its task key says so),
        looked for once a CANCEL_POLL on the renewals' client; None meanwhile, or unreachable
        (a lost Redis is the lease keeper's business)."""
        now = time.monotonic()
        if now < self._next_cancel_poll:
            return None
        self._next_cancel_poll = now + CANCEL_POLL
        try:
            return self.leases.transport.cancel_requested(task_id)
        except StreamsError:
            return None

    # -- the running task's log, for readers on other hosts (log_ship.py) -------------------------

    def start_log(self, task: dict[str, Any], path: Path) -> None:
        delivery = streamed(task)
        if delivery is not None:
            self._shipper = LogShipper(lambda: self.leases.transport, path, delivery.task_id, delivery.attempt)
            self._start_told = False

    def ship_log(self) -> None:
        """Each supervision tick of a streamed run; the first one also says the agent started
        (after the spawn: no round trip sits between the entry and the agent)."""
        shipper = self._shipper
        if shipper is None:
            return
        if not self._start_told:
            self._start_told = True
            with contextlib.suppress(StreamsError):
                self.leases.transport.mark_started(shipper.task_id, shipper.attempt)
        shipper.ship()

    def end_log(self) -> None:
        """The run ended: what its log holds goes, before the log moves beside the result."""
        shipper, self._shipper = self._shipper, None
        if shipper is not None:
            shipper.ship(final=True)

    # -- giving up a delivery -------------------------------------------------------------------

    def complete(self, result: ResultRecord) -> Verdict | None:
        """Record the result on the stream (idempotent); the verdict, or None while unreachable."""
        delivery = streamed(result)
        assert delivery is not None, "complete() is only for streamed results"
        return self._call(self.link, lambda t: t.complete(delivery, dict(result)))

    def complete_held(self, held: outcomes.HeldResults) -> bool:
        """Complete every held streamed result on the stream; False while Redis cannot be reached.

        The caller writes them locally afterwards (HeldResults.flush). A refused (late) result is not
        the role's: another replica's run is. Its local record is still written here, marked
        ``metadata.stream.refused``, so that local `show` tells what ran on this host, and it is
        neither announced nor counted in this replica's results.
        """
        self._completed &= set(held.results)
        for task_id, result in list(held.results.items()):
            if task_id in self._completed or streamed(result) is None:
                continue
            verdict = self.complete(result)
            if verdict is None:
                return False
            self._completed.add(task_id)
            if verdict.ok:
                continue
            late = refused_copy(result, verdict)
            try:
                outcomes.finish_write(self.spool, self.worker, late)
            except OSError:
                held.results[task_id] = late  # written with the other held results, later
                continue
            del held.results[task_id]
            held.saved.discard(task_id)
            self._late.add(task_id)
            self.log.warning(
                "the result of %s is late, another run is the role's: %s (kept locally, marked refused)",
                task_id,
                verdict.detail,
                extra={"worker": self.worker, "task_id": task_id, "event": "late_result"},
            )
        return True

    def complete_again(self, delivery: Delivery) -> None:
        """A delivery of a task id that already has a local result: complete it with that result.

        The orchestrator re-sends what Redis lost (a restart without persistence); a run this
        replica finished is not run again, its result is recorded on the stream again, under the
        new delivery's token. While Redis is away the inbox file stays, and the executor drops it
        as a duplicate later (the entry's lease then lapses to another replica, which does the same).
        """
        task_id = delivery.task_id
        result = peek_record(self.spool.result_path(self.worker, task_id), lambda v: result_record(v, task_id=task_id))
        if result is None:
            return
        result["metadata"] = delivery_metadata(result.get("metadata"), delivery)
        verdict = self._call(self.link, lambda t: t.complete(delivery, result))
        if verdict is None:
            return
        self.drop_local(task_id, claimed=False)
        self.log.info(
            "%s already ran here: its result went to the stream again (delivery %d, %s)",
            task_id,
            delivery.attempt,
            verdict.status,
            extra={"worker": self.worker, "task_id": task_id, "event": "completed_again"},
        )

    def was_late(self, task_id: str) -> bool:
        """Whether ``task_id``'s completion was refused (asked once, after `complete_held`)."""
        if task_id in self._late:
            self._late.discard(task_id)
            return True
        return False

    def give_back(self, task_id: str, *, claimed: bool = True, count: bool = False) -> bool:
        """Hand a streamed task back for another replica (``count``: its run was an attempt) and drop
        the local copy. False when it is no streamed task, or Redis cannot be reached: then the
        local inbox keeps it, and it is settled once Redis is back."""
        delivery = self.local_delivery(task_id, claimed=claimed)
        if delivery is None:
            return False
        verdict = self._call(self.link, lambda t: t.hand_back(delivery, count_delivery=count))
        if verdict is None:
            return False
        self.drop_local(task_id, claimed=claimed)
        extra = {"worker": self.worker, "task_id": task_id, "event": "handed_back"}
        if verdict.ok:
            counted = "counted" if count else "not counted"
            self.log.info(
                "handed %s back to the stream for another replica (delivery %d %s)",
                task_id,
                delivery.attempt,
                counted,
                extra=extra,
            )
        else:
            self.log.info("dropped the local copy of %s: %s", task_id, verdict.detail, extra=extra)
        return True

    def give_back_inbox(self) -> None:
        """At exit: a streamed task still in the local inbox never started here; hand it back, uncounted."""
        try:
            names = self.spool.inbox_names(self.worker)
        except OSError:
            return
        for name in names:
            task_id = task_id_of(name)
            delivery = self.local_delivery(task_id, claimed=False)
            if delivery is not None and self.ours(delivery):
                self.give_back(task_id, claimed=False)

    def dead_letter_claim(self, task_id: str, reason: str, detail: str) -> str | None:
        """A streamed claim dies on the stream (the orchestrator mirrors it), its local copy dropped.

        The verdict's status; None while Redis cannot be reached; NOT_STREAMED for a local task.
        """
        delivery = self.local_delivery(task_id, claimed=True)
        if delivery is None:
            return NOT_STREAMED
        verdict = self._call(self.link, lambda t: t.dead_letter(delivery, f"{reason}: {detail}"))
        if verdict is None:
            return None
        self.drop_local(task_id)
        self.log.warning(
            "task %s sent to the stream's dead letter: %s: %s (%s)",
            task_id,
            reason,
            detail,
            verdict.status,
            extra={"worker": self.worker, "task_id": task_id, "event": "dead_letter"},
        )
        return verdict.status

    # -- recovery at the executor's start ---------------------------------------------------

    def recover_claim(self, task_id: str) -> bool:
        """A streamed run cut short by its executor's death goes back to the stream at once, its
        delivery counted (a crash mid-run is an attempt): no lease to wait out, and at
        ACTIVATION_MAX_ATTEMPTS the next claim dead-letters it. False when the claim is no streamed
        task (or has a result): settle_claim does the rest. StreamsError while Redis is away."""
        if self.spool.has_result(self.worker, task_id):
            return False
        delivery = self.local_delivery(task_id, claimed=True)
        if delivery is None:
            return False
        verdict = self._call(self.link, lambda t: t.hand_back(delivery, count_delivery=True))
        if verdict is None:
            raise StreamsError(self.describe_outage())
        self.drop_local(task_id)
        what = f"back on the stream, delivery {delivery.attempt} counted" if verdict.ok else verdict.detail
        self.log.warning(
            "recovery: %s was running when its executor stopped; %s",
            task_id,
            what,
            extra={"worker": self.worker, "task_id": task_id, "event": "recovered"},
        )
        return True

    def saved_outcome(self, task_id: str) -> ResultRecord | None:
        """A streamed run's saved outcome beside its claim: to be completed on the stream, then
        written (the executor holds it); None when it is none, or a leftover settle_outcome drops."""
        result = outcomes.load_outcome(self.spool, self.worker, task_id)
        if result is None or streamed(result) is None:
            return None
        if self.spool.has_result(self.worker, task_id) or not self.spool.claim_path(self.worker, task_id).exists():
            return None
        self.log.info(
            "recovery: the saved result of %s is completed on the stream, then written; its agent does not run again",
            task_id,
            extra={"worker": self.worker, "task_id": task_id, "event": "recovered"},
        )
        return result

    # -- the local copies ---------------------------------------------------------------------

    def local_delivery(self, task_id: str, *, claimed: bool) -> Delivery | None:
        """The delivery of the local claim (or inbox file) of ``task_id``; None if it is none."""
        path = self.spool.claim_path(self.worker, task_id) if claimed else self.spool.task_path(self.worker, task_id)
        task = peek_record(path, lambda v: task_record(v, task_id))
        return None if task is None else streamed(cast(dict[str, Any], task))

    def drop_local(self, task_id: str, *, claimed: bool = True) -> None:
        """Forget the local copy of a delivery the stream has settled (or another replica holds)."""
        path = self.spool.claim_path(self.worker, task_id) if claimed else self.spool.task_path(self.worker, task_id)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def ours(self, delivery: Delivery) -> bool:
        """Whether this replica received it: a predecessor tree's token is settled, never renewed."""
        return delivery.token.consumer == self.consumer
