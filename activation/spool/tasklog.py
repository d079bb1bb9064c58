"""The per-task agent log: the agent's output as it arrives, for `activation logs TASK_ID [-f]`.

While the task runs the log is ``tasks/<worker>/.processing/<task_id>.log``, beside the claim; when
it ends the executor moves it beside the result, ``results/<worker>/<task_id>.log``, before it writes
the result, so a reader that sees the result knows the log is complete. Retention deletes it with its
result. It is an extra sink: the result's own capture (agent.py's ``output_limit``) is unchanged.

Lines are written whole, each stream buffering its own partial line, so that stdout's JSON events and
stderr's text never interleave inside a line; a line longer than LINE_LIMIT is written in pieces. The
log stops at TASK_LOG_LIMIT bytes with one marker line, so a flood cannot fill the disk; a log that
cannot be written (a full disk) is given up, logged once, and never fails the task.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

from activation.spool.layout import Spool
from activation.spool.task import TASK_SUFFIX

log = logging.getLogger("activation.executor")

LOG_SUFFIX = ".log"
TASK_LOG_LIMIT = 16 * 1024 * 1024  # bytes per task log; past it one marker line, then nothing
LINE_LIMIT = 64 * 1024  # a partial line longer than this is written as it is
LIMIT_MARKER = b"\n[activation: this log stopped at its limit of %d bytes; the agent went on writing]\n"


def running_log_path(spool: Spool, worker: str, task_id: str) -> Path:
    return spool.processing(worker) / f"{task_id}{LOG_SUFFIX}"


def finished_log_path(spool: Spool, worker: str, task_id: str) -> Path:
    return spool.results(worker) / f"{task_id}{LOG_SUFFIX}"


def log_of_result(result_path: Path) -> Path:
    """The log kept beside a result file."""
    return result_path.with_name(result_path.name.removesuffix(TASK_SUFFIX) + LOG_SUFFIX)


class TaskLog:
    """One run's log file, written as the output arrives; ``write`` is agent.py's ``on_output``.

    The file is made at the first byte of output: a run that prints nothing costs no file (and
    the task's activation no create on its way to the agent's start).
    """

    def __init__(self, path: Path, *, limit: int = TASK_LOG_LIMIT, task_id: str = "") -> None:
        self.path = path
        self.limit = limit
        self.task_id = task_id
        self.written = 0
        self._pending = (bytearray(), bytearray())
        self._fd: int | None = None
        self._done = False  # closed, full, or given up: nothing more is written
        # A new file, never the old one truncated: a follower of an earlier attempt sees the inode change.
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self._give_up(exc)

    @property
    def open(self) -> bool:
        """Whether output written now still reaches the log."""
        return not self._done

    def write(self, stream: int, chunk: bytes) -> None:
        """Take a chunk of stream 0 (stdout) or 1 (stderr); write every whole line it completes."""
        if self._done:
            return
        pending = self._pending[stream]
        pending += chunk
        end = pending.rfind(b"\n") + 1
        if end == 0 and len(pending) > LINE_LIMIT:
            end = len(pending)
        if end:
            self._emit(bytes(pending[:end]))
            del pending[:end]

    def close(self) -> None:
        """Write what is left of each stream's last line, and close."""
        for pending in self._pending:
            if pending and not self._done:
                self._emit(bytes(pending) + (b"" if pending.endswith(b"\n") else b"\n"))
        self._shut()

    def _shut(self) -> None:
        self._done = True
        for pending in self._pending:
            pending.clear()
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _emit(self, data: bytes) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                self._give_up(exc)
                return
        room = self.limit - self.written
        full = len(data) > room
        if full:
            data = data[: max(room, 0)] + LIMIT_MARKER % self.limit
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self._give_up(exc)
            return
        self.written += len(data)
        if full:
            self._shut()

    def _give_up(self, exc: OSError) -> None:
        log.warning(
            "task %s: cannot write its log %s (%s); the task runs on without it",
            self.task_id,
            self.path,
            exc.strerror or exc,
            extra={"task_id": self.task_id, "event": "task_log_failed"},
        )
        self._shut()


def open_log(spool: Spool, worker: str, task_id: str) -> TaskLog:
    return TaskLog(running_log_path(spool, worker, task_id), task_id=task_id)


def keep_log(spool: Spool, worker: str, task_id: str) -> bool:
    """Move a finished run's log beside its result (before the result is written); False when
    the results folder refuses it (full, read-only, not a folder): the log then stays beside the
    claim, and the executor tries again when it writes the held result. Never raises."""
    try:
        os.rename(running_log_path(spool, worker, task_id), finished_log_path(spool, worker, task_id))
    except FileNotFoundError:
        return True  # no log (a run that printed nothing), or kept already
    except OSError as exc:
        log.warning(
            "task %s: cannot keep its log beside the result yet (%s)",
            task_id,
            exc.strerror or exc,
            extra={"task_id": task_id, "event": "task_log_failed"},
        )
        return False
    return True


def remove_stray_logs(spool: Spool, worker: str) -> int:
    """At the executor's start: drop logs in ``.processing/`` whose claim is gone (requeued, dead)."""
    return spool.remove_unclaimed(worker, LOG_SUFFIX)


def find_log(spool: Spool, worker: str, task_id: str) -> Path | None:
    """The task's log: the finished one if there is one, else the running one, else None."""
    for path in (finished_log_path(spool, worker, task_id), running_log_path(spool, worker, task_id)):
        if path.exists():
            return path
    return None
