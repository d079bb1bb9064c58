"""The orchestrator's log of worker health: trouble that outlasts a tree's start or stop, not its
normal transitions (status reports every transition at once; this is only about the log)."""

from __future__ import annotations

import logging

import pytest

from activation.orchestrator.service import Orchestrator
from tests.harness import ManualClock


@pytest.fixture
def orchestrator(make_settings) -> tuple[Orchestrator, ManualClock]:
    clock = ManualClock()
    program = Orchestrator(make_settings(worker_name=None, heartbeat_interval=1.0), clock=clock)
    return program, clock


def said(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level and getattr(r, "event", "") == "worker_health"]


def test_a_start_that_takes_a_few_seconds_is_no_warning(orchestrator, caplog) -> None:
    program, clock = orchestrator
    with caplog.at_level(logging.INFO, logger="activation.orchestrator"):
        program._note_health("marie", False, ["listener STARTING", "listener unreachable"])
        clock.now += 2.0
        program._note_health("marie", False, ["listener unreachable"])
        clock.now += 1.0
        program._note_health("marie", True, [])
    assert said(caplog, logging.WARNING) == [] and said(caplog, logging.INFO) == []


def test_trouble_that_lasts_is_warned_once_and_its_end_is_said(orchestrator, caplog) -> None:
    program, clock = orchestrator
    with caplog.at_level(logging.INFO, logger="activation.orchestrator"):
        for _ in range(10):
            program._note_health("marie", False, ["executor degraded: the agent failed"])
            clock.now += 1.0
        program._note_health("marie", True, [])
    assert said(caplog, logging.WARNING) == ["worker marie unhealthy: executor degraded: the agent failed"]
    assert said(caplog, logging.INFO) == ["worker marie healthy again"]


def test_a_clean_stop_is_news_not_trouble(orchestrator, caplog) -> None:
    program, _clock = orchestrator
    with caplog.at_level(logging.INFO, logger="activation.orchestrator"):
        program._note_health("marie", False, ["stopped"])
        program._note_health("marie", False, ["stopped"])
    assert said(caplog, logging.WARNING) == [] and said(caplog, logging.INFO) == ["worker marie stopped"]
