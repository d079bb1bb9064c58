"""The one exception tree. Each message is a single line meant for an operator."""

from __future__ import annotations

from typing import Any


class ActivationError(Exception):
    """Base of every error activation raises on purpose."""


class ConfigError(ActivationError):
    """A setting is missing or malformed; the message names the variable."""


class SpoolError(ActivationError):
    """The spool cannot be read or written (missing layout, disk full, permissions)."""


class DispatchError(ActivationError):
    """A task could not be dispatched."""


class QueueError(ActivationError):
    """The listener's work queue cannot be reached."""


class BadTask(ActivationError):
    """A task file that can never run. `reason` is machine-readable, `detail` is for humans.

    `task` is the parsed object when there is one that can be carried (into a dead-letter
    record); None when the file did not parse, or parsed into something that cannot be written.
    """

    def __init__(self, reason: str, detail: str, task: dict[str, Any] | None = None) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.task = task


class NotReady(ActivationError):
    """A task file that may still be being written: look again later, it is not bad input yet."""


# What the orchestrator's domain refuses, by kind; only orchestrator/http.py maps them to statuses.


class StreamsError(ActivationError):
    """Redis could not be reached, or answered the streams transport in a way it cannot use."""


class Invalid(ActivationError):
    """The request itself is wrong: a missing or ill-typed field, a bad mode."""


class NotFound(ActivationError):
    """What the request names does not exist: a worker, a task, a dead letter."""


class Conflict(ActivationError):
    """The request collides with what exists: a task id in use, a dead letter that cannot go back."""


class Unavailable(ActivationError):
    """The request is fine but cannot be served now: the spool refuses a write, Redis is required and down."""


class Broken(ActivationError):
    """A record the domain must read is damaged: the operator has to look."""
