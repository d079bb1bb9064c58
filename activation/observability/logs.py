"""Logging, configured once by the CLI: readable text by default, JSON lines on request.

Code logs with ``extra={"worker": ..., "task_id": ..., "event": ...}``; the JSON formatter turns
those into fields, the text formatter shows worker and task id when they are present.
"""

from __future__ import annotations

import json
import logging
import sys
import time

FIELDS = ("worker", "task_id", "event")


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        context = " ".join(f"{k}={getattr(record, k)}" for k in ("worker", "task_id") if getattr(record, k, None))
        line = f"{stamp}.{int(record.msecs):03d}Z {record.levelname:<7} {record.name}: {record.getMessage()}"
        if context:
            line = f"{line} [{context}]"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in FIELDS:
            value = getattr(record, key, None)
            if value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(*, level: str = "INFO", fmt: str = "text", worker: str | None = None) -> None:
    """Send activation's logs to stderr, one line per event, tagged with the worker."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    if worker:
        handler.addFilter(_WorkerFilter(worker))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # watchdog and urllib3 are chatty at INFO; their warnings still come through.
    for noisy in ("watchdog", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    quiet_watchdog_shutdown()


WATCHDOG_INOTIFY = "watchdog.observers.inotify"
WATCHDOG_SHUTDOWN_RACE = "InotifyEmitter.queue_events() called when the thread is inactive"


class _WatchdogShutdownRace(logging.Filter):
    """watchdog logs an ERROR when its emitter thread reads once more after ``Observer.stop()``
    closed the watch (watchdog PR #963: its chosen answer to a benign race). Stopping a watch is
    routine here (every ``dispatch --wait`` watches the results with watchdog; the listener reads
    inotify itself), so that line would only alarm the operator; every other watchdog record passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.getMessage() != WATCHDOG_SHUTDOWN_RACE


def quiet_watchdog_shutdown() -> None:
    """Install the filter once; call it before stopping an Observer (any process, logging set up or not)."""
    watchdog_log = logging.getLogger(WATCHDOG_INOTIFY)
    if not any(isinstance(f, _WatchdogShutdownRace) for f in watchdog_log.filters):
        watchdog_log.addFilter(_WatchdogShutdownRace())


class _WorkerFilter(logging.Filter):
    def __init__(self, worker: str) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "worker", None) is None:
            record.worker = self.worker
        return True
