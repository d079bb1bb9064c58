"""A finished run whose result could not be written yet: kept beside its claim, never thrown away.

When the result write fails (a full disk, a results path that is not a folder), the executor keeps
the run's result and retries only the write. It also saves the result as
``tasks/<worker>/.processing/<task_id>.outcome`` (not a ``.json`` name, so no one takes it for a
task) when the disk lets it, so that a restarted executor, or any recovery of the claim, finishes
the write instead of running the agent again. Only an outcome lost with its process (in memory,
never saved) makes the task run again.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from activation.spool.atomic import atomic_write_json
from activation.spool.layout import Spool
from activation.spool.readers import peek_record, result_record
from activation.spool.records import ResultRecord
from activation.spool.task import is_valid_task_id

OUTCOME_SUFFIX = ".outcome"


def outcome_path(spool: Spool, worker: str, task_id: str) -> Path:
    return spool.processing(worker) / f"{task_id}{OUTCOME_SUFFIX}"


def save_outcome(spool: Spool, worker: str, result: ResultRecord) -> Path:
    """Keep ``result`` beside its claim, durably; raises OSError (the disk may be as full as the results')."""
    path = outcome_path(spool, worker, result["task_id"])
    atomic_write_json(path, result)
    return path


def saved_outcomes(spool: Spool, worker: str) -> list[str]:
    """Task ids with a saved outcome in ``.processing/``."""
    with contextlib.suppress(FileNotFoundError), os.scandir(spool.processing(worker)) as it:
        ids = (e.name[: -len(OUTCOME_SUFFIX)] for e in it if e.name.endswith(OUTCOME_SUFFIX))
        return sorted(i for i in ids if is_valid_task_id(i) and not i.startswith("."))
    return []


def load_outcome(spool: Spool, worker: str, task_id: str) -> ResultRecord | None:
    """The saved result, or None when it is absent or unreadable (then it is no outcome at all)."""
    return peek_record(outcome_path(spool, worker, task_id), lambda value: result_record(value, task_id=task_id))


def drop_outcome(spool: Spool, worker: str, task_id: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(outcome_path(spool, worker, task_id))


def finish_write(spool: Spool, worker: str, result: ResultRecord) -> Path:
    """Write the result, drop the claim, then the saved outcome; raises OSError when the write fails."""
    path = spool.write_result(worker, result)
    drop_outcome(spool, worker, result["task_id"])
    return path


class UnwrittenOutcome(Exception):
    """The saved outcome's result still cannot be written; ``result`` is what to keep trying."""

    def __init__(self, result: ResultRecord, error: OSError) -> None:
        super().__init__(f"cannot write the result of {result.get('task_id')}: {error}")
        self.result = result
        self.error = error


def settle_outcome(spool: Spool, worker: str, task_id: str) -> ResultRecord | None:
    """Settle a saved outcome, as any recovery of the claim must do before it requeues anything.

    Returns the result when it wrote it (the claim is gone), None when there was nothing to write:
    the result already existed or the claim is gone (the outcome file is dropped), or the file is
    no usable outcome (recover the claim as usual). Raises UnwrittenOutcome when the write fails.
    """
    if spool.has_result(worker, task_id) or not spool.claim_path(worker, task_id).exists():
        drop_outcome(spool, worker, task_id)
        return None
    result = load_outcome(spool, worker, task_id)
    if result is None:
        drop_outcome(spool, worker, task_id)
        return None
    try:
        finish_write(spool, worker, result)
    except OSError as exc:
        raise UnwrittenOutcome(result, exc) from None
    return result


class HeldResults:
    """A program's finished runs whose result the spool has not taken yet, each saved when it can be."""

    def __init__(self, spool: Spool, worker: str) -> None:
        self.spool = spool
        self.worker = worker
        self.results: dict[str, ResultRecord] = {}
        self.saved: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.results)

    def hold(self, result: ResultRecord, *, saved: bool = False) -> bool:
        """Keep ``result``; save it beside its claim unless that was done. True when it is saved."""
        task_id = result["task_id"]
        self.results[task_id] = result
        if saved:
            self.saved.add(task_id)
        if task_id not in self.saved:
            with contextlib.suppress(OSError):  # as full as the results: it stays in memory
                save_outcome(self.spool, self.worker, result)
                self.saved.add(task_id)
        return task_id in self.saved

    def flush(self) -> tuple[list[ResultRecord], tuple[ResultRecord, OSError] | None]:
        """Write what is held: the results written, and the first that failed with its error."""
        written: list[ResultRecord] = []
        for task_id, result in list(self.results.items()):
            try:
                finish_write(self.spool, self.worker, result)
            except OSError as exc:
                return written, (result, exc)
            del self.results[task_id]
            self.saved.discard(task_id)
            written.append(result)
        return written, None
