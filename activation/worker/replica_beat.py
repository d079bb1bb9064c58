"""A replica's heartbeat in Redis (streams mode): its state under a TTL, and the pruning of dead consumers.

The heartbeat program calls `publish` with the record it writes to ``heartbeats/<worker>.json``,
so Redis holds the same state (plus the replica's consumer name) for `activation status` to show
each replica of a role (`StreamsTransport.replicas`). It is also the one program of a tree that
now and then removes the role's idle consumers; the script keeps any that hold a pending entry.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from activation.config import Settings
from activation.transport.streams.keys import replica_name
from activation.transport.streams.link import StreamsLink

BEATS_PER_TTL = 3  # the Redis heartbeat outlives two missed beats
PRUNE_IDLE_LEASES = 5  # a consumer idle this many leases with nothing pending is a gone replica
PRUNE_EVERY_LEASES = 1  # how often one replica looks


class ReplicaBeat:
    def __init__(self, settings: Settings, log: logging.Logger, *, consumer: str | None = None) -> None:
        self.consumer = consumer or replica_name(run_dir=settings.run_dir)
        self.log = log
        self.ttl = max(1.0, math.ceil(BEATS_PER_TTL * settings.heartbeat_interval))
        self.lease = settings.lease
        self.link = StreamsLink(
            settings,
            consumer=self.consumer,
            log=log,
            what="replica heartbeat",
            consequence="this replica's state is not published; its tasks wait in the stream",
        )
        self._next_prune = time.monotonic() + self.lease * PRUNE_EVERY_LEASES

    def publish(self, report: Mapping[str, Any]) -> str:
        """Publish ``report`` as this replica's state; "up" or "down" (an outage is logged once)."""
        state = {**report, "redis": "up", "replica": self.consumer}
        done = self.link.call(lambda t: t.beat(state, self.ttl))
        if done is None and self.link.outage.down:
            return "down"
        self._prune()
        return "up"

    def _prune(self) -> None:
        if time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + self.lease * PRUNE_EVERY_LEASES
        removed = self.link.call(lambda t: t.prune_consumers(self.lease * PRUNE_IDLE_LEASES))
        if removed:
            self.log.info("removed %d idle consumer(s) holding nothing: %s", len(removed), " ".join(removed))

    def close(self, *, leave: bool) -> None:
        """At exit; ``leave`` (the whole tree stops) removes this replica's heartbeat at once."""
        if leave:
            self.link.call(lambda t: t.leave())
        self.link.close()
