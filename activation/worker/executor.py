"""The executor program: takes task ids off the work queue and brings each task to exactly one result.

It owns the claim → run → result sequence, the recovery of ``.processing/`` at start, and the
drain on SIGTERM. Running the agent's process tree is agent.py's job; moves in the spool are
spool.py's. The spool decides: whatever dies, a task is in the inbox, claimed, done or dead.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import time
from collections.abc import Mapping
from typing import Any, Protocol

from activation.clock import iso_now
from activation.config import Settings
from activation.errors import BadTask, ConfigError, NotReady, QueueError
from activation.lifecycle import Program
from activation.observability.metrics import worker_metrics
from activation.spool import codec
from activation.spool import task as tasks
from activation.spool.atomic import remove_temp_files
from activation.spool.claims import DROPPED, GAVE_UP, settle_claim
from activation.spool.layout import Spool
from activation.worker.agent import (
    STRAY_MARKER,
    AgentRun,
    agent_environment,
    become_subreaper,
    build_argv,
    kill_strays,
    run_agent,
)

QUEUE_WAIT = 2.0  # one loop step: how long to wait on the queue before checking the stop flag (idle cost)
QUEUE_BACKOFF_MIN = 0.05
QUEUE_BACKOFF_MAX = 1.0
SPOOL_BACKOFF = 0.5  # after a failed result write or claim: give the disk a moment

DONE_TIMEOUT = 0.25  # connect and reply timeout of a done event: never stall the next task on it

COMPLETED, FAILED, TIMEOUT = "completed", "failed", "timeout"
EVENT_SOURCES = frozenset({"inotify", "redis"})  # wake-ups that arrive as the file appears


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

    def get(self, timeout: float) -> QueuedItem | None: ...
    def close(self) -> None: ...


def iso_from(epoch: float) -> str:
    """Epoch seconds as ISO 8601 UTC, the same shape as spool.iso_now()."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="microseconds")


def parse_envelope(stdout: str) -> dict[str, Any] | None:
    """Claude Code's ``--output-format json`` result envelope, when stdout is one."""
    text = stdout.strip()
    if not text.startswith("{") or not text.endswith("}"):
        return None
    try:
        # The result carries the envelope: lone surrogates become U+FFFD, as stdout's undecodable
        # bytes do; NaN, huge numbers or absurd nesting make it no envelope at all.
        envelope = codec.loads(text, surrogates="replace")
    except ValueError:
        return None
    if isinstance(envelope, dict) and envelope.get("type") == "result":
        return envelope
    return None


def result_status(run: AgentRun, envelope: dict[str, Any] | None, *, expects_envelope: bool = False) -> str:
    if run.timed_out:
        return TIMEOUT
    if run.exit_code != 0 or (envelope is not None and envelope.get("is_error") is True):
        return FAILED  # claude reports errors with rc 1, or rc 0 and is_error in JSON mode
    if expects_envelope and envelope is None and not run.truncated:
        return FAILED
    return COMPLETED


class DoneEvents:
    """PUBLISH ``done:<worker> <task_id>`` after each result, best effort.

    The result file is the truth; the event only wakes ``dispatch --wait`` sooner. So it goes
    through a RedisLink: an outage is logged once, Redis is left alone while it backs off, and a
    slow Redis never stalls the next task (DONE_TIMEOUT).
    """

    def __init__(self, url: str, worker: str, log: logging.Logger) -> None:
        # redis-py is loaded only when Redis is configured.
        from activation.transport.pubsub import done_channel
        from activation.transport.redis_link import RedisLink

        self.channel = done_channel(worker)
        self.link = RedisLink(
            url,
            log=log,
            what=f"PUBLISH {self.channel}",
            timeout=DONE_TIMEOUT,
            extra={"worker": worker},
            consequence="results are unaffected",
        )

    def announce(self, task_id: str) -> None:
        from activation.transport import pubsub

        self.link.run(lambda client: pubsub.publish(client, self.channel, task_id))

    def close(self) -> None:
        self.link.close()


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
            arg == "--output-format=json" or (arg == "--output-format" and nxt == "json")
            for arg, nxt in zip(probe, [*probe[1:], ""], strict=True)
        )
        workdir = settings.agent_workdir
        if workdir is not None and not workdir.is_dir():
            raise ConfigError(f"ACTIVATION_AGENT_WORKDIR: {workdir} is not a folder")
        self._cwd = str(workdir) if workdir is not None else None
        # The environment is read once, here at the process boundary; agent.py strips the secrets.
        self._environ = dict(os.environ if environ is None else environ)
        self._client: WorkQueueClient | None = None
        self._drain_deadline: float | None = None
        self._queue_down = False
        self._backoff = 0.0
        self._done = DoneEvents(settings.redis_url, self.worker, self.log) if settings.redis_url else None

    # -- lifecycle --------------------------------------------------------------------------

    def initialize(self) -> None:
        become_subreaper()
        self.spool.init([self.worker])
        killed = kill_strays(str(self.settings.run_dir), grace=self.settings.kill_grace)
        if killed:
            self.log.warning(
                "killed %d agent processes a previous executor left running: %s",
                len(killed),
                " ".join(map(str, killed)),
                extra={"worker": self.worker, "event": "strays_killed"},
            )
        self.recover()
        self.connect()

    def connect(self) -> None:
        """Create the queue client; it connects on its first get()."""
        from activation.worker.queue import QueueClient, load_authkey, socket_path

        run_dir = self.settings.run_dir
        self._client = QueueClient(socket_path(run_dir), load_authkey(run_dir))

    def loop(self) -> None:
        if self._client is None:
            self.connect()
        assert self._client is not None
        try:
            item = self._client.get(timeout=QUEUE_WAIT)
        except QueueError as exc:
            self._queue_unreachable(exc)
            return
        if self._queue_down:
            self.log.info("work queue reachable again", extra={"worker": self.worker, "event": "queue_up"})
            self._queue_down, self._backoff = False, 0.0
        if item is not None:
            self.process(item.task_id, source=item.source, seen_at=item.seen_at)

    def shutdown(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._done is not None:
            self._done.close()

    def request_stop(self, signum: int | None = None) -> None:
        """Take no new task; the running one may finish until the drain deadline (first signal only)."""
        if self._drain_deadline is None:
            self._drain_deadline = time.monotonic() + self.settings.drain_timeout
        self.stopping.set()

    def _past_drain(self) -> bool:
        deadline = self._drain_deadline
        return deadline is not None and time.monotonic() >= deadline

    def _queue_unreachable(self, exc: QueueError) -> None:
        # The listener is down or restarting: say so once per outage, not once per attempt.
        if not self._queue_down:
            self._queue_down = True
            self.log.warning(
                "work queue unreachable (%s); retrying until the listener is back",
                exc,
                extra={"worker": self.worker, "event": "queue_down"},
            )
        self._backoff = min(max(self._backoff * 2, QUEUE_BACKOFF_MIN), QUEUE_BACKOFF_MAX)
        self.stopping.wait(self._backoff)

    # -- recovery ---------------------------------------------------------------------------

    def recover(self) -> None:
        """Settle every claim a previous executor left in ``.processing/``.

        Finished ones (a result exists) are dropped. The others crashed their executor, or were
        running when it was killed: they go back to the inbox with ``attempts + 1``, or to the
        dead letter once ``ACTIVATION_MAX_ATTEMPTS`` runs have started.
        """
        # Writes a killed executor cut short: it is the only writer of both folders.
        remove_temp_files(self.spool.processing(self.worker))
        remove_temp_files(self.spool.results(self.worker))
        for task_id in self.spool.claimed_ids(self.worker):
            self._recover_claim(task_id)

    def _recover_claim(self, task_id: str) -> None:
        action = settle_claim(
            self.spool,
            self.worker,
            task_id,
            max_attempts=self.settings.max_attempts,
            why="its executor stopped during the run",
        )
        if action is None:
            return
        extra = {"worker": self.worker, "task_id": task_id, "event": "recovered"}
        if action.action == GAVE_UP:
            self.metrics.tasks_dead_lettered.labels(self.worker, tasks.MAX_ATTEMPTS).inc()
        level = logging.INFO if action.action == DROPPED else logging.WARNING
        self.log.log(level, "recovery: %s %s: %s", action.action, task_id, action.detail, extra=extra)

    # -- one task ---------------------------------------------------------------------------

    def process(self, task_id: str, source: str = "queue", seen_at: float = 0.0) -> dict[str, Any] | None:
        """Claim, run and finish one task; the result, or None when there was nothing to run.

        None means: someone else had it, it already had a result, it was bad (dead letter), it
        went back to the inbox (drain, or a spool that cannot take the result).
        """
        if self.stopping.is_set() or not tasks.is_valid_task_id(task_id):
            return None
        spool, worker = self.spool, self.worker
        try:
            visible_ns = self._visible_ns(task_id, source, seen_at)
            claim = spool.claim(worker, task_id)
        except FileNotFoundError:
            return None
        except OSError as exc:
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
            self._dead_letter(task_id, exc.reason, exc.detail, task=exc.task)
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

    def _run(self, task: dict[str, Any], visible_ns: int, source: str) -> dict[str, Any] | None:
        task_id: str = task["task_id"]
        attempts = int(task.get("attempts") or 0) + 1
        timeout = float(task.get("timeout") or self.settings.task_timeout)
        argv = build_argv(self.settings.agent_command, task["description"], task_id=task_id)
        env = agent_environment(self._environ, task_id, self.worker)
        env[STRAY_MARKER] = str(self.settings.run_dir)
        self.log.debug("task %s started (attempt %d)", task_id, attempts, extra=self._extra(task_id, "task_started"))
        try:
            run = run_agent(
                argv,
                env=env,
                timeout=timeout,
                kill_grace=self.settings.kill_grace,
                output_limit=self.settings.output_limit,
                should_abort=self._past_drain,
                cwd=self._cwd,
            )
        except OSError as exc:  # this process cannot spawn (no memory, no pids): not the task's fault
            self._put_back(task_id)
            self._spool_trouble("cannot start the agent for", task_id, exc)
            return None
        if run.aborted:
            # A drain is not the task's fault: back unchanged, same attempt count, no result.
            self._put_back(task_id)
            self.log.warning(
                "task %s killed at the drain deadline; back in the inbox",
                task_id,
                extra=self._extra(task_id, "drained"),
            )
            return None
        result = self._result(task, run, attempts, visible_ns, source)
        try:
            self.spool.write_result(self.worker, result)
        except OSError as exc:
            # No result on disk means the task must run again: hand the claim back by rename,
            # which needs no free space, and let the listener queue it again.
            self._put_back(task_id)
            self._spool_trouble("cannot write the result of", task_id, exc)
            return None
        if self._done is not None:
            self._done.announce(task_id)  # after the write: a waiter woken by it finds the result
        status = result["status"]
        labels = (self.worker, status)
        self.metrics.tasks_completed.labels(*labels).inc()
        self.metrics.task_processing_seconds.labels(*labels).observe(run.duration_s)
        if run.pid is not None:
            latency = max(result["activation_latency_ms"], 0.0) / 1000
            self.metrics.activation_latency_seconds.labels(self.worker, source).observe(latency)
        if run.timed_out:
            self.metrics.agent_timeouts.inc()
        self.log.info(
            "task %s %s (exit %s, %.3fs)",
            task_id,
            status,
            run.exit_code,
            run.duration_s,
            extra=self._extra(task_id, "task_finished"),
        )
        return result

    def _result(
        self, task: dict[str, Any], run: AgentRun, attempts: int, visible_ns: int, source: str
    ) -> dict[str, Any]:
        envelope = None if run.truncated else parse_envelope(run.stdout)
        return {
            "task_id": task["task_id"],
            "worker": self.worker,
            "status": result_status(run, envelope, expects_envelope=self._expects_envelope),
            "exit_code": run.exit_code,
            "signal": run.signal,
            "attempts": attempts,
            "description": task["description"],
            "created_at": task.get("created_at"),
            "started_at": iso_from(run.started_at_wall),
            "finished_at": iso_now(),
            "duration_s": round(run.duration_s, 6),
            "activation_latency_ms": round((run.started_at_wall * 1e9 - visible_ns) / 1e6, 3),
            "source": source,
            "stdout": run.stdout,
            "stderr": run.stderr,
            "stdout_bytes": run.stdout_bytes,
            "stderr_bytes": run.stderr_bytes,
            "truncated": run.truncated,
            "resources": {"cpu_seconds": run.cpu_seconds, "rss_peak_bytes": run.rss_peak_bytes},
            "agent": envelope,
            "metadata": task.get("metadata") or {},
        }

    # -- moves that keep the task safe ------------------------------------------------------

    def _put_back(self, task_id: str) -> None:
        """Return a claim to the inbox unchanged. If even that fails, the next start recovers it."""
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

    def _dead_letter(self, task_id: str, reason: str, detail: str, task: dict[str, Any] | None = None) -> None:
        claim = self.spool.claim_path(self.worker, task_id)
        self.spool.dead_letter(claim, reason=reason, detail=detail, worker=self.worker, task=task)
        self.metrics.tasks_dead_lettered.labels(self.worker, reason).inc()
        self.log.warning(
            "task %s sent to the dead letter: %s: %s",
            task_id,
            reason,
            detail,
            extra=self._extra(task_id, "dead_letter"),
        )

    def _spool_trouble(self, what: str, task_id: str, exc: OSError) -> None:
        self.log.error("%s %s: %s; retrying later", what, task_id, exc, extra=self._extra(task_id, "spool_error"))
        self.stopping.wait(SPOOL_BACKOFF)

    def _extra(self, task_id: str, event: str) -> dict[str, str]:
        return {"worker": self.worker, "task_id": task_id, "event": event}
