"""A finished run's durable result write, off the executor's path.

The result's write waits on the disk (two fsyncs, and ext4's journal for the temp file's create)
for about as long as the next task takes to be claimed and spawned; on this thread the two overlap.
The claim stays in ``.processing/`` until the result is durable (``Spool.write_result`` drops it
after), so a crash in between leaves a claim that claim recovery runs again, as a crash during the
run would: the window grows by one write, never by a lost result.

Results are written in the order their runs ended, at most MAX_PENDING waiting: the executor waits
for room, so a slow disk slows the runs instead of piling up unwritten results. A write the spool
refuses stops the writer. That result and every one behind it go back to the executor, which holds
them (finishing.py) as it holds one it failed to write itself; the writer takes no more until the
executor has written them all.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from activation.spool.records import ResultRecord

MAX_PENDING = 4  # results handed over and not yet durable; each is a run redone if the host dies now


class ResultWriter:
    """One thread that writes the results handed to it; ``write`` raises OSError when the spool refuses."""

    def __init__(self, write: Callable[[ResultRecord], None], log: logging.Logger) -> None:
        self._write = write
        self._log = log
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._queue: deque[ResultRecord] = deque()
        self._writing: ResultRecord | None = None
        self._failed: tuple[ResultRecord, OSError] | None = None  # the write that stopped the writer
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="result-writer", daemon=True)
        self._thread.start()

    # -- the executor's side -------------------------------------------------------------------

    def submit(self, result: ResultRecord) -> bool:
        """Hand a result over, waiting while MAX_PENDING wait; False (not taken) once a write failed."""
        with self._changed:
            while len(self._queue) + (self._writing is not None) >= MAX_PENDING and not self._failed:
                self._changed.wait()
            if self._failed or self._closed:
                return False
            self._queue.append(result)
            self._changed.notify_all()
            return True

    @property
    def failed(self) -> bool:
        """A write failed: ``take_back`` returns the results the executor must hold (read without the lock)."""
        return self._failed is not None

    def pending(self, task_id: str) -> bool:
        """Whether ``task_id``'s result is handed over and not written yet."""
        with self._lock:
            writing = self._writing is not None and self._writing["task_id"] == task_id
            return writing or any(result["task_id"] == task_id for result in self._queue)

    def wait_idle(self, deadline: float | None = None) -> bool:
        """Wait until every handed-over result is written or failed; False at ``deadline`` (monotonic)."""
        with self._changed:
            while self._queue or self._writing is not None:
                if self._failed and self._writing is None:
                    return True  # stopped: what is queued waits for take_back
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    def take_back(self) -> list[tuple[ResultRecord, OSError]]:
        """After a failure: the failed results and those queued behind them; the writer takes new ones again."""
        with self._changed:
            if self._failed is None or self._writing is not None:
                return []
            return self._give_back_locked(self._failed[1])

    def close(self, deadline: float | None = None) -> list[tuple[ResultRecord, OSError]]:
        """Stop taking results; wait for the queued ones until ``deadline``; return those not written.

        One that is being written at the deadline is not returned: it lands, or its claim stays for
        recovery.
        """
        self.wait_idle(deadline)
        with self._changed:
            self._closed = True
            error = (
                self._failed[1]
                if self._failed
                else OSError(errno.ETIMEDOUT, "the result writer did not finish in time")
            )
            back = self._give_back_locked(error)
        if deadline is None:
            self._thread.join()
        else:
            self._thread.join(max(deadline - time.monotonic(), 0.0))
        return back

    def _give_back_locked(self, error: OSError) -> list[tuple[ResultRecord, OSError]]:
        """The failed result and every queued one, each with the error to hold it under; the writer is clear again."""
        back = [self._failed] if self._failed is not None else []
        back += [(result, error) for result in self._queue]
        self._failed = None
        self._queue.clear()
        self._changed.notify_all()
        return back

    # -- the thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._queue or self._failed:
                    if self._closed:
                        return
                    self._changed.wait()
                result = self._writing = self._queue.popleft()
            failure: OSError | None = None
            try:
                self._write(result)
            except OSError as exc:
                failure = exc
            except Exception as exc:  # a bug must not kill the thread and strand the results behind it
                self._log.exception("writing the result of %s failed", result.get("task_id"))
                failure = OSError(errno.EIO, f"{type(exc).__name__}: {exc}")
            with self._changed:
                self._writing = None
                if failure is not None:
                    self._failed = (result, failure)
                self._changed.notify_all()
