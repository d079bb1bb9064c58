"""Logging: readable text by default, one JSON object per line with ACTIVATION_LOG_FORMAT=json."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from activation.config import load_settings
from activation.errors import ConfigError
from activation.observability.logs import JsonFormatter, TextFormatter, configure_logging


def record(message: str = "task %s finished", *args: Any, exc: bool = False, **extra: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("activation.executor", logging.INFO, __file__, 1, message, args, exc_info)
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


@pytest.fixture
def root_logging() -> Iterator[None]:
    """configure_logging changes the root logger: put it back as it was."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("watchdog", "urllib3")}
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    for name, old in noisy.items():
        logging.getLogger(name).setLevel(old)


def test_json_line_carries_worker_task_id_and_event() -> None:
    line = JsonFormatter().format(record("task %s finished", "t-1", worker="w1", task_id="t-1", event="task_finished"))
    entry = json.loads(line)
    assert entry["worker"] == "w1"
    assert entry["task_id"] == "t-1"
    assert entry["event"] == "task_finished"
    assert entry["message"] == "task t-1 finished"
    assert entry["level"] == "info"
    assert entry["logger"] == "activation.executor"
    assert entry["ts"].endswith("Z") and "T" in entry["ts"]


def test_json_stays_one_line_with_newlines_and_a_traceback() -> None:
    line = JsonFormatter().format(record("bad file %r:\nnext", "x\ny", exc=True, worker="w1"))
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "bad file 'x\\ny':\nnext"
    assert "RuntimeError: boom" in entry["exception"]


def test_json_leaves_out_missing_fields_and_keeps_unicode() -> None:
    entry = json.loads(JsonFormatter().format(record("tâche prête ✓")))
    assert entry["message"] == "tâche prête ✓"
    assert not {"worker", "task_id", "event"} & set(entry)


def test_text_is_readable_and_not_json() -> None:
    line = TextFormatter().format(record("task %s finished", "t-1", worker="w1", task_id="t-1", event="x"))
    assert line.endswith("INFO    activation.executor: task t-1 finished [worker=w1 task_id=t-1]")
    assert line[:4].isdigit() and "Z " in line
    with pytest.raises(ValueError):
        json.loads(line)


def test_text_shows_a_traceback_below_the_line() -> None:
    lines = TextFormatter().format(record("failed", exc=True)).splitlines()
    assert lines[0].endswith("activation.executor: failed")
    assert lines[-1] == "second line"  # the exception's own message, after the traceback


def test_configure_json_tags_every_line_with_the_worker(root_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(fmt="json", worker="marie", level="debug")
    log = logging.getLogger("activation.listener")
    log.debug("queued %s", "t-2", extra={"task_id": "t-2", "event": "queued"})
    log.info("for another worker", extra={"worker": "anga"})
    logging.getLogger("watchdog.observers").info("chatty")  # below the noisy libraries' level
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2
    first, second = map(json.loads, lines)
    assert first == {**first, "worker": "marie", "task_id": "t-2", "event": "queued", "level": "debug"}
    assert second["worker"] == "anga"  # an explicit worker wins


def test_configure_text_is_the_default(root_logging: None, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging()
    logging.getLogger("activation.heartbeat").info("started")
    logging.getLogger("activation.heartbeat").debug("hidden at INFO")
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].endswith("INFO    activation.heartbeat: started")


def test_the_format_comes_from_activation_log_format() -> None:
    assert load_settings(env={}).log_format == "text"
    assert load_settings(env={"ACTIVATION_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigError, match="ACTIVATION_LOG_FORMAT"):
        load_settings(env={"ACTIVATION_LOG_FORMAT": "xml"})
