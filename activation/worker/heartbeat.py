"""The heartbeat program: the worker's last sign of life, and its metrics endpoint.

Every interval it writes ``heartbeats/<worker>.json`` atomically, with the state of its sibling
programs (from the states file supervisord writes on each change, or else over its XML-RPC
socket) and the listener's own report (over the work queue's socket). It serves the whole
worker's Prometheus metrics (observability/metrics.py reads every program's samples file at each
scrape). In streams mode it also publishes the same record as this replica's heartbeat in Redis
(replica_beat.py).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from activation import __version__
from activation.clock import iso_now
from activation.config import Settings
from activation.errors import QueueError
from activation.lifecycle import Program
from activation.observability.samples import merged, metrics_folder, worker_metrics
from activation.spool.atomic import TEMP_PREFIX, atomic_write_json, remove_temp_files
from activation.spool.layout import Spool
from activation.spool.records import HeartbeatRecord
from activation.worker import liveness
from activation.worker.supervision import (
    SUPERVISOR_SOCKET,
    program_infos,
    program_states,
    supervisor_socket,
    supervisor_state,
    told_program_infos,
)

# supervisord's RPC lives in supervision.py (the executor reads it too); the old names stay here.
__all__ = ["SUPERVISOR_SOCKET", "Heartbeat", "program_states", "supervisor_socket"]

SETTLING_INTERVAL = 1.0  # seconds between beats while a sibling program is not RUNNING
METRICS_RETRY = 5.0  # seconds between attempts to bind a metrics port that was taken


if TYPE_CHECKING:
    from activation.observability.metrics import MetricsServer
    from activation.worker.replica_beat import ReplicaBeat


def _replica_beat(settings: Settings, log: logging.Logger) -> ReplicaBeat:
    """The replica's state in Redis, imported only in streams mode (redis stays out of files mode)."""
    from activation.worker.replica_beat import ReplicaBeat

    return ReplicaBeat(settings, log)


class Heartbeat(Program):
    name = "heartbeat"

    def __init__(self, settings: Settings) -> None:
        super().__init__()
        self.settings = settings
        self.worker = settings.require_worker()
        self.spool = Spool(settings.spool)
        self.path = self.spool.heartbeat_path(self.worker)
        self.metrics = worker_metrics()
        self.started_at = iso_now()
        self._server: MetricsServer | None = None
        self._queue_client: Any = None
        self._redis: Any = None  # a RedisLink, made on the first beat when REDIS_URL is set
        self._metrics_error: str | None = None
        self._metrics_retry_at = 0.0
        self._executor_info = liveness.ExecutorInfo()
        # ACTIVATION_TRANSPORT=streams: one heartbeat per replica in Redis, and the consumer pruning.
        self._replica = _replica_beat(settings, self.log) if settings.transport == "streams" else None

    def initialize(self) -> None:
        damaged = self.spool.try_init([self.worker])
        if damaged is not None:  # `check` names the broken folder; this program still does its job
            self.log.error("%s", damaged, extra={"worker": self.worker, "event": "spool_error"})
        # A heartbeat SIGKILLed mid-write leaves its temp file; it is the file's only writer.
        remove_temp_files(self.spool.heartbeats_dir, f"{TEMP_PREFIX}{self.path.name}.")
        self._serve_metrics()
        self.metrics.worker_up.set(1)

    def _serve_metrics(self) -> None:
        """Bind the metrics port; a port that is taken is a reported problem, retried, never a crash."""
        if not self.settings.metrics_port or self._server is not None or time.monotonic() < self._metrics_retry_at:
            return
        from activation.observability.metrics import MetricsServer, exposition

        port = self.settings.metrics_port
        body = exposition(metrics_folder(self.settings.run_dir), own=self.metrics.store)
        try:
            self._server = MetricsServer(port, body)
        except OSError as exc:
            error = f"cannot serve metrics on :{port}: {exc.strerror or exc}"
            if error != self._metrics_error:
                self.log.error(
                    "%s; set ACTIVATION_METRICS_PORT to move it; the worker runs on, retrying every %gs",
                    error,
                    METRICS_RETRY,
                    extra={"event": "metrics_down"},
                )
            self._metrics_error = error
            self._metrics_retry_at = time.monotonic() + METRICS_RETRY
            return
        self._metrics_error = None
        self.log.info("serving metrics on :%s", port, extra={"event": "metrics_up"})

    def loop(self) -> None:
        interval = self.settings.heartbeat_interval
        self._serve_metrics()
        try:
            report = self.beat()
            programs = report.get("programs") or {}
            listener = report.get("listener") or {}
            if set(programs.values()) - {"RUNNING"} or listener.get("reachable") is False:
                # A sibling is starting, restarting or not serving yet: say when it runs, not an
                # interval later.
                interval = min(interval, SETTLING_INTERVAL)
        except OSError as exc:  # a full or unwritable spool must not kill the heartbeat
            self.log.error("cannot write heartbeat %s: %s", self.path, exc, extra={"event": "heartbeat_failed"})
        self.stopping.wait(interval)

    def shutdown(self) -> None:
        self.metrics.worker_up.set(0)
        last_word = self._last_word()
        with contextlib.suppress(OSError):
            self.beat(state=last_word)
        if self._replica is not None:
            self._replica.close(leave=last_word == "stopped")
        if self._queue_client is not None:
            self._queue_client.close()
        if self._redis is not None:
            self._redis.close()
        if self._server is not None:
            self._server.close()

    def beat(self, state: str = "running") -> HeartbeatRecord:
        report = self.report(state)
        if self._replica is not None:
            report["redis"] = self._replica.publish(report)
        else:
            report["redis"] = self._publish(report) if self.settings.redis_url else None
        atomic_write_json(self.path, report)
        return report

    def _publish(self, report: HeartbeatRecord) -> str:
        """SET heartbeat:<worker> with a TTL of three intervals; "up" or "down" (an outage is logged once)."""
        from activation.transport import pubsub as events
        from activation.transport.redis_link import RedisLink

        key = events.heartbeat_key(self.worker)
        if self._redis is None:
            self._redis = RedisLink(self.settings.redis_url or "", log=self.log, what=f"SET {key}")
        ttl = max(1, math.ceil(3 * self.settings.heartbeat_interval))
        value = json.dumps({**report, "redis": "up"})
        done = self._redis.run(lambda client: client.set(key, value, ex=ttl))
        return "down" if done is None else "up"

    def report(self, state: str = "running") -> HeartbeatRecord:
        """Everything the heartbeat file says about this worker right now."""
        queue_size = self.spool.count_inbox(self.worker)
        self.metrics.task_queue_size.labels(self.worker).set(queue_size)
        claimed = self.spool.claimed_ids(self.worker)
        interval = self.settings.heartbeat_interval
        # supervisord is shutting down when we stop: it would only answer SHUTDOWN_STATE.
        programs = self._programs() if state == "running" else None
        # worker_up says the whole tree works, not only that this program runs.
        self.metrics.worker_up.set(int(state == "running" and not (programs and set(programs.values()) - {"RUNNING"})))
        return {
            "worker": self.worker,
            "state": state,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "timestamp": iso_now(),
            "epoch": time.time(),
            "interval_s": interval,
            "started_at": self.started_at,
            "current_task": claimed[0] if claimed else None,
            "queue_size": queue_size,
            "counts": self._counts(),
            "programs": programs,
            "listener": self._listener(),
            "wake_sources": list(self.settings.mode),
            "executor": liveness.judge(self.settings.run_dir, interval=interval, info=self._executor_info)
            if state == "running"
            else None,
            "metrics": {"port": self.settings.metrics_port, "error": self._metrics_error}
            if self.settings.metrics_port
            else {},
            "version": __version__,
        }

    def _last_word(self) -> str:
        """``stopped`` when the whole tree stops; ``restarting`` when only this program does.

        Recovery gives a stopped worker ACTIVATION_STOPPED_GRACE; a heartbeat restarted alone (or
        crashing, say on a taken metrics port) while its siblings work must not say the tree stopped.
        """
        sock = supervisor_socket(self.settings.run_dir)
        if not sock.exists():
            return "stopped"  # not under supervisord: this program is all there is
        try:
            return "restarting" if supervisor_state(sock) == "RUNNING" else "stopped"
        except OSError:  # SHUTDOWN_STATE, or supervisord gone: the tree is stopping
            return "stopped"

    def _programs(self) -> dict[str, str] | None:
        sock = supervisor_socket(self.settings.run_dir)
        self._executor_info = liveness.ExecutorInfo()
        if not sock.exists():
            return None  # not under supervisord (a test, or a hand-run program)
        try:
            infos = told_program_infos(self.settings.run_dir)
            if infos is None:  # supervisord without worker.conf's states_file, or not our parent
                infos = program_infos(sock)
        except OSError as exc:
            # SHUTDOWN_STATE: supervisord is stopping the tree and we are the last to go.
            level = logging.DEBUG if "SHUTDOWN_STATE" in str(exc) else logging.WARNING
            self.log.log(level, "cannot read program states from %s: %s", sock, exc, extra={"event": "supervisor_down"})
            return None
        executor = infos.get("executor")
        if executor is not None:
            self._executor_info = liveness.ExecutorInfo(
                state=str(executor.get("statename")),
                pid=int(executor.get("pid") or 0) or None,
                started=float(executor.get("start") or 0) or None,
            )
        return {name: str(info.get("statename")) for name, info in infos.items()}

    def _listener(self) -> dict[str, Any] | None:
        """The listener's own report: its wake sources, whether the observer thread lives."""
        from activation.worker.queue import QueueClient, load_authkey, socket_path

        if self._queue_client is None:
            self._queue_client = QueueClient(
                socket_path(self.settings.run_dir), load_authkey(self.settings.run_dir, self.settings.queue_key)
            )
        try:
            stats: dict[str, Any] = self._queue_client.stats()
            return stats
        except QueueError as exc:
            return {"reachable": False, "error": str(exc)}

    def _counts(self) -> dict[str, int]:
        """Results by status since the metrics folder was created, from the programs' counters."""
        completed = merged(metrics_folder(self.settings.run_dir), own=self.metrics.store)["tasks_completed"]
        counts: dict[str, int] = {}
        for (worker, status), value in completed.items():
            if worker == self.worker:
                counts[status] = counts.get(status, 0) + int(value)
        return counts
