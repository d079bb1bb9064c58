"""The inotify wake source: watchdog's inotify observer on the inbox, subscribed to renames into it
and closes after writing only, with queue overflows reported so the listener rescans.

It subclasses watchdog internals (private attributes), so watchdog is pinned to one exact
version and tests/unit/test_watchdog_contract.py fails loudly on an upgrade.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog.events import DirMovedEvent, FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyConstants, Mask
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper, PathedInotifyEvent

from activation.worker.wake.base import JOIN_TIMEOUT, Notify, WakeSource

log = logging.getLogger("activation.listener")

# Only what proves a file complete: a rename into the inbox (atomic write, requeue) and a close
# after writing (plain write). No IN_CREATE: a plain write's create fires on an empty file. No
# IN_MOVED_FROM: watchdog holds each one 0.5 s to pair it with its IN_MOVED_TO, and every claim
# (a rename out of the inbox into the unwatched .processing/) would stall every later event
# behind it for those 0.5 s (watchdog#649, measured here). Unpaired IN_MOVED_TO events arrive as
# FileMovedEvent(src_path="", dest_path=...) because the observer generates full events.
INBOX_MASK = Mask(
    InotifyConstants.IN_MOVED_TO
    | InotifyConstants.IN_CLOSE_WRITE
    | InotifyConstants.IN_DELETE_SELF
    | InotifyConstants.IN_ONLYDIR
)

_WANTED_EVENTS = (FileMovedEvent, DirMovedEvent, FileClosedEvent)


class _UnpairedMoves(InotifyMoveEventGrouper):
    """watchdog's move grouper, minus the pairing: we never subscribe to IN_MOVED_FROM.

    Pairing scans every queued event for a matching IN_MOVED_FROM, twice per IN_MOVED_TO; with
    a backlog of thousands of renames that made the listener quadratic (a profiled 2,000-task
    burst spent a third of its time there), and it can never find one.
    """

    def _group_moved_to_event(self, to_event: PathedInotifyEvent) -> PathedInotifyEvent:
        return to_event

    def get_queued_moved_from_event(self, cookie: int) -> None:
        return None


@dataclass
class _WatchGroup(InotifyWatchGroup):
    """watchdog's watch group, plus a hook run when the kernel reports IN_Q_OVERFLOW.

    watchdog 7.1 calls ``on_queue_overflow`` on every watch group (and logs one warning that
    nobody reads): this is where we learn that events were lost and a rescan is due.
    """

    overflow_hook: Callable[[], None] | None = None
    _move_event_grouper: InotifyMoveEventGrouper = field(default_factory=_UnpairedMoves, init=False)

    def on_queue_overflow(self) -> None:
        super().on_queue_overflow()
        if self.overflow_hook is not None:
            try:
                self.overflow_hook()
            except Exception:  # an exception here would kill watchdog's reader thread
                log.exception("inotify overflow hook failed", extra={"event": "overflow"})


class _InboxEmitter(InotifyFullEmitter):
    """An emitter that subscribes to `INBOX_MASK`, reports queue overflows, and hands its events
    straight to the handler.

    Dispatching on the emitter thread instead of queueing for the observer thread saves one
    thread wake-up per task (about 0.1 ms of the rename-to-get latency measured here); the
    handler catches everything, so this thread cannot die of it either.
    """

    def __init__(
        self,
        *args: Any,
        on_overflow: Callable[[], None] | None = None,
        handler: FileSystemEventHandler | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._on_overflow = on_overflow
        self._handler = handler
        self.name = "inotify-emitter"

    def get_event_mask_from_filter(self) -> Mask:
        return INBOX_MASK

    def on_thread_start(self) -> None:
        # Same as InotifyEmitter.on_thread_start, with our group so the hook is set before the
        # watch exists (no window where an overflow goes unreported).
        self._inotify = _WatchGroup(
            self._inotify_fd,
            os.fsencode(self.watch.path),
            event_mask=self.get_event_mask_from_filter(),
            is_recursive=False,
            follow_symlink=False,
            overflow_hook=self._on_overflow,
        )

    def queue_event(self, event: FileSystemEvent) -> None:
        if self._handler is None:
            super().queue_event(event)
        elif isinstance(event, _WANTED_EVENTS):
            self._handler.dispatch(event)


class _InboxObserver(InotifyObserver):
    def __init__(self, on_overflow: Callable[[], None], handler: FileSystemEventHandler) -> None:
        super().__init__(generate_full_events=True)
        self._emitter_class = _InboxEmitter
        self._emitter_kwargs.update(on_overflow=on_overflow, handler=handler)
        self.name = "inotify-observer"
        self._inotify_fd.name = "inotify-reader"

    def threads(self) -> list[threading.Thread]:
        return [self, self._inotify_fd, *list(self.emitters)]


class _InboxHandler(FileSystemEventHandler):
    """Turns watchdog events into notify calls. Catches everything: an exception escaping a
    handler kills the watchdog thread that runs it for good, and the listener would go deaf."""

    def __init__(self, notify: Notify, source: str) -> None:
        self._notify = notify
        self._source = source

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            if isinstance(event, (FileMovedEvent, DirMovedEvent)):
                path = event.dest_path  # an atomic write arrives only as a rename into the inbox
            elif isinstance(event, FileClosedEvent):
                path = event.src_path
            else:
                return
            if path:
                self._notify(os.path.basename(os.fsdecode(path)), self._source, complete=True)
        except Exception:
            log.exception("inotify handler failed on %s", event, extra={"event": "handler_error"})


class InotifySource(WakeSource):
    """watchdog's inotify observer on the inbox (not recursive: .processing/ is not watched)."""

    name = "inotify"

    def __init__(self, inbox: Path, on_overflow: Callable[[], None] | None = None) -> None:
        self.inbox = Path(inbox)
        self._on_overflow = on_overflow or (lambda: None)
        self._observer: _InboxObserver | None = None

    def start(self, notify: Notify) -> None:
        self.stop()
        handler = _InboxHandler(notify, self.name)
        observer = _InboxObserver(self._on_overflow, handler)  # starts its reader thread right away
        try:
            # The real path: with IN_DONT_FOLLOW a symlinked inbox would watch the link itself.
            observer.schedule(handler, os.path.realpath(self.inbox), recursive=False, event_filter=list(_WANTED_EVENTS))
            observer.start()
        except BaseException:
            _stop_observer(observer)
            raise
        self._observer = observer

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            _stop_observer(observer)

    def alive(self) -> bool:
        observer = self._observer
        if observer is None:
            return False
        try:
            return all(thread.is_alive() for thread in observer.threads())
        except RuntimeError:  # the emitter set changed while we looked
            return observer.is_alive()


def _stop_observer(observer: _InboxObserver) -> None:
    threads = observer.threads()
    with contextlib.suppress(Exception):
        observer.stop()  # also stops and joins the emitter and the reader thread
    for thread in threads:
        with contextlib.suppress(RuntimeError):  # never started
            thread.join(JOIN_TIMEOUT)
        if thread.is_alive():
            log.warning("inotify thread %s did not stop in time", thread.name, extra={"event": "source_stop"})
