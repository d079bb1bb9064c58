"""Adaptive dispatch: the metrics behind ``ORCHESTRATOR_MODE=auto`` and the rules that turn them into a transport.

`ResultWindow` keeps the last 100 response times and the last minute of result arrivals, and
refreshes cheaply from the spool: it stats each results folder, reads only results it has not
seen, and skips a folder whose listing has not changed. `decide` is pure: mode, metrics and
thresholds in, a `Decision` naming the rule that fired out.
"""

from __future__ import annotations

import collections
import contextlib
import heapq
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from activation.clock import iso_now, parse_iso
from activation.config import Settings
from activation.spool.layout import Spool
from activation.spool.readers import peek_record, result_record
from activation.spool.result_index import MTIME_GUARD_NS  # one rule for trusting a folder's mtime
from activation.spool.task import is_task_name

RESPONSE_WINDOW = 100  # response time = mean over the newest this-many results (the seed's rule)
RATE_WINDOW_S = 60.0  # task rate = results that appeared in the last minute
RATE_CAP = 1_000_000  # bounds memory even at absurd rates; far above any real per-minute rate

FILES, EVENTS, AUTO = "files", "events", "auto"
MODE_CODES = {FILES: 0, EVENTS: 1, AUTO: 2}  # the orchestrator_mode gauge

# The rule that chose a transport, as reported by GET /config.
RULE_MODE = "mode"  # ORCHESTRATOR_MODE is files or events: no rule applies
RULE_RESPONSE_TIME = "response_time"
RULE_TASK_RATE = "task_rate"
RULE_QUEUE_SIZE = "queue_size"
RULE_DEVELOPMENT = "development"
RULE_DEFAULT = "default"


@dataclass(frozen=True)
class Thresholds:
    """The seed's knobs: RESPONSE_TIME_THRESHOLD_MS, TASK_RATE_THRESHOLD, QUEUE_SIZE_THRESHOLD, NODE_ENV."""

    response_time_ms: float = 500.0
    task_rate_per_min: float = 10.0
    queue_size: int = 5
    node_env: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> Thresholds:
        return cls(
            response_time_ms=settings.response_time_threshold_ms,
            task_rate_per_min=settings.task_rate_threshold,
            queue_size=settings.queue_size_threshold,
            node_env=settings.node_env,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "response_time_ms": self.response_time_ms,
            "task_rate_per_min": self.task_rate_per_min,
            "queue_size": self.queue_size,
            "node_env": self.node_env,
        }


@dataclass(frozen=True)
class Snapshot:
    """The metrics at one refresh; immutable, so API threads can read it while the loop replaces it."""

    avg_response_time_ms: float | None = None  # None until a result with created_at and finished_at
    response_samples: int = 0
    task_rate_per_min: int = 0
    queue_sizes: Mapping[str, int] = field(default_factory=dict)  # from live and stale heartbeats
    refreshed_at: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "avg_response_time_ms": None if self.avg_response_time_ms is None else round(self.avg_response_time_ms, 3),
            "response_samples": self.response_samples,
            "task_rate_per_min": self.task_rate_per_min,
            "queue_sizes": dict(self.queue_sizes),
            "refreshed_at": self.refreshed_at,
        }


@dataclass(frozen=True)
class Decision:
    transport: str  # files | events
    rule: str  # one of the RULE_* names
    detail: str  # for humans: the numbers that made the rule fire

    def as_dict(self) -> dict[str, str]:
        return {"transport": self.transport, "rule": self.rule, "detail": self.detail}


def decide(mode: str, snapshot: Snapshot, thresholds: Thresholds, worker: str | None = None) -> Decision:
    """The transport a dispatch would use now, and why.

    ``auto`` applies the seed's rules in the seed's order; the first that fires wins. For one
    worker the queue rule looks at that worker's queue; without a worker (the orchestrator's
    overall decision) it looks at the longest queue of any worker.
    """
    if mode in (FILES, EVENTS):
        return Decision(mode, RULE_MODE, f"ORCHESTRATOR_MODE is {mode}")
    avg = snapshot.avg_response_time_ms
    if avg is not None and avg > thresholds.response_time_ms:
        return Decision(
            EVENTS,
            RULE_RESPONSE_TIME,
            f"average response time {avg:.0f} ms over the last {snapshot.response_samples} results "
            f"exceeds {thresholds.response_time_ms:g} ms",
        )
    rate = snapshot.task_rate_per_min
    if rate > thresholds.task_rate_per_min:
        return Decision(
            EVENTS, RULE_TASK_RATE, f"{rate} results in the last minute exceeds {thresholds.task_rate_per_min:g}/min"
        )
    queue_owner, queue = _queue_of(snapshot.queue_sizes, worker)
    if queue is not None and queue > thresholds.queue_size:
        return Decision(EVENTS, RULE_QUEUE_SIZE, f"{queue_owner}'s queue of {queue} exceeds {thresholds.queue_size}")
    if thresholds.node_env == "development":
        return Decision(FILES, RULE_DEVELOPMENT, "NODE_ENV is development")
    return Decision(FILES, RULE_DEFAULT, "no rule for events fired")


def _queue_of(queues: Mapping[str, int], worker: str | None) -> tuple[str | None, int | None]:
    if worker is not None:
        return worker, queues.get(worker)
    if not queues:
        return None, None
    owner = max(queues, key=lambda name: queues[name])
    return owner, queues[owner]


@dataclass
class _Folder:
    """What the window remembers about one results folder between refreshes."""

    mtime_ns: int = -1  # the folder's mtime before the last listing: unchanged means no new entries
    names: set[str] = field(default_factory=set)  # every result name in the last listing


class ResultWindow:
    """The newest response times and the last minute of results, refreshed incrementally.

    A refresh lists only folders whose mtime moved, finds new results by name (one os.listdir
    and a set difference: no syscall per known result; a set of names costs about 100 bytes a
    result), and stats only the new ones. A result's arrival time is its file's ctime: the
    executor writes it atomically and the rename that makes it visible sets the ctime. That
    orders results without opening them, so a refresh opens at most the newest
    100 new results. ``reads`` counts every result file opened, for tests and for the curious.

    Idle, with the folders unchanged, a refresh costs a stat per worker whatever the history.
    A refresh after a change still lists the folder's names: O(results) in C, about 0.5 µs a
    result here (issue 15 leaves that for an inotify watch).
    """

    def __init__(self, spool: Spool, *, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.spool = spool
        self._clock_ns = clock_ns
        self._folders: dict[str, _Folder] = {}
        self._response_ms: collections.deque[float] = collections.deque(maxlen=RESPONSE_WINDOW)
        self._arrivals: collections.deque[int] = collections.deque(maxlen=RATE_CAP)  # ctime_ns
        self.reads = 0
        self.refreshes = 0

    def refresh(self, workers: Iterable[str] | None = None) -> None:
        """Take in every result that appeared since the last refresh."""
        started_ns = self._clock_ns()
        names = list(workers) if workers is not None else self._result_folders()
        horizon = started_ns - int(RATE_WINDOW_S * 1e9)
        arrivals: list[int] = []  # ctime_ns of the new results still inside the rate window
        newest: list[tuple[int, str, str]] = []  # a min-heap of the newest RESPONSE_WINDOW new results
        for worker in names:
            for found in self._new_entries(worker, started_ns):
                if found[0] >= horizon:
                    arrivals.append(found[0])
                # Only the newest RESPONSE_WINDOW can still be among the last 100: never keep,
                # sort or open the rest (a first refresh over 100k results stays small).
                if len(newest) < RESPONSE_WINDOW:
                    heapq.heappush(newest, found)
                elif found > newest[0]:
                    heapq.heapreplace(newest, found)
        self._arrive(sorted(arrivals))
        for _, worker, name in sorted(newest):
            self._take(worker, name)
        self.refreshes += 1

    def _arrive(self, arrivals: list[int]) -> None:
        """Keep ``_arrivals`` sorted, so that expiry pops from the left and the rate is its length.

        New results are nearly always newer than every one already held: then this appends. A
        result whose ctime is older than one already held (another folder, another writer's
        clock) costs one merge of the last minute's arrivals, which RATE_CAP bounds.
        """
        if not arrivals:
            return
        if self._arrivals and arrivals[0] < self._arrivals[-1]:
            merged = list(heapq.merge(self._arrivals, arrivals))
            self._arrivals.clear()
            self._arrivals.extend(merged)
        else:
            self._arrivals.extend(arrivals)

    def snapshot(self, queue_sizes: Mapping[str, int] | None = None) -> Snapshot:
        now_ns = self._clock_ns()
        horizon = now_ns - int(RATE_WINDOW_S * 1e9)
        while self._arrivals and self._arrivals[0] < horizon:
            self._arrivals.popleft()
        samples = len(self._response_ms)
        return Snapshot(
            avg_response_time_ms=sum(self._response_ms) / samples if samples else None,
            response_samples=samples,
            task_rate_per_min=len(self._arrivals),  # sorted: what is left after the pops is the last minute
            queue_sizes=dict(queue_sizes or {}),
            refreshed_at=iso_now(),
        )

    def _result_folders(self) -> list[str]:
        with contextlib.suppress(FileNotFoundError), os.scandir(self.spool.results_dir) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False) and not e.name.startswith("."))
        return []

    def _new_entries(self, worker: str, started_ns: int) -> Iterator[tuple[int, str, str]]:
        """(ctime_ns, worker, name) of each result not seen before, one at a time: nothing per
        result is held beyond its name, however many a first listing finds."""
        folder = self._folders.setdefault(worker, _Folder())
        path = self.spool.results(worker)
        try:
            mtime_ns = os.stat(path).st_mtime_ns
        except OSError:
            return
        # An unchanged folder mtime means no entry was added or renamed in since the last
        # listing, unless that mtime is so recent that a change within the same clock tick
        # could hide behind it.
        if mtime_ns == folder.mtime_ns and mtime_ns < started_ns - MTIME_GUARD_NS:
            return
        try:
            present = set(os.listdir(path))  # plain names, set operations in C: no object per entry
        except (FileNotFoundError, NotADirectoryError):
            return
        folder.mtime_ns = mtime_ns
        known = folder.names
        new = present - known
        if len(known) + len(new) != len(present):  # some were removed: forget them
            known.intersection_update(present)
        del present
        known |= new
        for name in new:
            if not is_task_name(name):
                continue
            try:
                ctime_ns = os.lstat(os.path.join(path, name)).st_ctime_ns
            except FileNotFoundError:
                known.discard(name)  # gone before we looked: should it come back, it is new then
                continue
            yield ctime_ns, worker, name

    def _take(self, worker: str, name: str) -> None:
        self.reads += 1
        result = peek_record(self.spool.results(worker) / name, result_record)
        if result is None:
            return  # vanished or unreadable: it still counted towards the rate
        created, finished = parse_iso(result.get("created_at")), parse_iso(result.get("finished_at"))
        if created is not None and finished is not None and finished >= created:
            self._response_ms.append((finished - created) * 1000.0)
