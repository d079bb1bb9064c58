"""Task listing: every task of the spool by state (pending, running, done, failed, timeout,
cancelled, dead), newest first, computed from the folders themselves (inbox, claims, results,
dead letter) so that it is live and needs no index.

Cost: a listing reads at most ``limit`` result files, and finds the newest results through each
worker's result index (result_index.py), which costs only the rows read while the results folder
is unchanged; after a change the next listing lists the folder again, names only, and stats just
the new entries. Inboxes, claims and the dead letter are small and are listed each time.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activation.clock import iso_from_epoch
from activation.spool.layout import Spool
from activation.spool.readers import BadRecord, dead_letter_record, peek_record, read_record, result_record
from activation.spool.records import TaskRecord
from activation.spool.result_index import ResultIndex
from activation.spool.task import is_task_name, task_id_of, task_record

PENDING = "pending"
RUNNING = "running"
DONE = "done"
FAILED = "failed"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
DEAD = "dead"
STATES = (PENDING, RUNNING, DONE, FAILED, TIMEOUT, CANCELLED, DEAD)
FINISHED = (DONE, FAILED, TIMEOUT, CANCELLED)
# A result's ``status`` and the state it lists under.
_RESULT_STATES = {"completed": DONE, "failed": FAILED, "timeout": TIMEOUT, "cancelled": CANCELLED}
DESCRIPTION_WIDTH = 80


@dataclass
class TaskRow:
    """One task as ``activation tasks`` shows it."""

    task_id: str
    worker: str | None
    state: str
    since: float  # epoch: arrival (pending), claim (running), finish (results), death (dead)
    attempt: int | None = None
    elapsed_s: float | None = None  # running: since the claim
    duration_s: float | None = None  # finished: the agent's run
    exit_code: int | None = None
    description: str | None = None
    detail: str | None = None  # dead: the reason and its detail
    path: str = ""
    replica: str | None = None  # streams mode: the replica (on another host) that runs it

    def as_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["since"] = iso_from_epoch(self.since)
        return data


@dataclass(frozen=True)
class Query:
    """What to list. ``since`` is an epoch; only tasks whose time is at or after it are listed."""

    workers: tuple[str, ...] = ()
    states: tuple[str, ...] = STATES
    since: float | None = None
    limit: int | None = 50


@dataclass(frozen=True)
class RemoteRun:
    """Streams mode, on the orchestrator's spool: a task of the outbox that a replica holds."""

    replica: str
    attempt: int
    elapsed_s: float | None  # since its agent started, when the replica has said so


# (worker, task_id) -> its run elsewhere; what Redis says of the outbox's tasks
Remote = Mapping[tuple[str, str], RemoteRun]


@dataclass
class _Entry:
    mtime: float
    name: str
    path: str
    ctime: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _entries(folder: Path, since: float | None) -> list[_Entry]:
    """Task files of ``folder`` with their times; one scandir and one lstat each, no reads."""
    found: list[_Entry] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as it:
        for entry in it:
            if not is_task_name(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except FileNotFoundError:  # moved on while we looked
                continue
            if since is not None and info.st_mtime < since:
                continue
            found.append(_Entry(info.st_mtime, entry.name, entry.path, info.st_ctime))
    return found


def _task(path: str) -> TaskRecord | None:
    """The task a pending or claimed file holds, or None (the listener dead-letters a bad one)."""
    return peek_record(Path(path), task_record)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _short(text: object) -> str | None:
    if not isinstance(text, str):
        return None
    line = " ".join(text.split())
    return line if len(line) <= DESCRIPTION_WIDTH else line[: DESCRIPTION_WIDTH - 1] + "…"


def _workers(spool: Spool, query: Query) -> list[str]:
    return list(query.workers) if query.workers else spool.workers()


def running(spool: Spool, query: Query, now: float, remote: Remote | None = None) -> Iterator[TaskRow]:
    """Claims, newest claim first. A claim is a rename, which sets the inode's ctime: that is
    when it started (its mtime is still the task file's). Then the tasks of ``remote``."""
    if remote:
        yield from _running_elsewhere(spool, query, now, remote)
    for worker in _workers(spool, query):
        entries = _entries(spool.processing(worker), None)
        for entry in sorted(entries, key=lambda e: e.ctime, reverse=True):
            if query.since is not None and entry.ctime < query.since:
                continue
            yield _file_row(worker, entry, RUNNING, entry.ctime, elapsed_s=round(max(0.0, now - entry.ctime), 1))


def _running_elsewhere(spool: Spool, query: Query, now: float, remote: Remote) -> Iterator[TaskRow]:
    """Outbox tasks a replica holds, longest running first: their outbox file is the description."""
    wanted = set(_workers(spool, query))
    runs = [(w, t, run) for (w, t), run in remote.items() if w in wanted]
    for worker, task_id, run in sorted(runs, key=lambda r: -(r[2].elapsed_s or 0.0)):
        path = spool.task_path(worker, task_id)
        started = now - run.elapsed_s if run.elapsed_s is not None else now
        if query.since is not None and started < query.since:
            continue
        task = _task(str(path))
        if task is None:
            continue  # its result came back meanwhile (or it was never dispatched from here)
        yield TaskRow(
            task_id=task_id,
            worker=worker,
            state=RUNNING,
            since=started,
            attempt=run.attempt,
            elapsed_s=None if run.elapsed_s is None else round(run.elapsed_s, 1),
            description=_short(task.get("description")),
            path=str(path),
            replica=run.replica,
        )


def pending(spool: Spool, query: Query, remote: Remote | None = None) -> Iterator[TaskRow]:
    """The inboxes, next to run first (FIFO by arrival), stopping at the limit; not what ``remote``
    says runs elsewhere."""
    for worker in _workers(spool, query):
        entries = sorted(_entries(spool.inbox(worker), query.since), key=lambda e: (e.mtime, e.name))
        if remote:
            entries = [e for e in entries if (worker, task_id_of(e.name)) not in remote]
        for entry in entries[: query.limit]:
            yield _file_row(worker, entry, PENDING, entry.mtime)


def _file_row(worker: str, entry: _Entry, state: str, since: float, elapsed_s: float | None = None) -> TaskRow:
    """The row of a task file in an inbox or a claim: its next run is the one after its ``attempts``
    (a file that is no valid task still lists, without a description)."""
    task: TaskRecord | dict[str, Any] = _task(entry.path) or {}
    return TaskRow(
        task_id=task_id_of(entry.name),
        worker=worker,
        state=state,
        since=since,
        attempt=(_int(task.get("attempts")) or 0) + 1,
        elapsed_s=elapsed_s,
        description=_short(task.get("description")),
        path=entry.path,
    )


def finished(spool: Spool, query: Query, skipped: list[str] | None = None) -> Iterator[TaskRow]:
    """Results of every worker, newest first; reads only as many files as it yields (plus the
    ones whose status the query filters out). A result file that is no result (hostile,
    hand-edited) is skipped, its one-line error appended to ``skipped``."""
    wanted = set(query.states) & set(FINISHED)
    if not wanted:
        return
    # Each worker's index is newest first and read lazily: merged, they stop where the caller does.
    streams = [_newest_results(spool, worker, query.since) for worker in _workers(spool, query)]
    ordered: Iterable[tuple[float, str, str, str]] = heapq.merge(*streams, reverse=True)
    if wanted == set(FINISHED) and query.limit is not None:
        ordered = itertools.islice(ordered, query.limit)
    for mtime, name, path, worker in ordered:
        try:
            result = read_record(Path(path), result_record)
        except FileNotFoundError:  # purged while we looked
            continue
        except (OSError, BadRecord) as exc:
            if skipped is not None:
                skipped.append(f"{worker}/{exc}" if isinstance(exc, BadRecord) else f"{path}: {exc}")
            continue
        state = _RESULT_STATES[result["status"]]
        if state not in wanted:
            continue
        yield TaskRow(
            task_id=task_id_of(name),
            worker=worker,
            state=state,
            since=mtime,
            attempt=result.get("attempts"),
            duration_s=_float(result.get("duration_s")),
            exit_code=result.get("exit_code"),
            description=_short(result.get("description")),
            path=path,
        )


def _newest_results(spool: Spool, worker: str, since: float | None) -> Iterator[tuple[float, str, str, str]]:
    for mtime, name, path in ResultIndex(spool, worker).newest(since):
        yield mtime, name, path, worker


def dead(spool: Spool, query: Query) -> Iterator[TaskRow]:
    """Dead letters, newest first, of the queried workers."""
    entries = sorted(_entries(spool.dead_letter_dir, query.since), key=lambda e: e.mtime, reverse=True)
    for entry in entries:
        try:
            record = read_record(Path(entry.path), dead_letter_record)
        except FileNotFoundError:  # retried or purged while we looked
            continue
        except (OSError, BadRecord) as exc:  # still a task given up on: listed, with what is wrong
            if not query.workers:
                detail = f"unreadable: {exc}"
                yield TaskRow(task_id_of(entry.name), None, DEAD, entry.mtime, detail=detail, path=entry.path)
            continue
        worker = record.get("worker")
        if query.workers and worker not in query.workers:
            continue
        task = record.get("task", {})
        yield TaskRow(
            task_id=task_id_of(entry.name),
            worker=worker,
            state=DEAD,
            since=entry.mtime,
            attempt=_int(task.get("attempts")),
            description=_short(task.get("description")),
            detail=f"{record.get('reason')}: {record.get('detail')}",
            path=entry.path,
        )


def list_tasks(
    spool: Spool,
    query: Query,
    *,
    now: float | None = None,
    remote: Remote | None = None,
    skipped: list[str] | None = None,
) -> list[TaskRow]:
    """Running first, then pending (next first), then finished and dead, newest first; at most
    ``query.limit`` rows. ``remote``: outbox tasks that replicas hold (streams mode) run.
    ``skipped`` collects a line for each result file that was no result."""
    now = time.time() if now is None else now
    rows: list[TaskRow] = []
    limit = query.limit

    def full() -> bool:
        return limit is not None and len(rows) >= limit

    if RUNNING in query.states:
        for row in running(spool, query, now, remote):
            if full():
                return rows
            rows.append(row)
    if PENDING in query.states:
        for row in pending(spool, query, remote):
            if full():
                return rows
            rows.append(row)
    if full():
        return rows
    rest = Query(query.workers, query.states, query.since, None if limit is None else limit - len(rows))
    tail = heapq.merge(
        finished(spool, rest, skipped), dead(spool, rest) if DEAD in query.states else iter(()), key=lambda r: -r.since
    )
    for row in tail:
        if full():
            break
        rows.append(row)
    return rows
