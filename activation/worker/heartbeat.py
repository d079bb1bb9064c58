"""The heartbeat program: the worker's last sign of life, and its metrics endpoint.

Every interval it writes ``heartbeats/<worker>.json`` atomically, with the state of its sibling
programs (read over supervisord's XML-RPC socket) and the listener's own report (over the work
queue's socket). It serves the whole worker's Prometheus metrics.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import socket
import threading
import time
import xmlrpc.client
from pathlib import Path
from typing import Any

from activation import __version__
from activation.clock import iso_now
from activation.config import Settings
from activation.errors import QueueError
from activation.lifecycle import Program
from activation.observability.metrics import (
    counter_totals,
    forget_dead_processes,
    multiprocess_folder,
    multiprocess_registry,
    worker_metrics,
)
from activation.spool.atomic import TEMP_PREFIX, atomic_write_json, remove_temp_files
from activation.spool.layout import Spool

SUPERVISOR_SOCKET = "supervisor.sock"
SETTLING_INTERVAL = 1.0  # seconds between beats while a sibling program is not RUNNING


def supervisor_socket(run_dir: Path) -> Path:
    return run_dir / SUPERVISOR_SOCKET


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over supervisord's Unix socket, with a timeout on this connection only."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self._path, self._timeout = path, timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixConnection(self._path, self._timeout)


def program_states(sock: Path, timeout: float = 2.0) -> dict[str, str]:
    """``{program: state}`` from supervisord, e.g. ``{"executor": "RUNNING"}``; raises OSError."""
    proxy = xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=_UnixTransport(str(sock), timeout))
    try:
        infos: list[dict[str, Any]] = proxy.supervisor.getAllProcessInfo()  # type: ignore[assignment]
    except xmlrpc.client.Fault as exc:
        raise OSError(f"supervisord refused: {exc.faultString}") from None
    except (http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
        raise OSError(f"supervisord answered badly: {exc}") from None
    finally:
        proxy("close")()
    return {str(info["name"]): str(info["statename"]) for info in infos}


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
        self._server: Any = None
        self._server_thread: threading.Thread | None = None
        self._queue_client: Any = None
        self._redis: Any = None  # a RedisLink, made on the first beat when REDIS_URL is set

    def initialize(self) -> None:
        self.spool.init([self.worker])
        # A heartbeat SIGKILLed mid-write leaves its temp file; it is the file's only writer.
        remove_temp_files(self.spool.heartbeats_dir, f"{TEMP_PREFIX}{self.path.name}.")
        if self.settings.metrics_port:
            from prometheus_client import start_http_server

            try:
                self._server, self._server_thread = start_http_server(
                    self.settings.metrics_port, registry=multiprocess_registry()
                )
            except OSError as exc:
                # One line, and the heartbeat lives on: a restart loop of tracebacks would take
                # the worker's health with it for want of a port.
                self.log.error(
                    "cannot serve metrics on :%s (%s): set ACTIVATION_METRICS_PORT to move it; "
                    "the worker runs on without metrics",
                    self.settings.metrics_port,
                    exc.strerror or exc,
                    extra={"event": "metrics_port_taken"},
                )
            else:
                self.log.info("serving metrics on :%s", self.settings.metrics_port, extra={"event": "metrics_up"})
        self.metrics.worker_up.set(1)

    def loop(self) -> None:
        interval = self.settings.heartbeat_interval
        try:
            report = self.beat()
            programs = report.get("programs") or {}
            if set(programs.values()) - {"RUNNING"}:
                # A sibling is starting or restarting: say when it runs, not an interval later.
                interval = min(interval, SETTLING_INTERVAL)
        except OSError as exc:  # a full or unwritable spool must not kill the heartbeat
            self.log.error("cannot write heartbeat %s: %s", self.path, exc, extra={"event": "heartbeat_failed"})
        self.stopping.wait(interval)

    def shutdown(self) -> None:
        self.metrics.worker_up.set(0)
        with contextlib.suppress(OSError):
            self.beat(state="stopped")
        if self._queue_client is not None:
            self._queue_client.close()
        if self._redis is not None:
            self._redis.close()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._server_thread is not None:
                self._server_thread.join(timeout=2)

    def beat(self, state: str = "running") -> dict[str, Any]:
        report = self.report(state)
        report["redis"] = self._publish(report) if self.settings.redis_url else None
        atomic_write_json(self.path, report)
        return report

    def _publish(self, report: dict[str, Any]) -> str:
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

    def report(self, state: str = "running") -> dict[str, Any]:
        """Everything the heartbeat file says about this worker right now."""
        queue_size = self.spool.count_inbox(self.worker)
        self.metrics.task_queue_size.labels(self.worker).set(queue_size)
        folder = multiprocess_folder()
        if folder is not None:
            forget_dead_processes(folder)
        claimed = self.spool.claimed_ids(self.worker)
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
            "interval_s": self.settings.heartbeat_interval,
            "started_at": self.started_at,
            "current_task": claimed[0] if claimed else None,
            "queue_size": queue_size,
            "counts": self._counts(),
            "programs": programs,
            "listener": self._listener(),
            "wake_sources": list(self.settings.mode),
            "version": __version__,
        }

    def _programs(self) -> dict[str, str] | None:
        sock = supervisor_socket(self.settings.run_dir)
        if not sock.exists():
            return None  # not under supervisord (a test, or a hand-run program)
        try:
            return program_states(sock)
        except OSError as exc:
            # SHUTDOWN_STATE: supervisord is stopping the tree and we are the last to go.
            level = logging.DEBUG if "SHUTDOWN_STATE" in str(exc) else logging.WARNING
            self.log.log(level, "cannot read program states from %s: %s", sock, exc, extra={"event": "supervisor_down"})
            return None

    def _listener(self) -> dict[str, Any] | None:
        """The listener's own report: its wake sources, whether the observer thread lives."""
        from activation.worker.queue import QueueClient, load_authkey, socket_path

        if self._queue_client is None:
            self._queue_client = QueueClient(socket_path(self.settings.run_dir), load_authkey(self.settings.run_dir))
        try:
            stats: dict[str, Any] = self._queue_client.stats()
            return stats
        except QueueError as exc:
            return {"reachable": False, "error": str(exc)}

    def _counts(self) -> dict[str, int]:
        """Results by status since the metrics folder was created, from the shared counters."""
        folder = multiprocess_folder()
        counts: dict[str, int] = {}
        if folder is None:
            return counts
        for labels, value in counter_totals(folder, "tasks_completed"):
            if labels.get("worker") == self.worker:
                status = labels.get("status", "?")
                counts[status] = counts.get(status, 0) + int(value)
        return counts
