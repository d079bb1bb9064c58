"""The spool's layout: where a task is (inbox, claim, result, dead letter) and the renames between.

A task is always in exactly one place. Writes go through spool.atomic; time through clock.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activation.clock import iso_now
from activation.errors import SpoolError
from activation.hashes import sha256_hex
from activation.spool.atomic import atomic_write_bytes, atomic_write_json, json_bytes
from activation.spool.readers import BadRecord, dead_letter_record, peek_record, read_record
from activation.spool.records import DeadLetterRecord
from activation.spool.task import TASK_SUFFIX, is_task_name, is_valid_task_id, task_id_of

DEAD_LETTER = ".dead_letter"
PROCESSING = ".processing"
RAW_SUFFIX = ".raw"


@dataclass(frozen=True)
class Location:
    """Where a task id is right now."""

    state: str  # pending | processing | done | dead
    worker: str | None
    path: Path


class Spool:
    """Paths and moves inside one spool root. Every method is safe to call from any process."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tasks_dir = self.root / "tasks"
        self.results_dir = self.root / "results"
        self.heartbeats_dir = self.root / "heartbeats"
        self.dead_letter_dir = self.tasks_dir / DEAD_LETTER

    # -- layout -----------------------------------------------------------------------------

    def inbox(self, worker: str) -> Path:
        return self.tasks_dir / worker

    def processing(self, worker: str) -> Path:
        return self.tasks_dir / worker / PROCESSING

    def results(self, worker: str) -> Path:
        return self.results_dir / worker

    def task_path(self, worker: str, task_id: str) -> Path:
        return self.inbox(worker) / f"{task_id}{TASK_SUFFIX}"

    def claim_path(self, worker: str, task_id: str) -> Path:
        return self.processing(worker) / f"{task_id}{TASK_SUFFIX}"

    def result_path(self, worker: str, task_id: str) -> Path:
        return self.results(worker) / f"{task_id}{TASK_SUFFIX}"

    def heartbeat_path(self, worker: str) -> Path:
        return self.heartbeats_dir / f"{worker}.json"

    def dead_letter_path(self, key: str) -> Path:
        return self.dead_letter_dir / f"{key}{TASK_SUFFIX}"

    def init(self, workers: Iterable[str] = ()) -> None:
        """Create the layout; existing folders and files are left as they are.

        Every folder that can be made is made, even when another cannot (a file in its place):
        the SpoolError at the end names the first that failed.
        """
        folders = [self.tasks_dir, self.results_dir, self.heartbeats_dir, self.dead_letter_dir]
        for worker in workers:
            folders += [self.inbox(worker), self.processing(worker), self.results(worker)]
        failed: list[str] = []
        for folder in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                failed.append(f"{folder}: {exc.strerror}")
        if failed:
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise SpoolError(f"cannot create the spool layout under {self.root}: {failed[0]}{more}")

    def try_init(self, workers: Iterable[str] = ()) -> str | None:
        """init(), for a program that must keep running on a damaged spool: the problem, or None."""
        try:
            self.init(workers)
        except SpoolError as exc:
            return str(exc)
        return None

    def workers(self) -> list[str]:
        """Every worker the spool knows of: an inbox, a results folder or a heartbeat."""
        names: set[str] = set()
        for folder in (self.tasks_dir, self.results_dir):
            with contextlib.suppress(FileNotFoundError):
                names.update(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        with contextlib.suppress(FileNotFoundError):
            names.update(task_id_of(e.name) for e in os.scandir(self.heartbeats_dir) if is_task_name(e.name))
        return sorted(names)

    # -- reading ----------------------------------------------------------------------------

    def inbox_names(self, worker: str) -> list[str]:
        """Task file names in the inbox, oldest first (FIFO by arrival, then by name)."""
        entries = []
        with contextlib.suppress(FileNotFoundError), os.scandir(self.inbox(worker)) as it:
            for entry in it:
                if not is_task_name(entry.name):
                    continue
                try:
                    info = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                entries.append((info.st_mtime_ns, entry.name))
        entries.sort()
        return [name for _, name in entries]

    def count_inbox(self, worker: str) -> int:
        with contextlib.suppress(FileNotFoundError), os.scandir(self.inbox(worker)) as it:
            return sum(1 for e in it if is_task_name(e.name))
        return 0

    def claimed_ids(self, worker: str) -> list[str]:
        with contextlib.suppress(FileNotFoundError), os.scandir(self.processing(worker)) as it:
            return sorted(task_id_of(e.name) for e in it if is_task_name(e.name))
        return []

    def remove_unclaimed(self, worker: str, suffix: str) -> int:
        """Delete the ``<task_id><suffix>`` files in ``.processing/`` whose claim is gone.

        The executor's start calls it for what it keeps beside a claim (a task's log, a cancel
        request): once the claim was requeued, dead-lettered or finished, they belong to no run.
        """
        removed = 0
        folder = self.processing(worker)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as it:
            for entry in it:
                if not entry.name.endswith(suffix):
                    continue
                task_id = entry.name[: -len(suffix)]
                if is_valid_task_id(task_id) and os.path.lexists(self.claim_path(worker, task_id)):
                    continue
                with contextlib.suppress(OSError):  # gone already, or a spool that refuses: next start
                    os.unlink(entry.path)
                    removed += 1
        return removed

    def has_result(self, worker: str, task_id: str) -> bool:
        return self.result_path(worker, task_id).exists()

    def dead_letters(self) -> Iterator[Path]:
        with contextlib.suppress(FileNotFoundError), os.scandir(self.dead_letter_dir) as it:
            for entry in it:
                if is_task_name(entry.name):
                    yield Path(entry.path)

    def locate(self, task_id: str, workers: Iterable[str] | None = None) -> Location | None:
        """Find a task id in the spool: result first, because the result wins over a claim."""
        if not is_valid_task_id(task_id):
            return None
        names = list(workers) if workers is not None else self.workers()
        for worker in names:
            path = self.result_path(worker, task_id)
            if path.exists():
                return Location("done", worker, path)
        for worker in names:
            for state, path in (
                ("processing", self.claim_path(worker, task_id)),
                ("pending", self.task_path(worker, task_id)),
            ):
                if os.path.lexists(path):
                    return Location(state, worker, path)
        path = self.dead_letter_path(task_id)
        if path.exists():
            letter = peek_record(path, dead_letter_record)  # a hostile record still says where the task is
            return Location("dead", letter.get("worker") if letter is not None else None, path)
        return None

    # -- moves ------------------------------------------------------------------------------

    def claim(self, worker: str, task_id: str) -> Path | None:
        """Claim a pending task by renaming it out of the inbox; None if someone else did."""
        claim = self.claim_path(worker, task_id)
        try:
            os.rename(self.task_path(worker, task_id), claim)
        except FileNotFoundError:
            return None
        return claim

    def requeue(self, worker: str, task_id: str, task: dict[str, Any] | None = None) -> Path:
        """Put a claimed task back in the inbox, first rewriting it in place when ``task`` is given."""
        claim = self.claim_path(worker, task_id)
        if task is not None:
            atomic_write_json(claim, task)
        target = self.task_path(worker, task_id)
        os.rename(claim, target)
        return target

    def write_result(self, worker: str, result: Mapping[str, Any]) -> Path:
        """Write the result, then drop the claim. A crash in between leaves both: the result wins."""
        task_id = result["task_id"]
        path = self.result_path(worker, task_id)
        atomic_write_json(path, result)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.claim_path(worker, task_id))
        return path

    def dead_letter(
        self,
        source: Path,
        *,
        reason: str,
        detail: str,
        worker: str | None,
        task: dict[str, Any] | None = None,
    ) -> Path:
        """Move ``source`` to the dead letter with a reason.

        When the task parsed as a JSON object it is kept in the record; otherwise the original
        file (or symlink, or folder) is moved beside the record as ``<key>.raw``, so nothing is
        lost either way. The record is written first: a crash in between leaves the source in
        place, and handling it again gives the same record.
        """
        name = source.name
        stem = task_id_of(name)
        # A hostile or malformed name never becomes a path component.
        invalid = "invalid-" + sha256_hex(name.encode("utf-8", "surrogateescape"))[:16]
        key = stem if is_valid_task_id(stem) else invalid
        record_path = self.dead_letter_path(key)
        if _is_other_entry(record_path, task):
            key = f"{key}.{os.urandom(3).hex()}"
            record_path = self.dead_letter_path(key)
        record: DeadLetterRecord = {
            "task_id": stem if is_valid_task_id(stem) else None,
            "worker": worker,
            "reason": reason,
            "detail": detail,
            "dead_at": iso_now(),
            "source": printable_path(source),
        }
        data = None
        if task is not None:
            try:
                data = json_bytes({**record, "task": task})
            except ValueError:  # a task no JSON can hold (spool.codec): keep the original bytes instead
                task = None
        if data is None:
            record["raw"] = str(self.dead_letter_dir / f"{key}{RAW_SUFFIX}")
            data = json_bytes(record)
        self.dead_letter_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(record_path, data)
        with contextlib.suppress(FileNotFoundError):  # someone else moved it first
            if task is None:
                os.rename(source, record["raw"])
            else:
                os.unlink(source)
        return record_path


def printable_path(path: Path) -> str:
    """A path as text any JSON writer and terminal takes: bytes that are not UTF-8 as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _is_other_entry(record_path: Path, task: dict[str, Any] | None) -> bool:
    """Whether an existing record belongs to another dead letter, not to a retry of this one.

    A crash between writing the record and moving the source leaves a record whose raw file
    was never moved, or whose task equals this one: handling it again reuses the record.
    Any record that is not a dead letter (unreadable, not JSON, ill-typed) is another entry: it is
    kept as it is, and this one takes a new key beside it.
    """
    try:
        record = read_record(record_path, dead_letter_record)
    except FileNotFoundError:
        return False
    except (OSError, BadRecord):
        return True
    if task is not None:
        return bool(record.get("task") != task)
    raw = record.get("raw")
    return raw is None or os.path.lexists(raw)
