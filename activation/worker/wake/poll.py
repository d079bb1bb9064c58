"""The poll wake source: lists the inbox every interval, for mounts where inotify sees no writer."""

from __future__ import annotations

import logging
import threading

from activation.spool.layout import Spool
from activation.worker.wake.base import Notify, ThreadedSource

log = logging.getLogger("activation.listener")


class PollSource(ThreadedSource):
    """Lists the inbox every ``interval``: for NFS, CIFS and Docker Desktop mounts without inotify."""

    name = "poll"
    thread_name = "poll-source"
    event_driven = False

    def __init__(self, spool: Spool, worker: str, interval: float) -> None:
        super().__init__()
        self.spool = spool
        self.worker = worker
        self.interval = interval

    def _run(self, notify: Notify, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                for name in self.spool.inbox_names(self.worker):  # oldest first: FIFO
                    if stop.is_set():
                        return
                    notify(name, self.name)
            except Exception:
                log.exception("poll of %s failed", self.spool.inbox(self.worker), extra={"event": "poll_error"})
            stop.wait(self.interval)
