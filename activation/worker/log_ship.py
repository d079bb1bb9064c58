"""A running task's log, shipped to Redis in streams mode, for `activation logs` on another host.

The per-task log (spool/tasklog.py) stays on the replica's host. In streams mode the orchestrator's
host has only the outbox copy of the task, so the replica also appends what its log gained to a
capped stream (keys.log) while the agent runs, and once more at the end. It is best-effort and
bounded: a lost Redis leaves a gap in the remote view only (the local log and the result are
whole), at most SHIP_LIMIT bytes of a task go, and the stream expires LOG_TTL after its last append:
the result, mirrored to the orchestrator, carries the output after that.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from activation.errors import StreamsError
from activation.transport.streams.client import StreamsTransport

log = logging.getLogger("activation.executor")

SHIP_INTERVAL = 0.5  # seconds between looks at the log while the agent runs
SHIP_CHUNK = 64 * 1024  # bytes per entry at most (whole lines, but for a line longer than this)
SHIP_LIMIT = 4 * 1024 * 1024  # bytes of one run shipped at most; then one marker entry
LOG_TTL = 3600  # seconds the shipped log outlives its last append
LOG_CAP = SHIP_LIMIT // 1024  # entries a log stream keeps (approximate MAXLEN)
LIMIT_TEXT = "[activation: the remote copy of this log stopped at %d bytes; the worker's host has all of it]\n"


class LogShipper:
    """Ships one run's log file as it grows: call ``ship()`` each supervision tick, ``ship(final=True)`` at the end."""

    def __init__(
        self,
        transport: Callable[[], StreamsTransport],
        path: Path,
        task_id: str,
        attempt: int,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._transport = transport
        self.path = path
        self.task_id = task_id
        self.attempt = attempt
        self._clock = clock
        self._next = 0.0
        self.offset = 0  # bytes of the file shipped (or skipped) so far
        self.stopped = False  # past SHIP_LIMIT
        self._failing = False

    def ship(self, *, final: bool = False) -> None:
        now = self._clock()
        if self.stopped or (not final and now < self._next):
            return
        self._next = now + SHIP_INTERVAL
        data = self._read(final)
        if not data:
            return
        room = SHIP_LIMIT - self.offset
        # Text for Redis: what is no UTF-8 becomes U+FFFD (the local log keeps the bytes).
        kept = data[:room]
        texts = [kept[i : i + SHIP_CHUNK].decode("utf-8", "replace") for i in range(0, len(kept), SHIP_CHUNK)]
        full = len(data) > room
        if full:
            texts.append(LIMIT_TEXT % SHIP_LIMIT)
        try:
            self._transport().append_log(self.task_id, self.attempt, texts, ttl=LOG_TTL, cap=LOG_CAP)
        except StreamsError as exc:
            if not self._failing:
                log.info("task %s: its log is not reaching Redis (%s); it is kept locally", self.task_id, exc)
            self._failing = True
            return  # sent at a later look, if Redis comes back while the file still holds it
        self._failing = False
        self.offset += len(data)
        self.stopped = full

    def _read(self, final: bool) -> bytes:
        """What the file gained since the last shipment: whole lines while the run goes on."""
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(SHIP_LIMIT - self.offset + 1)
        except OSError:
            return b""  # nothing printed yet (the log is made at the first byte), or unreadable
        if final or len(data) > SHIP_LIMIT - self.offset:
            return data
        whole = data[: data.rfind(b"\n") + 1]
        return whole or (data if len(data) >= SHIP_CHUNK else b"")
