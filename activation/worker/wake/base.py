"""The wake-source interface: a source only says "a task may be ready" under this inbox file name.

Validation, de-duplication and queueing are the listener's job. ThreadedSource gives a source its
own bounded-join thread; StubSource is the one the tests drive by hand.
"""

from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, Protocol

log = logging.getLogger("activation.listener")

JOIN_TIMEOUT = 2.0

# ``events_lost(reason)``: a source tells the listener that events were (or may have been) lost,
# so the inbox must be rescanned now: "overflow" (inotify), "redis subscribed" (after every
# (re)subscribe, since pub/sub drops what it cannot deliver).
EventsLost = Callable[[str], None]


class Notify(Protocol):
    """``notify(file_name_in_inbox, source_name)``; called from any thread, must not raise.

    ``complete=True`` says the event itself proves the writer is done (a rename into the inbox, a
    close after writing), so an unreadable file is bad input at once rather than "not yet".
    """

    def __call__(self, name: str, source: str, /, *, complete: bool = False) -> None: ...


class WakeSource(ABC):
    """One way of learning that a task may be ready. Restartable: start() after stop() works."""

    name: str
    # True when the source reports each arrival as it happens, in arrival order (inotify, Redis),
    # rather than by listing the inbox itself (poll).
    event_driven: bool = True

    @abstractmethod
    def start(self, notify: Notify) -> None: ...

    @abstractmethod
    def stop(self) -> None:
        """Stop and join this source's threads, bounded."""

    @abstractmethod
    def alive(self) -> bool: ...

    def status(self) -> dict[str, Any]:
        """What the listener's stats report about this source beyond alive(); {} for most."""
        return {}


class ThreadedSource(WakeSource):
    """A source that runs ``_run(notify, stop)`` on its own thread until ``stop`` is set.

    The thread is a daemon, joined with a bound on stop: a call that hangs past the join (a DNS
    lookup, a dead NFS server) must not hold the process open after supervisord asked it to go.
    """

    thread_name = "source"
    join_timeout = JOIN_TIMEOUT

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, notify: Notify) -> None:
        self.stop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(notify, self._stop), name=self.thread_name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(self.join_timeout)
            if thread.is_alive():
                log.warning("%s thread did not stop in time", self.thread_name, extra={"event": "source_stuck"})

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @abstractmethod
    def _run(self, notify: Notify, stop: threading.Event) -> None: ...



class StubSource(WakeSource):
    """A source the tests drive by hand: `fire` notifies synchronously, `die` fakes a crash."""

    def __init__(self, name: str = "stub") -> None:
        self.name = name
        self.starts = 0
        self._notify: Notify | None = None

    def start(self, notify: Notify) -> None:
        self._notify = notify
        self.starts += 1

    def stop(self) -> None:
        self._notify = None

    def alive(self) -> bool:
        return self._notify is not None

    def die(self) -> None:
        self._notify = None

    def fire(self, name: str, *, complete: bool = False) -> None:
        if self._notify is None:
            raise RuntimeError(f"stub source {self.name!r} is not running")
        self._notify(name, self.name, complete=complete)
