"""The executor program: takes task ids off the work queue and brings each task to exactly one result.

It owns the claim → run → result sequence, the drain on SIGTERM, and the two ways a worker
degrades without losing anything: no task can start (the task waits in the inbox) and a result
cannot be written (the run's outcome is held, only the write is retried: finishing.py). Settling
what a previous executor left in ``.processing/`` is claim_recovery.py's, running the agent's
process tree is agent.py's, telling whether it can start is spawn.py's, the liveness beat is
liveness.py's, moves in the spool are spool's. The spool decides: whatever dies, a task is in the
inbox, claimed, done or dead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from activation.config import Settings
from activation.errors import ActivationError, BadTask, NotReady, QueueError
from activation.lifecycle import Program, StopFlag
from activation.observability.samples import worker_metrics
from activation.spool import cancel as cancels
from activation.spool import task as tasks
from activation.spool import tasklog
from activation.spool.layout import Spool
from activation.spool.records import ResultRecord
from activation.transport.streams.lease import LeaseKeeper
from activation.worker import liveness
from activation.worker.agent import AgentRun, become_subreaper, run_agent
from activation.worker.agent_inputs import agent_environment, build_argv
from activation.worker.claim_recovery import ClaimRecovery
from activation.worker.containment import STRAY_MARKER, TaskCgroups, contain_agents, containment_id
from activation.worker.done_events import DoneEvents
from activation.worker.finishing import Finisher
from activation.worker.result_record import FAILED, build_result, note_kill
from activation.worker.spawn import CannotStart, plan_launch, preflight
from activation.worker.stream_answers import DEAD_LETTERED, IDLE_BLOCK, NOT_STREAMED, PUT_BACK
from activation.worker.supervision import check_drain_fits

if TYPE_CHECKING:
    from activation.worker.stream_feed import StreamFeed

QUEUE_BACKOFF_MIN = 0.05
QUEUE_BACKOFF_MAX = 1.0
QUEUE_OUTAGE_GRACE = 5.0  # seconds without the listener before it is worth a WARNING
QUEUE_RETRY_STARTING = 0.01  # seconds between attempts within that grace (the listener is starting)
SPOOL_ERROR = "spool_error"

# Wake-ups whose time is when the file appeared: an event's, or a stream entry's (written into the
# inbox a moment before it is processed; the ctime's coarse kernel clock would overstate it).
EVENT_SOURCES = frozenset({"inotify", "redis", "streams"})


class QueuedItem(Protocol):
    """What the work queue hands out (activation.worker.queue.QueuedTask)."""

    @property
    def task_id(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def seen_at(self) -> float: ...


class WorkQueueClient(Protocol):
    """The executor's side of the work queue (activation.worker.queue.QueueClient); tests pass a stub."""

    def get(self, timeout: float, interrupt: StopFlag | None = None) -> QueuedItem | None: ...
    def close(self) -> None: ...


def _stream_feed(settings: Settings, spool: Spool, log: logging.Logger, condition: liveness.Condition) -> StreamFeed:
    """The streams side, imported only in streams mode: redis (and asyncio) stay out of files mode."""
    from activation.worker.stream_feed import StreamFeed

    return StreamFeed(settings, spool, log, condition)


class Executor(Program):
    """One task at a time: claim by rename, run the agent, write the result, drop the claim."""

    name = "executor"

    def __init__(self, settings: Settings, *, environ: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.settings = settings
        self.worker = settings.require_worker()
        self.spool = Spool(settings.spool)
        self.metrics = worker_metrics()
        probe = build_argv(settings.agent_command, "probe")  # a template that cannot be split fails now
        # In JSON mode Claude Code always prints an envelope; exit 0 without one is a failed run
        # (it happens when claude is interrupted right after its first request).
        self._expects_envelope = any(
            arg in ("--output-format=json", "--output-format=stream-json")
            or (arg == "--output-format" and nxt in ("json", "stream-json"))
            for arg, nxt in zip(probe, [*probe[1:], ""], strict=True)
        )
        self._program = probe[0]
        workdir = settings.agent_workdir  # a missing one is a degraded worker (preflight), not a crash loop
        self._cwd = str(workdir) if workdir is not None else None
        # The environment the settings were read from; agent_inputs.py strips the secrets.
        self._environ = dict(settings.environ if environ is None else environ)
        self._client: WorkQueueClient | None = None
        self._drain_deadline: float | None = None
        self._queue_down = False  # an outage longer than QUEUE_OUTAGE_GRACE, said in the log
        self._queue_down_since: float | None = None
        self._backoff = 0.0
        self._done = DoneEvents(settings.redis_url, self.worker, self.log) if settings.redis_url else None
        # Names this executor's agents (their cgroup, their marker) without naming the run folder.
        self._containment_id = containment_id(self.worker, settings.run_dir)
        self._cgroups: TaskCgroups | None = None
        self._queue_wait = liveness.beat_period(settings.heartbeat_interval)
        self.pulse = liveness.ExecutorBeat(settings.run_dir, self._queue_wait)
        self.condition = liveness.Condition(self.pulse, self.log, self.worker)
        self._cancel: dict[str, Any] | None = None  # the cancel request of the running task, once seen
        self._streamed_run = False  # the running task came from the stream (a cancel may come that way)
        # ACTIVATION_TRANSPORT=streams: this executor is its replica's consumer of the task stream.
        self._feed = (
            _stream_feed(settings, self.spool, self.log, self.condition) if settings.transport == "streams" else None
        )
        self._finisher = Finisher(
            spool=self.spool,
            worker=self.worker,
            log=self.log,
            metrics=self.metrics,
            condition=self.condition,
            stopping=self.stopping,
            wait=self._queue_wait,
            done=self._done,
            feed=self._feed,
        )
        self._recovery = ClaimRecovery(
            spool=self.spool,
            worker=self.worker,
            max_attempts=settings.max_attempts,
            log=self.log,
            metrics=self.metrics,
            finisher=self._finisher,
            feed=self._feed,
            beat=self.pulse.beat,
            trouble=self._spool_trouble,
        )

    # -- lifecycle --------------------------------------------------------------------------

    def initialize(self) -> None:
        self.pulse.set_state(liveness.OK)
        # supervisord must not SIGKILL us before the drain and the kill grace are over.
        check_drain_fits(self.settings.run_dir, self.name, self.settings.drain_timeout, self.settings.kill_grace)
        become_subreaper()
        damaged = self.spool.try_init([self.worker])  # health names it; the executor still settles what it can
        if damaged is not None:
            self.condition.degrade(SPOOL_ERROR, damaged)
        self._cgroups, how, killed = contain_agents(
            self.settings.containment, self._containment_id, self.settings.run_dir, grace=self.settings.kill_grace
        )
        self.log.info("agent containment: %s", how, extra={"worker": self.worker, "event": "containment"})
        if killed:
            self.log.warning(
                "killed %d agent processes a previous executor left running: %s",
                len(killed),
                " ".join(map(str, killed)),
                extra={"worker": self.worker, "event": "strays_killed"},
            )
        self.pulse.beat()
        self.recover()
        if self._feed is None:
            self._finisher.start_writer()  # results written while the next task starts (files transport)
        self.connect()
        self._idle_check()

    def connect(self) -> None:
        """Create the queue client; it connects on its first get()."""
        from activation.worker.queue import QueueClient, load_authkey, socket_path

        run_dir = self.settings.run_dir
        self._client = QueueClient(socket_path(run_dir), load_authkey(run_dir, self.settings.queue_key))

    def loop(self) -> None:
        self.pulse.beat()
        self._finisher.collect()
        if self._finisher.held:
            self._finisher.retry_held()
            return
        unsettled = self._recovery.unsettled
        if unsettled:
            if self.condition.trouble is None or self.condition.trouble.retry_at <= time.monotonic():
                self._finisher.settle()  # recovery writes results too: never beside the writer thread
                self._recovery.settle_claims(sorted(unsettled))
            if unsettled:
                self.stopping.wait(self._queue_wait)
                return
        if self.condition.trouble is not None and not self._trouble_over():
            return
        if self._feed is not None:
            self._streams_step(self._feed)
            return
        if self._client is None:
            self.connect()
        assert self._client is not None
        try:
            item = self._client.get(timeout=self._queue_wait, interrupt=self.stopping)
        except QueueError as exc:
            self._queue_unreachable(exc)
            return
        self._queue_reachable()
        if item is not None:
            self.process(item.task_id, source=item.source, seen_at=item.seen_at)
        else:
            self._idle_check()

    def shutdown(self) -> None:
        self._finisher.flush_held(self._drain_deadline)
        if self._feed is not None:
            self._feed.give_back_inbox()
            self._feed.close()
        if self._cgroups is not None:
            self._cgroups.close()
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._done is not None:
            self._done.close()
        self.pulse.close()

    def request_stop(self, signum: int | None = None) -> None:
        """Take no new task; the running one may finish until the drain deadline (first signal only)."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.settings.drain_timeout
        self.stopping.set()

    def _past_drain(self) -> bool:
        deadline = self._drain_deadline
        return deadline is not None and time.monotonic() >= deadline

    def _queue_reachable(self) -> None:
        if self._queue_down_since is not None:
            if self._queue_down:
                self.log.info("work queue reachable again", extra={"worker": self.worker, "event": "queue_up"})
            self._queue_down, self._queue_down_since, self._backoff = False, None, 0.0

    def _queue_unreachable(self, exc: QueueError) -> None:
        # The listener is down or restarting: say so once per outage, not once per attempt, and
        # only once it outlasts a listener's normal start or stop (the executor starts first and
        # stops last, so every start and stop has a short outage of this kind).
        now = time.monotonic()
        if self._queue_down_since is None:
            self._queue_down_since = now
        if not self._queue_down and now - self._queue_down_since >= QUEUE_OUTAGE_GRACE:
            self._queue_down = True
            self.log.warning(
                "work queue unreachable for %.0f s (%s); retrying until the listener is back",
                now - self._queue_down_since,
                exc,
                extra={"worker": self.worker, "event": "queue_down"},
            )
        if now - self._queue_down_since < QUEUE_OUTAGE_GRACE:
            # A listener starting (the tree's start, a restart) serves within moments: a
            # backoff grown meanwhile would sit on the first task's path. A connect attempt to a
            # Unix socket costs a few microseconds, so look often until the grace is over.
            self._backoff = QUEUE_RETRY_STARTING
        else:
            self._backoff = min(max(self._backoff * 2, QUEUE_BACKOFF_MIN), QUEUE_BACKOFF_MAX)
        self.stopping.wait(self._backoff)

    # -- recovery (claim_recovery.py) --------------------------------------------------------

    def recover(self) -> None:
        """Settle every claim a previous executor left in ``.processing/`` (claim_recovery.py)."""
        self._recovery.recover()

    # -- one task ---------------------------------------------------------------------------

    def process(self, task_id: str, source: str = "queue", seen_at: float = 0.0) -> ResultRecord | None:
        """Claim, run and finish one task; the result, or None when there is none (yet).

        None means: someone else had it, it already had a result, it was bad (dead letter), it
        went back to the inbox (drain, or no task can start), or it ran and its result is held
        until the spool takes it.
        """
        if self.stopping.is_set() or not tasks.is_valid_task_id(task_id):
            return None
        spool, worker = self.spool, self.worker
        if self._finisher.writing(task_id):  # dispatched again while its result is on its way to disk
            self._finisher.settle()
        try:
            visible_ns = self._visible_ns(task_id, source, seen_at)
            claim = self._claim(task_id)
        except FileNotFoundError:
            return None
        except (OSError, ActivationError) as exc:
            self._spool_trouble("cannot claim", task_id, exc)
            return None
        if claim is None:
            return None
        if os.path.exists(spool.result_path(worker, task_id)):  # a re-dispatch of a finished id
            with contextlib.suppress(FileNotFoundError):
                os.unlink(claim)
            self.log.info("%s already has a result; dropped the new copy", task_id, extra=self._extra(task_id, "dup"))
            return None
        try:
            task = tasks.load_task(claim, max_timeout=self.settings.max_task_timeout)
        except BadTask as exc:
            if not self._dead_letter(task_id, exc.reason, exc.detail, task=exc.task):
                self._put_back(task_id)
            return None
        except NotReady:
            self._put_back(task_id)  # still being written: the listener queues it again when done
            return None
        except OSError as exc:
            self._put_back(task_id)
            self._spool_trouble("cannot read", task_id, exc)
            return None
        if self.stopping.is_set():
            self._put_back(task_id)
            return None
        return self._run(task, visible_ns, source)

    def _claim(self, task_id: str) -> Path | None:
        """Claim by rename. A task still in the inbox after a failed rename means .processing/ is gone."""
        claim = self.spool.claim(self.worker, task_id)
        if claim is None and os.path.lexists(self.spool.task_path(self.worker, task_id)):
            self.log.warning("%s is gone; recreating the spool layout", self.spool.processing(self.worker))
            self.spool.init([self.worker])
            claim = self.spool.claim(self.worker, task_id)
        return claim

    def _visible_ns(self, task_id: str, source: str, seen_at: float) -> int:
        """When the task became visible, as well as it can be known.

        An event source saw it within microseconds of the rename: its time is exact. A scan saw
        it up to an interval late, so the file's ctime (set by the rename; our claim resets it)
        is nearer, though the kernel may stamp it with a clock that lags by up to a tick.
        """
        ctime_ns = os.lstat(self.spool.task_path(self.worker, task_id)).st_ctime_ns
        if seen_at and source in EVENT_SOURCES:
            return int(seen_at * 1e9)
        return ctime_ns

    def _run(self, task: dict[str, Any], visible_ns: int, source: str) -> ResultRecord | None:
        task_id: str = task["task_id"]
        attempts = int(task.get("attempts") or 0) + 1
        timeout = float(task.get("timeout") or self.settings.task_timeout)
        env = agent_environment(self._environ, task_id, self.worker, attempt=attempts)
        env[STRAY_MARKER] = self._containment_id
        hold = NOT_STREAMED if self._feed is None else self._feed.hold(task)
        if hold == PUT_BACK:  # not to run here now: another replica's turn, or Redis is away
            self._put_back(task_id)
        if isinstance(hold, str) and hold != NOT_STREAMED:
            return None
        lease = hold if isinstance(hold, LeaseKeeper) else None  # None: a task that never was on the stream
        # Each supervision tick: a lost lease, a cancel request, the drain deadline.
        should_abort: Callable[[], bool] = (
            (lambda: self._should_abort(task_id))
            if lease is None
            else (lambda: lease.should_abort() or self._should_abort(task_id))
        )
        self.log.debug("task %s started (attempt %d)", task_id, attempts, extra=self._extra(task_id, "task_started"))
        self._cancel = None
        self._streamed_run = lease is not None
        output = tasklog.open_log(self.spool, self.worker, task_id)
        if lease is not None:
            assert self._feed is not None
            self._feed.start_log(task, output.path)  # a copy for `activation logs` on other hosts
        try:
            launch = plan_launch(self.settings.agent_command, task["description"], env, task_id=task_id)
            run = run_agent(
                launch.argv,
                env=env,
                timeout=timeout,
                kill_grace=self.settings.kill_grace,
                output_limit=self.settings.output_limit,
                should_abort=should_abort,
                on_tick=self._tick,
                cwd=self._cwd,
                cgroups=self._cgroups,
                stdin_data=launch.stdin,
                on_output=output.write if output.open else None,
            )
        except CannotStart as exc:
            self._cannot_start(task, exc)
            return None
        except OSError as exc:  # the run's own plumbing (pipes, pidfd): not the task's fault
            self._put_back(task_id)
            self._spool_trouble("cannot run the agent for", task_id, exc)
            return None
        finally:
            output.close()
            if lease is not None:
                assert self._feed is not None
                self._feed.end_log()
        if not self._finisher.held:  # a result held meanwhile keeps the executor degraded
            self.condition.started()
        if run.aborted and self._feed is not None and lease is not None and lease.lost is not None:
            self._feed.drop_local(task_id)  # the keeper logged why; submit nothing, keep nothing
            return None
        if run.aborted and self._cancel is None:
            # A drain is not the task's fault: back unchanged, same attempt count, no result.
            self._put_back(task_id)
            self.log.warning(
                "task %s killed at the drain deadline; back in the inbox",
                task_id,
                extra=self._extra(task_id, "drained"),
            )
            return None
        result = self._result(task, run, attempts, visible_ns, source)
        self._note_kill(result, run, timeout)
        failed = result["status"] == FAILED
        self.condition.note_run(failed, run.duration_s, run.exit_code, run.stderr.strip() or run.stdout.strip())
        tasklog.keep_log(self.spool, self.worker, task_id)  # before the result: a reader of it finds the whole log
        return self._finisher.finish(result, streamed=lease is not None)

    def _tick(self) -> None:
        """Each supervision tick of a run: beat, and report at once a result the writer could not write."""
        self.pulse.beat()
        self._finisher.collect()

    # -- stopping one run: the drain deadline, or an operator's cancel ----------------------

    def _should_abort(self, task_id: str) -> bool:
        """run_agent's abort check, each supervision tick: past the drain, or asked to cancel (one stat)."""
        if self._cancel is None:
            self._cancel = cancels.cancel_requested(self.spool, self.worker, task_id)
            if self._cancel is None and self._streamed_run:
                assert self._feed is not None
                self._cancel = self._feed.cancel_request(task_id)  # streams: the orchestrator's, via Redis
                self._feed.ship_log()
            if self._cancel is not None:
                self.log.warning(
                    "task %s: cancel requested by %s; killing its tree",
                    task_id,
                    self._cancel.get("by", "?"),
                    extra=self._extra(task_id, "task_cancelling"),
                )
        return self._cancel is not None or self._past_drain()

    def _note_kill(self, result: ResultRecord, run: AgentRun, timeout: float) -> None:
        note_kill(
            result,
            run,
            timeout=timeout,
            kill_grace=self.settings.kill_grace,
            output_limit=self.settings.output_limit,
            cancel=self._cancel,
        )

    def _result(self, task: dict[str, Any], run: AgentRun, attempts: int, visible_ns: int, source: str) -> ResultRecord:
        return build_result(
            task,
            run,
            worker=self.worker,
            attempts=attempts,
            visible_ns=visible_ns,
            source=source,
            expects_envelope=self._expects_envelope,
        )

    # -- when the agent cannot start (a result that cannot be written: finishing.py) ---------

    def _cannot_start(self, task: dict[str, Any], exc: CannotStart) -> None:
        """This task cannot start: a terminal dead letter. No task can: back in the inbox, degraded."""
        task_id = task["task_id"]
        if not exc.whole_worker:
            if not self._dead_letter(task_id, exc.reason, exc.detail, task=task):
                self._put_back(task_id)
            return
        self._put_back(task_id)  # it never ran: same attempt count
        static = self._preflight() is not None
        self.condition.degrade(exc.reason, f"{exc.detail}; tasks wait in the inbox", static=static, task_id=task_id)

    def _preflight(self) -> CannotStart | None:
        return preflight(self._program, self._environ, self._cwd)

    def _idle_check(self) -> None:
        """With nothing to do, look whether a task could start (a few stat calls per beat)."""
        problem = self._preflight()
        if problem is not None:
            self.condition.degrade(problem.reason, f"{problem.detail}; tasks wait in the inbox", static=True)
        elif self.condition.trouble is not None and self.condition.trouble.static:
            self.condition.recovered()

    def _trouble_over(self) -> bool:
        """While troubled: wait (beating), re-check; True when it is time to try a task again."""
        trouble = self.condition.trouble
        assert trouble is not None
        if not trouble.static:
            remaining = trouble.retry_at - time.monotonic()
            if remaining > 0:
                self.stopping.wait(min(remaining, self._queue_wait))
                return False
        problem = self._preflight()
        if problem is None:
            if trouble.static:
                self.condition.recovered()
            return True
        self.condition.degrade(problem.reason, f"{problem.detail}; tasks wait in the inbox", static=True)
        self.stopping.wait(self._queue_wait)
        return False

    # -- moves that keep the task safe ------------------------------------------------------

    def _put_back(self, task_id: str) -> None:
        """Return a claim to the inbox unchanged. If even that fails, the next start recovers it."""
        if self._feed is not None and self._feed.give_back(task_id):
            return
        try:
            self.spool.requeue(self.worker, task_id)
        except FileNotFoundError:
            pass
        except OSError as exc:
            self.log.error(
                "cannot put %s back in the inbox (%s); it stays claimed until the executor restarts",
                task_id,
                exc,
                extra=self._extra(task_id, "put_back_failed"),
            )

    def _dead_letter(self, task_id: str, reason: str, detail: str, task: dict[str, Any] | None = None) -> bool:
        """Move the claim to the dead letter; False (and degraded) when the spool refuses."""
        if self._feed is not None:
            verdict = self._feed.dead_letter_claim(task_id, reason, detail)
            if verdict != NOT_STREAMED:
                if verdict == DEAD_LETTERED:
                    self.metrics.tasks_dead_lettered.labels(self.worker, reason).inc()
                return verdict is not None
        claim = self.spool.claim_path(self.worker, task_id)
        try:
            self.spool.dead_letter(claim, reason=reason, detail=detail, worker=self.worker, task=task)
        except OSError as exc:
            self._spool_trouble("cannot dead-letter", task_id, exc)
            return False
        self.metrics.tasks_dead_lettered.labels(self.worker, reason).inc()
        self.log.warning(
            "task %s sent to the dead letter: %s: %s",
            task_id,
            reason,
            detail,
            extra=self._extra(task_id, "dead_letter"),
        )
        return True

    def _spool_trouble(self, what: str, task_id: str, exc: Exception) -> None:
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        self.log.error("%s %s: %s; retrying later", what, task_id, text, extra=self._extra(task_id, "spool_error"))
        self.condition.degrade(SPOOL_ERROR, f"{what} {task_id}: {text}", task_id=task_id)

    def _extra(self, task_id: str, event: str) -> dict[str, str]:
        return {"worker": self.worker, "task_id": task_id, "event": event}

    # -- the streams transport (stream_feed.py): this executor is its replica's consumer ------

    def _streams_step(self, feed: StreamFeed) -> None:
        """One free step: a task from the local inbox first (put back, or written by hand), else one entry.

        No prefetch: an entry is taken only now, with no task running, because its lease clock
        starts at delivery. The short block on the stream is the idle executor's SIGTERM notice.
        """
        if not feed.ready():  # Redis is away: wait out the pause (beating), never spin on it
            self.stopping.wait(min(max(feed.pause_left(), 0.01), self._queue_wait))
            return
        if self._client is None:
            self.connect()
        assert self._client is not None
        try:
            item = self._client.get(timeout=0)
        except QueueError as exc:
            self._queue_unreachable(exc)  # the listener restarts; the stream can still be served
            item = None
        else:
            self._queue_reachable()
        if item is not None:
            self.process(item.task_id, source=item.source, seen_at=item.seen_at)
            return
        try:
            delivery = feed.take(IDLE_BLOCK)
        except OSError as exc:  # the entry was handed back; the spool's trouble is reported
            self._spool_trouble("cannot write a task from the stream into", self.spool.inbox(self.worker).name, exc)
            return
        if delivery is None:
            self._idle_check()
        elif self.stopping.is_set():
            feed.give_back(delivery.task_id, claimed=False)
        elif self.spool.has_result(self.worker, delivery.task_id):
            feed.complete_again(delivery)  # sent again (after Redis lost it): the run is done, only its record goes
        else:
            self.process(delivery.task_id, source="streams", seen_at=time.time())
