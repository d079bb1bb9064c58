"""Wake sources: every way the listener learns that "a task may be ready", behind one interface.

A source only says which inbox file name to look at; validation, de-duplication and queueing are
the listener's job. inotify (watchdog) and poll live here, Redis in redis_source.py (it vets what
it is told with `inbox_name`); a stub serves the tests. `build_sources` turns the mode into sources.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from watchdog.events import DirMovedEvent, FileClosedEvent, FileMovedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers.inotify import InotifyFullEmitter, InotifyObserver, InotifyWatchGroup
from watchdog.observers.inotify_c import InotifyConstants, Mask
from watchdog.observers.inotify_move_event_grouper import InotifyMoveEventGrouper, PathedInotifyEvent

from activation.config import Settings
from activation.spool.layout import Spool
from activation.spool.task import TASK_SUFFIX, is_task_name, is_valid_task_id, task_id_of

log = logging.getLogger("activation.listener")

JOIN_TIMEOUT = 2.0

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


def inbox_name(ref: str, inbox: Path) -> str | None:
    """The inbox file name that a foreign reference (a task id or a path) names, or None.

    For sources that are told about tasks by others (Redis): a path is accepted only when it
    resolves inside ``inbox``, so a message can never point the listener anywhere else.
    """
    if not ref or "\x00" in ref:
        return None
    if "/" in ref:
        path = Path(ref)
        if not path.is_absolute():
            return None
        try:
            # The same string resolves the same way: realpath (two walks of the path) only when
            # the publisher spelled the folder differently.
            inside = str(path.parent) == str(inbox) or os.path.realpath(path.parent) == os.path.realpath(inbox)
        except (OSError, ValueError):
            return None
        name = path.name
        return name if inside and is_task_name(name) and is_valid_task_id(task_id_of(name)) else None
    if ref.endswith(TASK_SUFFIX):
        return ref if is_task_name(ref) and is_valid_task_id(task_id_of(ref)) else None
    return ref + TASK_SUFFIX if is_valid_task_id(ref) else None


# -- inotify ------------------------------------------------------------------------------------


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


# -- poll ---------------------------------------------------------------------------------------


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


# -- stub ---------------------------------------------------------------------------------------


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


# -- construction -------------------------------------------------------------------------------

# ``events_lost(reason)``: a source tells the listener that events were (or may have been) lost,
# so the inbox must be rescanned now: "overflow" (inotify), "redis subscribed" (after every
# (re)subscribe, since pub/sub drops what it cannot deliver).
EventsLost = Callable[[str], None]
SourceFactory = Callable[[Settings, Spool, EventsLost], WakeSource]


def _inotify(settings: Settings, spool: Spool, events_lost: EventsLost) -> WakeSource:
    return InotifySource(spool.inbox(settings.require_worker()), lambda: events_lost("overflow"))


def _poll(settings: Settings, spool: Spool, events_lost: EventsLost) -> WakeSource:
    return PollSource(spool, settings.require_worker(), settings.poll_interval)


def _redis(settings: Settings, spool: Spool, events_lost: EventsLost) -> WakeSource:
    # Imported here: a worker that does not use Redis never loads redis-py.
    from activation.worker.redis_source import RedisSource

    return RedisSource(
        spool,
        settings.require_worker(),
        settings.redis_url or "",
        backoff_max=settings.redis_backoff_max,
        on_subscribed=lambda: events_lost("redis subscribed"),
    )


# ACTIVATION_MODE name -> factory.
SOURCE_FACTORIES: dict[str, SourceFactory] = {"inotify": _inotify, "poll": _poll, "redis": _redis}
FILE_SOURCES = ("inotify", "poll")


def build_sources(settings: Settings, spool: Spool, events_lost: EventsLost) -> list[WakeSource]:
    """The wake sources ``settings.mode`` asks for; the listener's periodic rescan runs besides them.

    Redis is at-most-once and only hears what someone publishes, so a mode with ``redis`` but no
    file source also polls the inbox every ``ACTIVATION_POLL_INTERVAL`` as its safety net.
    """
    extra = {"worker": settings.worker_name, "event": "source_missing"}
    modes = list(settings.mode)
    if "redis" in modes and not any(m in modes for m in FILE_SOURCES):
        modes.append("poll")
    sources = []
    for mode in modes:
        if mode == "redis" and not settings.redis_url:
            log.error(
                "ACTIVATION_MODE includes redis but REDIS_URL is not set; waking on files only",
                extra=extra,
            )
            continue
        factory = SOURCE_FACTORIES.get(mode)
        if factory is None:
            log.warning(
                "wake source %r is not implemented; relying on the rescan every %gs",
                mode,
                settings.rescan_interval,
                extra=extra,
            )
            continue
        sources.append(factory(settings, spool, events_lost))
    return sources
