"""Result retention: deleting results older than ACTIVATION_RESULT_TTL, each with its agent log.

Two ways in: ``purge`` (``activation results purge``), one full pass; and ``Sweeper``, the
orchestrator's periodic work, which looks at a bounded number of entries per step, so that its
cost per step stays the same however many results there are, and rests between passes until the
oldest result it kept can expire.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from activation.spool.layout import Spool
from activation.spool.task import is_task_name, task_id_of
from activation.spool.tasklog import log_of_result

log = logging.getLogger("activation.retention")
DEFAULT_TTL = 7 * 86400.0
SWEEP_BUDGET = 500  # entries looked at per step
SWEEP_REST = 60.0  # the least rest, in seconds, between the end of a pass and the next
LATE_SHARE = 0.1  # the longest rest, as a share of the TTL: how late an unusual result may go
SWEEP_INTERVAL = 10.0  # seconds between steps: 500 lstats per 10 s, 0.03-0.07 % of a core while a pass runs


@dataclass(frozen=True)
class Purged:
    worker: str
    task_id: str
    path: str
    finished: float  # the result file's mtime: when it was written

    def as_dict(self) -> dict[str, object]:
        from activation.clock import iso_from_epoch

        return {
            "worker": self.worker,
            "task_id": self.task_id,
            "path": self.path,
            "finished_at": iso_from_epoch(self.finished),
        }


def _old(spool: Spool, worker: str, cutoff: float) -> Iterator[Purged]:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(spool.results(worker)) as it:
        for entry in it:
            if not is_task_name(entry.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                mtime = entry.stat(follow_symlinks=False).st_mtime
                if mtime < cutoff:
                    yield Purged(worker, task_id_of(entry.name), entry.path, mtime)


def _delete(item: Purged, skipped: list[str] | None = None) -> bool:
    """Delete a result and the agent log kept beside it (spool.tasklog).

    Retention reads no record, only names and mtimes; what it cannot delete (a folder under a
    result's name, a spool that refuses) is left, with one line in ``skipped``, not raised.
    """
    try:
        os.unlink(item.path)
    except FileNotFoundError:
        return False
    except OSError as exc:
        if skipped is not None:
            skipped.append(f"{item.worker}/{os.path.basename(item.path)}: {exc.strerror or exc}")
        return False
    with contextlib.suppress(OSError):  # the result went: a log it cannot delete is only a file
        os.unlink(log_of_result(Path(item.path)))
    return True


def purge(
    spool: Spool,
    older_than: float,
    *,
    dry_run: bool = False,
    now: float | None = None,
    skipped: list[str] | None = None,
) -> list[Purged]:
    """Delete every result written more than ``older_than`` seconds ago; return what went.
    ``skipped`` collects one line for each that could not be deleted."""
    cutoff = (time.time() if now is None else now) - older_than
    gone = []
    for worker in spool.workers():
        for item in _old(spool, worker, cutoff):
            if dry_run or _delete(item, skipped):
                gone.append(item)
    if gone and not dry_run:
        log.info("purged %d results older than %gs", len(gone), older_than, extra={"event": "results_purged"})
    return gone


class Sweeper:
    """Applies the TTL a bounded step at a time: ``step()`` looks at most ``budget`` entries,
    at most once per ``interval`` seconds, so its cost per second is fixed whatever the history.

    A pass walks every worker's results folder once, resumably. Results are never rewritten and
    new ones are written now, so after a pass nothing can expire before the oldest result it kept
    does: the sweeper rests until then, at least ``rest`` seconds and at most LATE_SHARE of the
    TTL. Without that, a history that takes longer to walk than ``rest`` (100k results at 500
    entries per 10 s is a 33-minute pass) would be walked over and over for nothing. Only a file
    that arrives with an old mtime (a restore that keeps times) can expire sooner, and it is
    deleted at most a tenth of the TTL late.
    """

    def __init__(
        self,
        spool: Spool,
        ttl: float,
        *,
        budget: int = SWEEP_BUDGET,
        rest: float = SWEEP_REST,
        interval: float = SWEEP_INTERVAL,
    ) -> None:
        self.spool, self.ttl, self.budget, self.rest, self.interval = spool, ttl, budget, rest, interval
        self._next_step = 0.0
        self._workers: list[str] = []
        self._entries: Iterator[os.DirEntry[str]] | None = None
        self._worker: str | None = None
        self._resume_at = 0.0
        self._oldest: float | None = None  # the oldest mtime this pass kept
        self.deleted = 0
        self.skipped = 0  # expired results it could not delete, over its life

    def step(self, now: float | None = None) -> int:
        """Look at up to ``budget`` entries; returns how many results it deleted."""
        now = time.time() if now is None else now
        if now < self._next_step:
            return 0
        self._next_step = now + self.interval
        if self._entries is None and not self._workers:
            if now < self._resume_at:
                return 0
            self._workers = self.spool.workers()
        cutoff, looked, deleted = now - self.ttl, 0, 0
        skipped: list[str] = []
        while looked < self.budget:
            if self._entries is None:
                if not self._workers:
                    self._resume_at = now + self._rest_after(now)
                    self._oldest = None
                    break
                self._worker = self._workers.pop(0)
                try:
                    self._entries = iter(os.scandir(self.spool.results(self._worker)))
                except (FileNotFoundError, NotADirectoryError):
                    continue
            entry = next(self._entries, None)
            if entry is None:
                self._close()
                continue
            looked += 1
            if not is_task_name(entry.name):
                continue
            try:
                mtime = entry.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:
                continue
            if mtime < cutoff and _delete(
                Purged(self._worker or "", task_id_of(entry.name), entry.path, mtime), skipped
            ):
                deleted += 1
            elif self._oldest is None or mtime < self._oldest:
                self._oldest = mtime  # kept, or expired and not deleted: then the next pass is due soon
        if deleted:
            self.deleted += deleted
            log.info(
                "retention deleted %d results older than %gs", deleted, self.ttl, extra={"event": "results_expired"}
            )
        if skipped:
            self.skipped += len(skipped)
            log.warning(
                "retention could not delete %d expired result(s), first %s",
                len(skipped),
                skipped[0],
                extra={"event": "results_not_expired"},
            )
        return deleted

    def _rest_after(self, now: float) -> float:
        """Seconds from the end of a pass to the next: until the oldest kept result expires, bounded."""
        longest = max(self.rest, self.ttl * LATE_SHARE)
        if self._oldest is None:
            return longest  # no result at all: the next one expires a TTL from its arrival
        return min(max(self._oldest + self.ttl - now, self.rest), longest)

    def _close(self) -> None:
        closer = getattr(self._entries, "close", None)
        if closer is not None:
            closer()
        self._entries = None

    def close(self) -> None:
        self._close()
        self._workers = []
        self._oldest = None  # a pass cut short tells nothing about the next one
