"""Keeping a streams lease while the agent runs, driven by the executor's own loop.

`LeaseKeeper.should_abort` is meant as `run_agent`'s ``should_abort`` callback: the executor's
supervise loop calls it, so renewals happen only while the executor makes progress. A stopped
(SIGSTOP) or wedged executor renews nothing and loses its lease like a dead one; when it runs
again, the first call sees that no renewal was confirmed within the lease and says abort, and
the worker kills the agent tree and submits nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from activation.errors import StreamsError

if TYPE_CHECKING:  # the executor imports this in files mode too, where redis stays unimported
    from activation.transport.streams.client import Verdict

log = logging.getLogger("activation.executor")

RENEWALS_PER_LEASE = 4  # renew every quarter lease
RETRIES_PER_LEASE = 16  # after a failed call (Redis unreachable), try again this often


class LeaseKeeper:
    """Renews one delivery's lease every quarter lease; says abort once the lease is lost.

    The lease is counted from when a renewal (or the receive) was *sent*, on this host's monotonic
    clock: Redis resets the idle time later than that, so this host always gives up first.
    ``margin`` makes it give up that much earlier still: the kill grace of the agent tree plus
    the renewal client's socket timeout (a call that hangs on a cut network is late by that much;
    see `connect(socket_timeout=...)`).
    """

    def __init__(
        self,
        renew: Callable[[], Verdict],
        lease: float,
        *,
        held_since: float,
        margin: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        task_id: str = "",
    ) -> None:
        if not 0 <= margin < lease:
            raise ValueError(f"margin must be at least 0 and less than the lease, got {margin}")
        self._renew = renew
        self.lease = lease
        self.margin = margin
        self._clock = clock
        self.task_id = task_id
        self.confirmed_at = held_since
        self._next = held_since + lease / RENEWALS_PER_LEASE
        self.renewals = 0
        self.lost: str | None = None

    def should_abort(self) -> bool:
        """Renew if due; True once the lease is lost (refused, or unconfirmed for a lease)."""
        if self.lost is not None:
            return True
        now = self._clock()
        if now - self.confirmed_at >= self.lease - self.margin:
            return self._lose(f"no renewal confirmed for {now - self.confirmed_at:.1f} s (lease {self.lease:g} s)")
        if now < self._next:
            return False
        try:
            verdict = self._renew()
        except StreamsError as exc:
            self._next = now + self.lease / RETRIES_PER_LEASE
            log.warning("lease renewal failed task=%s, retrying: %s", self.task_id, exc)
            return False
        if not verdict.ok:
            return self._lose(f"renewal refused ({verdict.reason}): {verdict.detail}")
        self.confirmed_at = now
        self._next = now + self.lease / RENEWALS_PER_LEASE
        self.renewals += 1
        return False

    def _lose(self, why: str) -> bool:
        self.lost = why
        log.warning("lease lost task=%s: %s; killing the agent, submitting nothing", self.task_id, why)
        return True
