"""Best-effort ``done:<worker>`` events after each result, so that ``dispatch --wait`` wakes at once."""

from __future__ import annotations

import logging

DONE_TIMEOUT = 0.25  # connect and reply timeout of a done event: never stall the next task on it


class DoneEvents:
    """PUBLISH ``done:<worker> <task_id>`` after each result, best effort.

    The result file is the truth; the event only wakes ``dispatch --wait`` sooner. So it goes
    through a RedisLink: an outage is logged once, Redis is left alone while it backs off, and a
    slow Redis never stalls the next task (DONE_TIMEOUT).
    """

    def __init__(self, url: str, worker: str, log: logging.Logger) -> None:
        # redis-py is loaded only when Redis is configured.
        from activation.transport.pubsub import done_channel
        from activation.transport.redis_link import RedisLink

        self.channel = done_channel(worker)
        self.link = RedisLink(
            url,
            log=log,
            what=f"PUBLISH {self.channel}",
            timeout=DONE_TIMEOUT,
            extra={"worker": worker},
            consequence="results are unaffected",
        )

    def announce(self, task_id: str) -> None:
        from activation.transport import pubsub

        self.link.run(lambda client: pubsub.publish(client, self.channel, task_id))

    def close(self) -> None:
        self.link.close()
