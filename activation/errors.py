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
