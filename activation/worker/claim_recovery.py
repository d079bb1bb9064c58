"""The executor's recovery at start: what a previous executor left in ``.processing/``.

Its saved outcomes are written (never run again); its other claims are settled once each: dropped
(a result exists), cancelled (a cancel came while no executor ran), back to the inbox with
``attempts + 1``, or to the dead letter once ``ACTIVATION_MAX_ATTEMPTS`` runs have started.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from activation.errors import StreamsError
from activation.observability.samples import WorkerMetrics
from activation.spool import cancel as cancels
from activation.spool import outcome as outcomes
from activation.spool import task as tasks
from activation.spool import tasklog
from activation.spool.atomic import remove_temp_files
from activation.spool.claims import DROPPED, GAVE_UP, settle_claim
from activation.spool.layout import Spool
from activation.worker.finishing import Finisher

if TYPE_CHECKING:
    from activation.worker.stream_feed import StreamFeed

# What the executor does with a spool error: log it, degrade, retry later (what, task_id, error).
SpoolTrouble = Callable[[str, str, Exception], None]


@dataclass(kw_only=True)
class ClaimRecovery:
    """Settles a previous executor's claims; one the spool cannot take yet stays in ``unsettled``."""

    spool: Spool
    worker: str
    max_attempts: int
    log: logging.Logger
    metrics: WorkerMetrics
    finisher: Finisher  # a saved outcome is written, or held, as a run's would be
    feed: StreamFeed | None
    beat: Callable[[], None]  # recovering many claims takes a while: the executor's beat goes on
    trouble: SpoolTrouble
    unsettled: set[str] = field(default_factory=set, init=False)  # claims recovery could not settle yet

    def recover(self) -> None:
        """Settle every claim a previous executor left in ``.processing/``.

        Finished ones (a result exists) are dropped. The others crashed their executor, or were
        running when it was killed: they go back to the inbox with ``attempts + 1``, or to the
        dead letter once ``ACTIVATION_MAX_ATTEMPTS`` runs have started.
        """
        # Writes a killed executor cut short: it is the only writer of both folders (and of outcomes).
        remove_temp_files(self.spool.processing(self.worker))
        remove_temp_files(self.spool.results(self.worker))
        held = self._settle_outcomes()
        # A held outcome is written, never run again.
        self.settle_claims([task_id for task_id in self.spool.claimed_ids(self.worker) if task_id not in held])
        tasklog.remove_stray_logs(self.spool, self.worker)
        cancels.remove_stale_requests(self.spool, self.worker)

    def settle_claims(self, task_ids: list[str]) -> None:
        """Recover each claim; one the spool cannot take yet (a full disk) is retried from the executor's loop."""
        for task_id in task_ids:
            self.beat()
            try:
                if self.feed is None or not self.feed.recover_claim(task_id):
                    self._recover_claim(task_id)
            except (OSError, StreamsError) as exc:
                self.unsettled.add(task_id)
                self.trouble("cannot recover the claim of", task_id, exc)
                continue
            self.unsettled.discard(task_id)

    def _settle_outcomes(self) -> set[str]:
        """Finish the result writes a previous executor could not; the ids still waiting for theirs."""
        held = self.finisher.held
        for task_id in outcomes.saved_outcomes(self.spool, self.worker):
            self.beat()
            saved = None if self.feed is None else self.feed.saved_outcome(task_id)
            if saved is not None:
                held.hold(saved, saved=True)  # completed on the stream first, then written
                continue
            try:
                tasklog.keep_log(self.spool, self.worker, task_id)  # before its result, as in a run
                result = outcomes.settle_outcome(self.spool, self.worker, task_id)
            except outcomes.UnwrittenOutcome as exc:
                self.finisher.hold(exc.result, exc.error, saved=True)
                continue
            if result is not None:
                self.log.info(
                    "recovery: wrote the saved result of %s; its agent did not run again",
                    task_id,
                    extra=self._extra(task_id),
                )
                self.finisher.finished(result)
        return set(held.results)

    def _recover_claim(self, task_id: str) -> None:
        if self._cancelled_while_away(task_id):
            return
        action = settle_claim(
            self.spool,
            self.worker,
            task_id,
            max_attempts=self.max_attempts,
            why="its executor stopped during the run",
        )
        if action is None:
            return
        if action.action == GAVE_UP:
            self.metrics.tasks_dead_lettered.labels(self.worker, tasks.MAX_ATTEMPTS).inc()
        level = logging.INFO if action.action == DROPPED else logging.WARNING
        self.log.log(level, "recovery: %s %s: %s", action.action, task_id, action.detail, extra=self._extra(task_id))

    def _cancelled_while_away(self, task_id: str) -> bool:
        """A claim whose cancel came while no executor ran is cancelled, not run again."""
        request = cancels.cancel_requested(self.spool, self.worker, task_id)
        if request is None or self.spool.has_result(self.worker, task_id):
            return False
        by = str(request.get("by") or "?")
        at = request.get("at") if isinstance(request.get("at"), str) else None
        cancels.settle_cancelled_claim(self.spool, self.worker, task_id, by=by, was="running", at=at)
        self.log.warning(
            "recovery: %s was cancelled (by %s) while its executor was down; it does not run again",
            task_id,
            by,
            extra=self._extra(task_id),
        )
        return True

    def _extra(self, task_id: str) -> dict[str, str]:
        return {"worker": self.worker, "task_id": task_id, "event": "recovered"}
