"""Time as the spool records it: UTC, ISO 8601 with microseconds, and back to epoch seconds."""

from __future__ import annotations

import datetime as dt
import time


def iso_now() -> str:
    """The current time in UTC, ISO 8601 with microseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


def parse_iso(value: object) -> float | None:
    """An ISO 8601 timestamp as epoch seconds, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


class Clock:
    """The clocks a program decides by, passed in so that a test can give it another one.

    ``time`` is wall time (what a record says and what a human reads); ``monotonic`` measures
    how long something lasted. ``offset`` shifts the wall clock only, as on a host whose clock
    runs ahead or behind: tests use it; no setting sets it.
    """

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK = Clock()


def iso_from_epoch(epoch: float) -> str:
    """Epoch seconds as the spool's UTC ISO 8601 text."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="microseconds")
