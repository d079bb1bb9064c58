"""Signs of life, as the orchestrator sees them on its own clock.

No decision here compares two hosts' clocks. The watch never reads a timestamp a worker wrote: it
notes *when it saw* something of the worker change (its heartbeat file, its claims folder, its
results folder), on the orchestrator's own monotonic clock, and a program lock held right now
(ownership.py) is proof of life outright. Silence is "seconds since the last change I saw"; after
an orchestrator restart it starts again from zero, which only ever delays recovery.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from activation.spool import ownership
from activation.spool.layout import Spool
from activation.spool.readers import heartbeat_record, peek_record

Signature = tuple[tuple[int, int, int] | None, ...]

STOPPED = "stopped"  # the heartbeat's last word when its whole tree stopped cleanly


@dataclass
class Seen:
    """What the watch knows of one worker."""

    signature: Signature
    changed_at: float  # when the watch last saw a sign of life
    heartbeat_at: float  # when the watch last saw the heartbeat file change
    state: str | None = None  # the heartbeat's state as of its last change ("running", "stopped", ...)
    beating: bool = False  # the watch has seen the heartbeat file change at least once
    running: tuple[str, ...] = ()  # programs whose lock was held at the last look
    pending: dict[str, float] = field(default_factory=dict)  # task file -> when the watch first saw it


def _stamp(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or a folder's entries change; never read as a time."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_ino, info.st_mtime_ns, info.st_size)


class LivenessWatch:
    """Per worker: when did I last see it alive? ``clock`` is monotonic seconds (tests pass their own)."""

    def __init__(self, spool: Spool, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.spool = spool
        self.clock = clock
        self._seen: dict[str, Seen] = {}
        self._lock = threading.RLock()  # the loop and the API's request threads both look

    def _signature(self, worker: str) -> Signature:
        spool = self.spool
        return (
            _stamp(str(spool.heartbeat_path(worker))),
            _stamp(str(spool.processing(worker))),
            _stamp(str(spool.results(worker))),
        )

    def observe(self, worker: str) -> Seen:
        """Look at ``worker`` now; a change since the last look, or a live program, is a sign of life."""
        with self._lock:
            return self._observe(worker)

    def _observe(self, worker: str) -> Seen:
        now = self.clock()
        signature = self._signature(worker)
        running = tuple(ownership.holders(self.spool, worker))
        seen = self._seen.get(worker)
        if seen is None:  # the first look: all we know is that we have not seen it die
            seen = self._seen[worker] = Seen(signature, now, now, self._state(worker))
        elif signature != seen.signature:
            if signature[0] != seen.signature[0]:
                seen.heartbeat_at, seen.beating = now, True
                seen.state = self._state(worker)
            seen.signature, seen.changed_at = signature, now
        if running:
            seen.changed_at = now
            seen.pending.clear()
        seen.running = running
        return seen

    def rebaseline(self, worker: str) -> None:
        """Take the worker's current signature as unchanged: our own moves are no sign of its life."""
        with self._lock:
            seen = self._seen.get(worker)
            if seen is not None:
                seen.signature = self._signature(worker)

    def silent_for(self, worker: str) -> float:
        seen = self._seen.get(worker)
        return 0.0 if seen is None else max(0.0, self.clock() - seen.changed_at)

    def heartbeat_age(self, worker: str) -> float | None:
        """Seconds since the watch saw the heartbeat file change.

        None until it has seen one change: a heartbeat that has not moved since the watch began
        may be seconds or days old, and only what the heartbeat itself says can tell (for display;
        recovery never needs it).
        """
        seen = self._seen.get(worker)
        if seen is None or seen.signature[0] is None or not seen.beating:
            return None
        return max(0.0, self.clock() - seen.heartbeat_at)

    def pending_ages(self, worker: str, names: Iterable[str]) -> dict[str, float]:
        """For each pending task file: seconds since the watch first saw it (0 for a new one)."""
        with self._lock:
            seen = self._seen.get(worker) or self._observe(worker)
            now = self.clock()
            first = {name: seen.pending.get(name, now) for name in names}
            seen.pending = first
            return {name: now - at for name, at in first.items()}

    def _state(self, worker: str) -> str | None:
        beat = peek_record(self.spool.heartbeat_path(worker), heartbeat_record)
        return None if beat is None else beat.get("state")
