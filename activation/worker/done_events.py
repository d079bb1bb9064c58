"""Best-effort ``done:<worker>`` events after each result, so that ``dispatch --wait`` wakes at once."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

DONE_RETRY_AFTER = 1.5  # seconds: after a failed done event, skip Redis for this long
DONE_TIMEOUT = 0.25  # connect and reply timeout of a done event: never stall the next task on it


class DoneEvents:
    """PUBLISH ``done:<worker> <task_id>`` after each result, best effort.

    The result file is the truth; the event only wakes ``dispatch --wait`` sooner. So a failure
    is logged once per outage, Redis is left alone for DONE_RETRY_AFTER, and nothing raises.
    """

    def __init__(self, url: str, worker: str, log: logging.Logger) -> None:
        from activation.transport.pubsub import done_channel  # redis-py is loaded only when Redis is configured

        self.url = url
        self.worker = worker
        self.channel = done_channel(worker)
        self.log = log
        self._client: Any = None
        self._retry_at = 0.0
        self._down = False

    def announce(self, task_id: str) -> None:
        if time.monotonic() < self._retry_at:
            return
        from activation.transport import pubsub as events

        try:
            if self._client is None:
                self._client = events.connect(self.url, timeout=DONE_TIMEOUT)
            events.publish(self._client, self.channel, task_id)
        except Exception as exc:  # EventsError, or anything a broken connection throws
            self._retry_at = time.monotonic() + DONE_RETRY_AFTER
            if not self._down:
                self._down = True
                self.log.warning(
                    "cannot publish %s: %s; results are unaffected, retrying every %gs",
                    self.channel,
                    events.describe(exc),
                    DONE_RETRY_AFTER,
                    extra={"worker": self.worker, "task_id": task_id, "event": "redis_down"},
                )
            return
        if self._down:
            self._down = False
            self.log.info("publishing %s again", self.channel, extra={"worker": self.worker, "event": "redis_up"})

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()
