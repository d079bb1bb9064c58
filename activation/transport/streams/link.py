"""One program's link to the streams transport: connected lazily, under one `redis_link.Outage`.

A worker program never crashes or spins because Redis is away: `call` answers None while Redis
is down or backing off, the outage is logged once when it starts and once when it ends, and the
transport is (re)built on the next call. The executor and the heartbeat each hold one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from activation.config import Settings, redact_url
from activation.errors import StreamsError
from activation.transport.redis_link import Outage
from activation.transport.streams.client import StreamsTransport
from activation.transport.streams.connect import SOCKET_TIMEOUT, connect

T = TypeVar("T")


class StreamsLink:
    """A `StreamsTransport` for one consumer, built on first use; None from `call` while Redis is down."""

    def __init__(
        self,
        settings: Settings,
        *,
        consumer: str,
        log: logging.Logger,
        what: str,
        consequence: str,
        socket_timeout: float = SOCKET_TIMEOUT,
    ) -> None:
        self.settings = settings
        self.consumer = consumer
        self.socket_timeout = socket_timeout
        where = redact_url(settings.redis_url) if settings.redis_url else "REDIS_SENTINELS"
        self.outage = Outage(
            log,
            f"{where} ({what})",
            extra={"worker": settings.require_worker()},
            cap=settings.redis_backoff_max,
            consequence=consequence,
        )
        self._transport: StreamsTransport | None = None

    @property
    def transport(self) -> StreamsTransport:
        """The transport, connecting now if needed; raises StreamsError (not counted as an outage)."""
        if self._transport is None:
            client = connect(self.settings, socket_timeout=self.socket_timeout)
            self._transport = StreamsTransport(
                client,
                self.settings.require_worker(),
                consumer=self.consumer,
                lease=self.settings.lease,
                max_attempts=self.settings.max_attempts,
                retention=self.settings.stream_retention,
            )
        return self._transport

    def ready(self) -> bool:
        """False while backing off after a failure."""
        return self.outage.ready()

    def pause_left(self) -> float:
        return max(0.0, self.outage.retry_at - time.monotonic())

    def call(self, command: Callable[[StreamsTransport], T]) -> T | None:
        """``command(transport)``, or None when Redis is down (or backing off): the caller retries."""
        if not self.outage.ready():
            return None
        try:
            value = command(self.transport)
        except StreamsError as exc:
            self.outage.failed(str(exc))
            return None
        self.outage.recovered()
        return value

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            try:
                transport.client.close()
            except Exception:  # closing a broken connection may raise anything; nothing is lost
                logging.getLogger("activation.streams").debug("closing the streams client failed", exc_info=True)
