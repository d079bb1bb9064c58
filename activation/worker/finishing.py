"""The end of a run: its result written, announced on ``done:<worker>``, counted and logged.

While the spool refuses the write, the run's outcome is held (saved beside its claim when the disk
lets us), the executor reports itself degraded, and only the write is retried: nothing runs the
agent again. In streams mode an outcome is completed on the stream first, then written locally.

In files mode the executor's loop hands the write to a thread (result_writer.py) so that the next
task starts meanwhile; what that thread cannot write comes back here and is held the same way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from activation.lifecycle import StopFlag
from activation.observability.samples import WorkerMetrics
from activation.spool import cancel as cancels
from activation.spool import outcome as outcomes
from activation.spool import tasklog
from activation.spool.layout import Spool
from activation.spool.records import ResultRecord
from activation.worker import liveness
from activation.worker.done_events import DoneEvents
from activation.worker.result_record import FAILED, TIMEOUT
from activation.worker.result_writer import ResultWriter

if TYPE_CHECKING:
    from activation.worker.stream_feed import StreamFeed

SPOOL_BACKOFF = 0.5  # at shutdown, between the last attempts to write a held result
RESULT_WRITE_FAILED = "result_write_failed"


@dataclass(kw_only=True)
class Finisher:
    """Brings a finished run's result to disk, or holds it until the spool takes it."""

    spool: Spool
    worker: str
    log: logging.Logger
    metrics: WorkerMetrics
    condition: liveness.Condition
    stopping: StopFlag
    wait: float  # the longest wait between beats
    done: DoneEvents | None
    feed: StreamFeed | None
    held: outcomes.HeldResults = field(init=False)  # finished runs, result not written yet
    writer: ResultWriter | None = field(init=False, default=None)  # started by the executor's loop

    def __post_init__(self) -> None:
        self.held = outcomes.HeldResults(self.spool, self.worker)

    def start_writer(self) -> None:
        """Write results on a thread from now on (the executor's program; its unit tests stay synchronous)."""
        if self.writer is None:
            self.writer = ResultWriter(self._write, self.log)

    def finish(self, result: ResultRecord, *, streamed: bool) -> ResultRecord | None:
        """Write a run's result (its log is kept already); None when it is held, or late on the stream.

        With the writer started, the result is handed to it and returned at once, not yet durable.
        """
        if streamed:
            cancels.clear_request(self.spool, self.worker, result["task_id"])
            return self._finish_streamed(result)
        self.collect()
        if self.writer is not None and not self.held and self.writer.submit(result):
            return result
        self.collect()  # submit refused: a write failed meanwhile, and what it refused goes first
        try:
            self._write(result)
        except OSError as exc:
            # The run is done and paid for: keep its outcome and retry only the write.
            self.hold(result, exc)
            return None
        return result

    def _write(self, result: ResultRecord) -> None:
        """The result durable and its claim gone, then announced (the writer thread's, or the caller's)."""
        outcomes.finish_write(self.spool, self.worker, result)
        cancels.clear_request(self.spool, self.worker, result["task_id"])  # one that came too late is harmless
        self.finished(result)

    def collect(self) -> None:
        """Hold what the writer thread could not write (a cheap check; the executor calls it each step)."""
        if self.writer is not None and self.writer.failed:
            for result, exc in self.writer.take_back():
                self.hold(result, exc)

    def writing(self, task_id: str) -> bool:
        return self.writer is not None and self.writer.pending(task_id)

    def settle(self, deadline: float | None = None) -> None:
        """Wait until the writer has written (or given back) everything handed to it."""
        if self.writer is not None:
            self.writer.wait_idle(deadline)
            self.collect()

    def finished(self, result: ResultRecord) -> None:
        """A result is on disk: announce it, count it, log it."""
        task_id, status = result["task_id"], result["status"]
        if self.done is not None:
            self.done.announce(task_id)  # after the write: a waiter woken by it finds the result
        labels = (self.worker, status)
        self.metrics.tasks_completed.labels(*labels).inc()
        self.metrics.task_processing_seconds.labels(*labels).observe(float(result.get("duration_s") or 0.0))
        latency = max(float(result.get("activation_latency_ms") or 0.0), 0.0) / 1000
        self.metrics.activation_latency_seconds.labels(self.worker, str(result.get("source"))).observe(latency)
        if status == TIMEOUT:
            self.metrics.agent_timeouts.inc()
        level = logging.WARNING if status in (FAILED, TIMEOUT) else logging.INFO  # failures stand out
        self.log.log(
            level,
            "task %s %s (exit %s, %.3fs)",
            task_id,
            status,
            result.get("exit_code"),
            float(result.get("duration_s") or 0.0),
            extra=self._extra(task_id, "task_finished"),
        )

    def hold(self, result: ResultRecord, exc: OSError, *, saved: bool = False) -> None:
        """Keep a finished run's result, saved beside its claim when the disk lets us, and degrade."""
        task_id = result["task_id"]
        kept = "saved beside its claim" if self.held.hold(result, saved=saved) else "kept in memory"
        error = exc.strerror or exc
        detail = f"cannot write the result of {task_id}: {error}; its outcome is {kept}, only the write is retried"
        self.condition.degrade(RESULT_WRITE_FAILED, detail, task_id=task_id)

    def retry_held(self) -> None:
        """One step of the executor's loop while results are held: wait out the backoff, or write."""
        trouble = self.condition.trouble
        if trouble is not None:
            remaining = trouble.retry_at - time.monotonic()
            if remaining > 0:
                self.stopping.wait(min(remaining, self.wait))
                return
        if self.write_held():
            self.condition.recovered()

    def write_held(self) -> bool:
        """Try to write every held result once; True when none is left."""
        if self.feed is not None and not self.feed.complete_held(self.held):
            self.stopping.wait(min(max(self.feed.pause_left(), 0.01), self.wait))
            return False
        for task_id in self.held.results:
            tasklog.keep_log(self.spool, self.worker, task_id)  # what the first try could not move
        written, failure = self.held.flush()
        for result in written:
            self.log.info(
                "wrote the held result of %s", result["task_id"], extra=self._extra(result["task_id"], "held")
            )
            self.finished(result)
        if failure is not None:
            self.hold(*failure)
        return failure is None

    def flush_held(self, deadline: float | None) -> None:
        """At shutdown: keep trying until the drain deadline; what is left stays claimed for recovery."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            for result, exc in writer.close(deadline):
                self.hold(result, exc)
        while self.held and not self.write_held():
            if deadline is None or time.monotonic() + SPOOL_BACKOFF >= deadline:
                break
            time.sleep(SPOOL_BACKOFF)
        for task_id in self.held.results:
            if task_id in self.held.saved:
                what = "its saved outcome is written when the executor starts again"
            else:
                what = "its outcome could not be saved either, so the task runs again (attempts + 1)"
            extra = self._extra(task_id, "held")
            self.log.error("exiting with the result of %s unwritten: %s", task_id, what, extra=extra)

    def _finish_streamed(self, result: ResultRecord) -> ResultRecord | None:
        """Hold the outcome (saved beside its claim), complete it on the stream, then write it locally.

        From the hold on, nothing runs the agent again: a crash, or Redis away, only delays the
        completion, which is retried until Redis confirms or refuses it (StreamFeed.complete_held).
        """
        assert self.feed is not None
        task_id = result["task_id"]
        self.held.hold(result)
        if not self.write_held() or task_id in self.held.results or self.feed.was_late(task_id):
            return None
        return result

    def _extra(self, task_id: str, event: str) -> dict[str, str]:
        return {"worker": self.worker, "task_id": task_id, "event": event}
