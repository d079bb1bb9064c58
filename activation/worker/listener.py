"""The listener: learns that tasks arrived, vets them, and hands their ids to the executor.

It owns the work queue and its server, the wake sources, the reconcile scan (rescan) and the
dead-lettering of bad input. The queue is only a fast path: a rescan rebuilds it from the inbox,
so the listener may die at any moment without losing a task. It never dies on bad input.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

from activation.clock import iso_now
from activation.config import Settings
from activation.errors import BadTask, NotReady
from activation.lifecycle import Program
from activation.observability.samples import worker_metrics
from activation.spool import task as tasks
from activation.spool.layout import Spool
from activation.worker.queue import QueueServer, WorkQueue, load_authkey, socket_path
from activation.worker.wake import build_sources
from activation.worker.wake.base import WakeSource

# Bad-task reasons that a file still being written can show: a cut-off JSON text, or a UTF-8
# sequence cut in half. Such a file is "not yet" until its writer is provably done.
PARTIAL_REASONS = frozenset({tasks.INVALID_JSON, tasks.NOT_UTF8})
MIN_RECHECK = 0.05  # seconds: the soonest a not-ready file is looked at again


class Listener(Program):
    """Wake sources -> notify() -> validate -> WorkQueue -> QueueServer -> the executor's get()."""

    name = "listener"

    def __init__(self, settings: Settings, *, sources: list[WakeSource] | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.worker = settings.require_worker()
        self.spool = Spool(settings.spool)
        self.inbox = self.spool.inbox(self.worker)
        # String prefixes for the hot path: building pathlib paths cost more than the syscalls.
        self._inbox_prefix = f"{self.inbox}/"
        self._claim_prefix = f"{self.spool.processing(self.worker)}/"
        self._result_prefix = f"{self.spool.results(self.worker)}/"
        self.work = WorkQueue(still_pending=self._still_pending)
        self.server: QueueServer | None = None
        # None: built from settings.mode in initialize(); tests pass StubSources.
        self.sources: list[WakeSource] = list(sources) if sources is not None else []
        self._build_sources = sources is None
        self.metrics = worker_metrics()
        self._wake = threading.Event()  # cuts loop()'s wait short: overflow, stop
        self._overflowed = threading.Event()
        self._rescan_asked: str | None = None  # a source lost events (e.g. Redis resubscribed)
        # One file is examined at a time, whichever thread notifies: no double dead-letter, and
        # a rescan racing an inotify event keeps FIFO order.
        self._examine_lock = threading.Lock()
        self._not_ready: dict[str, tuple[float, float]] = {}  # name -> (first seen, recheck due), monotonic
        # Files whose trouble was logged: each bad file is logged once, not at every rescan.
        self._complained: set[str] = set()
        self._next_rescan = 0.0
        self._listed: set[str] = set()  # the names the last rescan saw
        self._last_rescan: str | None = None
        self._rescans = 0
        self._overflows = 0
        self._dead_lettered = 0
        self._events: Counter[str] = Counter()
        self._queued: Counter[str] = Counter()
        self._event_counters: dict[str, Any] = {}

    # -- lifecycle ------------------------------------------------------------------------------

    def initialize(self) -> None:
        damaged = self.spool.try_init([self.worker])
        if damaged is not None:  # `check` names the broken folder; this program still does its job
            self.log.error("%s", damaged, extra={"worker": self.worker, "event": "spool_error"})
        run_dir = self.settings.run_dir
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with contextlib.suppress(OSError):  # the socket carries pickle: keep its folder private
            os.chmod(run_dir, 0o700)
        # Sources are built (not started) before the socket serves stats(), so no heartbeat ever
        # reports a listener without the sources it is configured with.
        if self._build_sources:
            self.sources = build_sources(self.settings, self.spool, self._events_lost)
        self.server = QueueServer(
            socket_path(run_dir), load_authkey(run_dir, self.settings.queue_key), self.work, self.stats
        )
        self.server.start()
        # Sources first, then the scan: a file that lands before a source listens is in the scan,
        # one that lands after the scan listed the inbox is seen by the source.
        for source in self.sources:
            self._start_source(source)
        self.rescan("start")

    def loop(self) -> None:
        """Sleep until the next rescan or not-ready recheck is due (or an overflow), then do it."""
        due = min(self._next_rescan, self._next_recheck())
        self._wake.wait(max(0.0, due - time.monotonic()))
        self._wake.clear()
        if self.stopping.is_set():
            return
        reason = None
        if self._overflowed.is_set():
            self._overflowed.clear()
            reason = "overflow"
        asked, self._rescan_asked = self._rescan_asked, None
        reason = reason or asked
        for source in self.sources:
            if not source.alive():
                self.log.error(
                    "wake source %s died; restarting it",
                    source.name,
                    extra={"worker": self.worker, "event": "source_dead"},
                )
                with contextlib.suppress(Exception):
                    source.stop()
                with contextlib.suppress(Exception):
                    self.spool.init([self.worker])  # the inbox itself may have been removed
                if self._start_source(source):
                    reason = reason or "restart"
        if reason is None and time.monotonic() >= self._next_rescan:
            reason = "periodic"
        if reason is not None:
            self.rescan(reason)
        else:
            self._recheck_not_ready()

    def request_stop(self, signum: int | None = None) -> None:
        super().request_stop(signum)
        self._wake.set()

    def shutdown(self) -> None:
        for source in self.sources:
            try:
                source.stop()
            except Exception as exc:
                self.log.error("cannot stop wake source %s: %s", source.name, exc, extra={"worker": self.worker})
        if self.server is not None:
            self.server.stop()
            self.server = None
        self.work.wake_all()

    # -- scanning -------------------------------------------------------------------------------

    def rescan(self, reason: str) -> int:
        """Notify every task file in the inbox, oldest first; returns how many were listed.

        A periodic rescan leaves a file it sees for the first time to a live event-driven source
        and takes it on the next round if nobody did. A directory listing is no snapshot: during
        a burst it can return a later arrival and miss an earlier one, and queueing the later
        one ahead of the event source would break FIFO order. Rescans after a start, an overflow
        or a restart take everything, because events were (or may have been) lost.
        """
        try:
            names = self.spool.inbox_names(self.worker)
        except OSError as exc:
            self.log.error("cannot list %s: %s", self.inbox, exc, extra={"worker": self.worker, "event": "rescan"})
            names = []
        present = set(names)
        previous, self._listed = self._listed, present
        defer = reason == "periodic" and any(s.event_driven and s.alive() for s in self.sources)
        for name in names:
            if not (defer and name not in previous):
                self.notify(name, "rescan")
        with self._examine_lock:
            for name in [n for n in self._not_ready if n not in present]:
                del self._not_ready[name]
            self._complained &= present
        self._rescans += 1
        self._last_rescan = iso_now()
        self._next_rescan = time.monotonic() + self.settings.rescan_interval
        if reason != "periodic":
            self.log.info(
                "rescanned the inbox (%s): %d task files, %d queued",
                reason,
                len(names),
                len(self.work),
                extra={"worker": self.worker, "event": "rescan"},
            )
        return len(names)

    def _recheck_not_ready(self) -> None:
        now = time.monotonic()
        with self._examine_lock:
            due = [name for name, (_, at) in self._not_ready.items() if at <= now]
        for name in due:
            self.notify(name, "rescan")

    def _next_recheck(self) -> float:
        with self._examine_lock:
            return min((at for _, at in self._not_ready.values()), default=float("inf"))

    def _events_lost(self, reason: str) -> None:
        """Called on a source's thread: events were (or may have been) lost, so rescan now."""
        if reason == "overflow":
            self._on_overflow()
            return
        self._rescan_asked = reason
        self._wake.set()

    def _on_overflow(self) -> None:
        """Called on the inotify reader thread: events were lost, so rescan now."""
        self._overflows += 1
        self.metrics.inotify_overflows.inc()
        self.log.warning(
            "inotify queue overflowed, events were lost; rescanning the inbox",
            extra={"worker": self.worker, "event": "overflow"},
        )
        self._overflowed.set()
        self._wake.set()

    def _start_source(self, source: WakeSource) -> bool:
        try:
            source.start(self.notify)
        except Exception as exc:
            self.log.error(
                "cannot start wake source %s: %s; the rescan every %gs still runs",
                source.name,
                exc,
                self.settings.rescan_interval,
                extra={"worker": self.worker, "event": "source_start"},
            )
            return False
        self.log.info("wake source %s started", source.name, extra={"worker": self.worker, "event": "source_start"})
        return True

    # -- the notify path: called from source threads, must be lean and must never raise ---------

    def notify(self, name: str, source: str, /, *, complete: bool = False) -> None:
        """A task may be ready under ``name`` in the inbox; ``complete``: the writer is provably done."""
        if "/" in name or not tasks.is_task_name(name):
            return  # dot files (temp files, .processing) are never tasks
        seen_at = time.time()  # the wake-up, before any work: the start of activation latency
        task_id = tasks.task_id_of(name)
        if task_id in self.work:
            return
        try:
            with self._examine_lock:
                self._examine(name, task_id, source, complete, seen_at)
        except Exception:
            # A bug, not bad input (that is a BadTask): say so once per file, look again later.
            with self._examine_lock:
                first = self._complain(name)
            self.log.log(
                logging.ERROR if first else logging.DEBUG,
                "failed to examine %r; will look again",
                name,
                exc_info=True,
                extra={"worker": self.worker, "event": "examine_error"},
            )
            with contextlib.suppress(Exception), self._examine_lock:
                self._later(name, self.inbox / name)

    def _examine(self, name: str, task_id: str, source: str, complete: bool, seen_at: float = 0.0) -> None:
        if task_id in self.work:
            return
        self._events[source] += 1
        self._count_event(source)
        path = Path(self._inbox_prefix + name)
        valid_id = tasks.is_valid_task_id(task_id)
        if valid_id and os.path.lexists(self._claim_prefix + name):
            # Claimed by an executor this listener has not served (it restarted): once that run
            # has a result, a later rescan dead-letters this file as a duplicate.
            return
        try:
            # task.load_task, unrolled: a bad name is dead-lettered only when the file is there.
            if not valid_id:
                os.lstat(path)  # only a file that is there can be dead-lettered
                raise BadTask(tasks.INVALID_TASK_ID, f"file name {name[:140]!r} is not a valid task id")
            task = tasks.parse_task(tasks.read_task_bytes(path), task_id, max_timeout=self.settings.max_task_timeout)
        except FileNotFoundError:
            self._not_ready.pop(name, None)  # claimed or moved away meanwhile
            return
        except NotReady as exc:  # empty: even after a close, a writer may be about to fill it
            if self._settled(name, path):
                self._dead_letter(name, path, tasks.INVALID_JSON, str(exc), None)
            else:
                self._later(name, path)
            return
        except BadTask as exc:
            if exc.reason in PARTIAL_REASONS and not complete and not self._settled(name, path):
                self._later(name, path)
                return
            self._dead_letter(name, path, exc.reason, exc.detail, exc.task)
            return
        except OSError as exc:
            if self._complain(name):  # once per file, not at every recheck
                self.log.warning(
                    "cannot read %r: %s; will look again",
                    name,
                    exc.strerror or exc,
                    extra={"worker": self.worker, "task_id": task_id, "event": "read_error"},
                )
            self._later(name, path)
            return
        self._not_ready.pop(name, None)
        self._complained.discard(name)
        if os.path.exists(self._result_prefix + name):  # Spool.has_result, without pathlib
            self._dead_letter(name, path, tasks.DUPLICATE, "a result for this task id already exists", task)
            return
        if self.work.put(task_id, source, seen_at):
            self._queued[source] += 1
            self.log.debug("queued %s (%s)", task_id, source, extra={"worker": self.worker, "task_id": task_id})

    def _count_event(self, source: str) -> None:
        counter = self._event_counters.get(source)
        if counter is None:
            counter = self._event_counters[source] = self.metrics.listener_events.labels(source=source)
        counter.inc()

    def _settled(self, name: str, path: Path) -> bool:
        """Whether an unreadable file is old enough to be bad input rather than work in progress."""
        try:
            age = time.time() - os.lstat(path).st_mtime
        except OSError:
            return False
        if age > self.settings.settle_time:
            return True
        if age < -self.settings.settle_time:  # the writer's clock runs ahead: use how long we waited
            seen = self._not_ready.get(name)
            return seen is not None and time.monotonic() - seen[0] > self.settings.settle_time
        return False

    def _later(self, name: str, path: Path) -> None:
        """Remember a not-ready file and when to look at it again (once it would be settled)."""
        now = time.monotonic()
        first_seen = self._not_ready.get(name, (now, now))[0]
        try:
            age = time.time() - os.lstat(path).st_mtime
        except OSError:
            age = 0.0
        wait = min(max(self.settings.settle_time - age, MIN_RECHECK), max(self.settings.settle_time, MIN_RECHECK))
        self._not_ready[name] = (first_seen, now + wait + 0.01)

    def _dead_letter(self, name: str, path: Path, reason: str, detail: str, task: dict[str, Any] | None) -> None:
        task_id = tasks.task_id_of(name) if tasks.is_valid_task_id(tasks.task_id_of(name)) else None
        try:
            self.spool.dead_letter(path, reason=reason, detail=detail, worker=self.worker, task=task)
        except OSError as exc:
            self.log.log(
                logging.ERROR if self._complain(name) else logging.DEBUG,
                "cannot dead-letter %r (%s): %s; will retry",
                name,
                reason,
                exc.strerror or exc,
                extra={"worker": self.worker, "task_id": task_id, "event": "dead_letter"},
            )
            self._later(name, path)
            return
        self._not_ready.pop(name, None)
        self._complained.discard(name)
        self._dead_lettered += 1
        self.metrics.tasks_dead_lettered.labels(worker=self.worker, reason=reason).inc()
        self.log.warning(
            "dead-lettered %r: %s: %s",
            name,
            reason,
            detail,
            extra={"worker": self.worker, "task_id": task_id, "event": "dead_letter"},
        )

    def _complain(self, name: str) -> bool:
        """Whether this is the first trouble with ``name`` worth logging (until it leaves the inbox)."""
        if name in self._complained:
            return False
        self._complained.add(name)
        return True

    def _still_pending(self, task_id: str) -> bool:
        return os.path.lexists(f"{self._inbox_prefix}{task_id}{tasks.TASK_SUFFIX}")

    # -- reporting ------------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """What the heartbeat reports about the listener (served over the queue socket)."""
        inotify = [s for s in self.sources if s.name == "inotify"]
        redis = [s for s in self.sources if s.name == "redis"]
        with self._examine_lock:
            not_ready = len(self._not_ready)
            events = dict(self._events)
            queued = dict(self._queued)
        return {
            "worker": self.worker,
            "mode": list(self.settings.mode),
            "queue_size": len(self.work),
            "in_flight": self.work.in_flight,
            "sources": {s.name: {"alive": s.alive()} for s in self.sources},
            "observer_alive": inotify[0].alive() if inotify else None,
            "last_rescan": self._last_rescan,
            "rescans": self._rescans,
            "overflows": self._overflows,
            "events": events,
            "queued": queued,
            "not_ready": not_ready,
            "dead_lettered": self._dead_lettered,
            "redis": redis[0].status() if redis else self._redis_unused(),
        }

    def _redis_unused(self) -> dict[str, Any]:
        missing = "redis" in self.settings.mode and not self.settings.redis_url
        return {"configured": False, "connected": False, "last_error": "REDIS_URL is not set" if missing else None}
