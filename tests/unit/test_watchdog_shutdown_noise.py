"""watchdog's ERROR line for its benign stop race never reaches an operator; its other lines do."""

from __future__ import annotations

import logging

import pytest

from activation.observability.logs import WATCHDOG_INOTIFY, WATCHDOG_SHUTDOWN_RACE, quiet_watchdog_shutdown


def test_only_the_shutdown_race_line_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    quiet_watchdog_shutdown()
    quiet_watchdog_shutdown()  # idempotent: one filter
    watchdog_log = logging.getLogger(WATCHDOG_INOTIFY)
    assert len(watchdog_log.filters) == 1
    with caplog.at_level(logging.WARNING, logger=WATCHDOG_INOTIFY):
        watchdog_log.error(WATCHDOG_SHUTDOWN_RACE)
        watchdog_log.error("inotify watch limit reached")
    assert [r.getMessage() for r in caplog.records] == ["inotify watch limit reached"]


def test_the_message_is_still_the_one_watchdog_logs() -> None:
    # A contract with the pinned watchdog: if an upgrade rewords it, the filter would silently stop working.
    import inspect

    from watchdog.observers import inotify

    assert f'"{WATCHDOG_SHUTDOWN_RACE}"' in inspect.getsource(inotify)
