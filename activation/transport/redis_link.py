"""One best-effort Redis link: lazy connect, fail fast, and one rule for an outage.

Redis only wakes and reports; the spool is the truth. So a failed command never stalls or
raises into the caller's hot path: the outage is logged once when it starts and once when it
ends, and between attempts Redis is left alone for redis-py's own capped, jittered backoff, so
twenty workers do not hammer a restarting server in step. Every Redis user shares `Outage`;
the request/reply ones (done events, heartbeat key, dispatch) also share `RedisLink`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from redis.backoff import EqualJitterBackoff

from activation.config import redact_url
from activation.transport import pubsub

T = TypeVar("T")

BACKOFF_BASE = 0.05  # seconds: the first pause after a failure; it doubles per failure up to the cap
BACKOFF_CAP = 5.0


class Outage:
    """Whether Redis is down for one user (``what``: the redacted URL and the purpose), since when,
    and how long to leave it alone.

    ``failed`` logs a warning only when an outage starts; ``recovered`` logs once when it ends.
    The pause after the n-th failure in a row is redis-py's EqualJitterBackoff (half fixed, half
    random), capped at ``cap``.
    """

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        *,
        extra: Mapping[str, str] | None = None,
        cap: float = BACKOFF_CAP,
        base: float = BACKOFF_BASE,
        consequence: str = "the spool carries on",
    ) -> None:
        self.log = log
        self.what = what
        self.extra = dict(extra or {})
        self.consequence = consequence
        self.cap = max(cap, base)
        self._backoff = EqualJitterBackoff(cap=self.cap, base=base)
        self.failures = 0
        self.down_since: float | None = None
        self.outages = 0
        self.last_error: str | None = None
        self.retry_at = 0.0  # monotonic: no attempt before this

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def ready(self) -> bool:
        """True once the pause after the last failure is over (always, while up)."""
        return time.monotonic() >= self.retry_at

    def failed(self, error: str) -> float:
        """Count a failure; returns the pause before the next attempt."""
        self.last_error = error
        pause = self._backoff.compute(self.failures)
        self.failures += 1
        self.retry_at = time.monotonic() + pause
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.outages += 1
            self.log.warning(
                "redis unreachable at %s: %s; %s, retrying with backoff up to %gs",
                self.what,
                error,
                self.consequence,
                self.cap,
                extra={**self.extra, "event": "redis_down"},
            )
        return pause

    def recovered(self, *, reset_backoff: bool = True) -> None:
        """Redis answered. ``reset_backoff=False`` keeps the failure count, for a subscriber that
        must first stay up a while before a new loss counts as a fresh start."""
        if reset_backoff:
            self.reset_backoff()
        if self.down_since is not None:
            self.log.info(
                "redis reachable again at %s after %.1fs",
                self.what,
                time.monotonic() - self.down_since,
                extra={**self.extra, "event": "redis_up"},
            )
            self.down_since = None
        self.last_error = None

    def reset_backoff(self) -> None:
        self.failures = 0
        self.retry_at = 0.0


class RedisLink:
    """A lazily connected client for request/reply commands, under one `Outage`.

    ``run(command)`` returns the command's value, or None while Redis is down or backing off;
    ``call(command)`` is the same but raises EventsError, for a caller that must say why (dispatch
    falls back to files and names the reason).
    """

    def __init__(
        self,
        url: str,
        *,
        log: logging.Logger,
        what: str,
        timeout: float = 2.0,
        extra: Mapping[str, str] | None = None,
        cap: float = BACKOFF_CAP,
        consequence: str = "the spool carries on",
    ) -> None:
        self.url = url
        self.timeout = timeout
        self.outage = Outage(log, f"{redact_url(url)} ({what})", extra=extra, cap=cap, consequence=consequence)
        self._client: Any = None

    @property
    def up(self) -> bool:
        return not self.outage.down

    def run(self, command: Callable[[Any], T]) -> T | None:
        try:
            return self.call(command)
        except pubsub.EventsError:
            return None

    def call(self, command: Callable[[Any], T]) -> T:
        if not self.outage.ready():
            raise pubsub.EventsError(f"redis at {redact_url(self.url)} is down: {self.outage.last_error}")
        try:
            if self._client is None:
                self._client = pubsub.connect(self.url, timeout=self.timeout)
            value = command(self._client)
        except Exception as exc:  # EventsError, any RedisError, a socket error from a broken connection
            self._drop()
            error = pubsub.describe(exc, self.url)
            self.outage.failed(error)
            raise pubsub.EventsError(error) from None
        self.outage.recovered()
        return value

    def close(self) -> None:
        self._drop()

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
