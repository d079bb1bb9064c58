"""The Redis wake source: SUBSCRIBE ``activate:<worker>`` and turn each message into an inbox name.

A message only wakes; the file delivers. So a message is vetted (a task id, or a path inside this
worker's inbox), hostile ones are refused and counted, an outage costs nothing but latency, and
every (re)subscribe asks the listener for a rescan, because pub/sub drops what it cannot deliver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from activation.clock import iso_now
from activation.config import redact_url
from activation.observability.samples import worker_metrics
from activation.spool.layout import Spool
from activation.spool.task import TASK_SUFFIX
from activation.transport import pubsub as events
from activation.transport.redis_link import Outage
from activation.worker.wake.base import Notify, ThreadedSource
from activation.worker.wake.messages import INVALID_NAME, vet_message

log = logging.getLogger("activation.listener")

CONNECT_TIMEOUT = 1.0  # seconds; also bounds how long stop() can wait on a connect in progress
# One get_message(): how soon stop() is noticed. Each idle wake-up costs ~0.1 ms of CPU here, so
# 4 a second alone would eat most of the idle tree's 0.1%-of-a-core budget.
MESSAGE_WAIT = 1.0
BACKOFF_MIN = 0.1
# A subscription must have lasted this long before a loss starts the backoff over: a server that
# accepts and then drops us at once (say, an output-buffer limit) meets the capped delay, rather
# than ten reconnects and inbox rescans a second.
STABLE_AFTER = 10.0
JOIN_TIMEOUT = CONNECT_TIMEOUT + MESSAGE_WAIT + 1.0
# A message that names a file not visible yet (a writer that publishes before its rename lands,
# or a filesystem that shows it late) is looked at again after each of these delays, ~1 s in all,
# between messages rather than by sleeping; the rescan takes whatever is still missing.
RETRY_DELAYS = (0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.35)
MAX_PENDING = 1000  # names awaiting a retry; past that a flood of phantom ids is left to the rescan
REFUSAL_LOG_INTERVAL = 60.0  # seconds: per reason, the first refusal is logged, then one count a minute
SAMPLE_CHARS = 60  # how much of a refused message a log line shows


def _sample(data: bytes) -> str:
    """A short, printable, log-safe excerpt of a refused message."""
    return repr(data[:SAMPLE_CHARS]) + ("..." if len(data) > SAMPLE_CHARS else "")


class _Refusals:
    """Counts refused messages; logs the first of each reason, then at most one count a minute."""

    def __init__(self, worker: str, channel: str) -> None:
        self.worker = worker
        self.channel = channel
        self.counts: Counter[str] = Counter()
        self._logged_at: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()
        self._metric = worker_metrics().listener_refused

    def refuse(self, reason: str, data: bytes) -> None:
        self.counts[reason] += 1
        self._metric.labels(reason=reason).inc()
        last = self._logged_at.get(reason)
        if last is None:
            self._logged_at[reason] = time.monotonic()
            log.warning(
                "refused a message on %s: %s: %s (further refusals for this reason are counted, "
                "and reported at most once a minute)",
                self.channel,
                reason,
                _sample(data),
                extra={"worker": self.worker, "event": "redis_refused"},
            )
        else:
            self._unlogged[reason] += 1
            self.flush()

    def flush(self) -> None:
        """Report the refusals not yet logged, for each reason whose minute is up."""
        if not self._unlogged:
            return
        now = time.monotonic()
        for reason, count in list(self._unlogged.items()):
            if now - self._logged_at.get(reason, 0.0) >= REFUSAL_LOG_INTERVAL:
                del self._unlogged[reason]
                self._logged_at[reason] = now
                log.warning(
                    "refused %d more messages on %s: %s (%d in all)",
                    count,
                    self.channel,
                    reason,
                    self.counts[reason],
                    extra={"worker": self.worker, "event": "redis_refused"},
                )


class RedisSource(ThreadedSource):
    """SUBSCRIBE ``activate:<worker>`` on its own thread; reconnects with capped exponential backoff.

    alive() means the thread runs: Redis being down is an outage this source rides out on its
    own, not a death for the listener to restart. ``on_subscribed`` is called after every
    (re)subscribe is confirmed: anything published before then is lost, so the inbox must be
    rescanned.
    """

    name = "redis"
    thread_name = "redis-source"
    join_timeout = JOIN_TIMEOUT
    # Redis reports only the arrivals that someone announces, so it must not make the periodic
    # rescan hold back new files the way a live inotify watch does.
    event_driven = False

    def __init__(
        self,
        spool: Spool,
        worker: str,
        url: str,
        *,
        backoff_max: float = 5.0,
        on_subscribed: Callable[[], None] | None = None,
    ) -> None:
        self.spool = spool
        self.worker = worker
        self.inbox = spool.inbox(worker)
        self.url = url
        self.backoff_max = max(backoff_max, BACKOFF_MIN)
        self.channel = events.activate_channel(worker)
        self._on_subscribed = on_subscribed or (lambda: None)
        super().__init__()
        self._metrics = worker_metrics()
        self.refusals = _Refusals(worker, self.channel)
        # Read by stats() on other threads; each is replaced whole, never mutated in place.
        self.connected = False
        self.since: str | None = None  # when `connected` last changed
        self.subscribes = 0
        self._extra = {"worker": worker, "event": "redis"}
        self.outage = Outage(
            log,
            f"{redact_url(url)} (SUBSCRIBE {self.channel})",
            extra={"worker": worker},
            cap=self.backoff_max,
            base=BACKOFF_MIN,
            consequence="the file sources and the rescan carry on",
        )
        # Only the subscriber thread touches these.
        self._pending: dict[str, tuple[int, float]] = {}  # name -> (retries done, next look), monotonic
        self._client: Any = None
        self._pubsub: Any = None
        self._subscribed_at: float | None = None

    # -- WakeSource -----------------------------------------------------------------------------

    def start(self, notify: Notify) -> None:
        self._set_connected(False)
        super().start(notify)

    def status(self) -> dict[str, Any]:
        return {
            "configured": True,
            "connected": self.connected,
            "url": redact_url(self.url),
            "channel": self.channel,
            "last_error": self.outage.last_error,
            "since": self.since,
            "subscribes": self.subscribes,
            "outages": self.outage.outages,
            "refused": dict(self.refusals.counts),
        }

    # -- the subscriber thread ------------------------------------------------------------------

    def _run(self, notify: Notify, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    self._step(notify, stop)
                except Exception as exc:  # a bug here must not end the thread: ride it out as an outage
                    log.exception("redis source failed; reconnecting", extra=self._extra)
                    self._lost(exc)
                    self._pause(notify, stop)
        finally:
            self._disconnect()
            self._set_connected(False)

    def _step(self, notify: Notify, stop: threading.Event) -> None:
        if self._pubsub is None and not self._subscribe():
            self._pause(notify, stop)
            return
        try:
            message = self._pubsub.get_message(timeout=self._wait())
        except Exception as exc:  # ConnectionError, TimeoutError, a reset socket, a parser error
            self._lost(exc)
            self._pause(notify, stop)
            return
        if message is not None:
            self._handle(message, notify)
        self._retry_due(notify)
        self.refusals.flush()

    def _subscribe(self) -> bool:
        try:
            client = events.connect(self.url, timeout=CONNECT_TIMEOUT, for_pubsub=True)
            pubsub = client.pubsub()  # type: ignore[no-untyped-call]
            self._client, self._pubsub = client, pubsub
            pubsub.subscribe(self.channel)  # confirmed by a "subscribe" message, see _handle
        except Exception as exc:
            self._lost(exc)
            return False
        return True

    def _handle(self, message: dict[str, Any], notify: Notify) -> None:
        kind = message.get("type")
        if kind == "message":
            data = message.get("data")
            if isinstance(data, str):  # a REDIS_URL with decode_responses=true
                data = data.encode("utf-8", "surrogateescape")
            if isinstance(data, bytes):
                self._message(data, notify)
        elif kind == "subscribe":
            self._subscribed()

    def _subscribed(self) -> None:
        """The server confirmed SUBSCRIBE: from now on nothing published is missed."""
        self.subscribes += 1
        self._subscribed_at = time.monotonic()
        if not self.outage.down:
            log.info("subscribed to %s at %s", self.channel, redact_url(self.url), extra=self._extra)
        # The backoff starts over only once a subscription has lasted (see _lost).
        self.outage.recovered(reset_backoff=False)
        self._set_connected(True)
        try:
            self._on_subscribed()
        except Exception:
            log.exception("rescan request after subscribing failed", extra=self._extra)

    def _message(self, data: bytes, notify: Notify) -> None:
        name, reason = vet_message(data, self.inbox)
        if name is None:
            self.refusals.refuse(reason or INVALID_NAME, data)
            return
        self._offer(name, 0, notify)

    def _offer(self, name: str, retries: int, notify: Notify) -> None:
        """Notify ``name`` if its file is there; otherwise look again a little later."""
        if os.path.lexists(f"{self.inbox}/{name}"):
            self._pending.pop(name, None)
            notify(name, self.name)  # not complete: a publisher may announce before it finished
            return
        task_id = name[: -len(TASK_SUFFIX)]
        if retries >= len(RETRY_DELAYS) or self._handled(task_id):
            self._pending.pop(name, None)  # taken already, or never came: the rescan has the rest
            return
        if retries == 0 and name not in self._pending and len(self._pending) >= MAX_PENDING:
            return
        self._pending[name] = (retries + 1, time.monotonic() + RETRY_DELAYS[retries])

    def _handled(self, task_id: str) -> bool:
        return os.path.lexists(self.spool.claim_path(self.worker, task_id)) or os.path.lexists(
            self.spool.result_path(self.worker, task_id)
        )

    def _retry_due(self, notify: Notify) -> None:
        if not self._pending:
            return
        now = time.monotonic()
        due = [(name, retries) for name, (retries, at) in self._pending.items() if at <= now]
        for name, retries in due:
            self._offer(name, retries, notify)

    def _wait(self) -> float:
        """How long one get_message() may block: until the next retry is due, at most MESSAGE_WAIT."""
        if not self._pending:
            return MESSAGE_WAIT
        due = min(at for _, at in self._pending.values())
        return min(MESSAGE_WAIT, max(0.0, due - time.monotonic()))

    def _pause(self, notify: Notify, stop: threading.Event) -> None:
        """Wait out the outage's backoff, still serving due retries."""
        while not stop.is_set():
            if self.outage.ready():
                return
            now = time.monotonic()
            stop.wait(min(max(self.outage.retry_at - now, 0.0), self._wait()))
            self._retry_due(notify)

    def _lost(self, exc: BaseException) -> None:
        """The connection failed or never came: close it; the outage says so once."""
        self._disconnect()
        subscribed_at, self._subscribed_at = self._subscribed_at, None
        if subscribed_at is not None and time.monotonic() - subscribed_at >= STABLE_AFTER:
            self.outage.reset_backoff()
        self._set_connected(False)
        self.outage.failed(events.describe(exc, self.url))

    def _disconnect(self) -> None:
        pubsub, client, self._pubsub, self._client = self._pubsub, self._client, None, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                pubsub.close()
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected or self.since is None:
            self.since = iso_now()
        self.connected = connected
        self._metrics.redis_connected.set(1 if connected else 0)
