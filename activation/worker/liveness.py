"""The executor's liveness beat, and the heartbeat's judgement of it.

supervisord sees a process, not progress: a SIGSTOPped executor, or one stuck in a syscall, is
still RUNNING to it. So the executor's loop touches ``<run_dir>/executor.beat`` on every step:
while it waits on the queue (every `beat_period`), and while an agent runs (from the run's own
supervision loop). The file's mtime is the beat; its content is the executor's state (``ok`` or
``degraded`` with a reason), rewritten only when the state changes. The heartbeat reads it on its
own host and clock; a beat older than `wedge_after` means the executor makes no progress.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activation.clock import iso_now
from activation.spool.atomic import atomic_write_json, read_json

BEAT_NAME = "executor.beat"
QUEUE_WAIT_MAX = 15.0  # the executor's longest queue wait: its idle cost, one wake-up per wait
MIN_WEDGE_AFTER = 1.0  # below this, a loaded machine's scheduling hiccups would look like a wedge
# What a beat may be late by (a loaded machine, a slow disk) before it would look like a wedge.
BEAT_SLACK = 4.0
OK, DEGRADED = "ok", "degraded"
# While no task can start or no result can be written: wait this long before trying again,
# doubling up to the maximum. A fault that preflight can see is re-checked every beat instead.
TROUBLE_BACKOFF_MIN = 1.0
TROUBLE_BACKOFF_MAX = 30.0
# An agent that starts but fails every task at once is as broken as one that cannot start: after
# this many failed runs in a row, each shorter than FAST_FAIL_S, the executor backs off as above.
FAST_FAIL_STREAK = 5
FAST_FAIL_S = 1.0
AGENT_FAILING = "agent_failing"


def wedge_after(heartbeat_interval: float) -> float:
    """How old a beat may get before the executor counts as wedged: one heartbeat interval.

    The heartbeat then sees it at its next beat at the latest, so `check` turns unhealthy
    within two intervals of the wedge.
    """
    return max(heartbeat_interval, MIN_WEDGE_AFTER)


def beat_period(heartbeat_interval: float) -> float:
    """How often the executor beats when idle: its queue wait, so each one is a wake-up.

    Half the wedge threshold where the other half still leaves BEAT_SLACK for a late beat (5 s
    at the default 10 s interval), else a quarter of it: short intervals (tests) keep their margin.
    """
    wedge = wedge_after(heartbeat_interval)
    return min(QUEUE_WAIT_MAX, max(wedge / 4, min(wedge / 2, wedge - BEAT_SLACK)))


def beat_path(run_dir: Path) -> Path:
    return Path(run_dir) / BEAT_NAME


class ExecutorBeat:
    """The executor's side: `beat()` is one utime() at most every half period; `set_state()` on change."""

    def __init__(self, run_dir: Path, period: float) -> None:
        self.path = beat_path(run_dir)
        self.period = period
        self._next = 0.0
        self._state: dict[str, Any] = {}

    def beat(self) -> None:
        now = time.monotonic()
        if now < self._next:
            return
        self._next = now + self.period / 2
        try:
            os.utime(self.path)
        except FileNotFoundError:
            self._write()
        except OSError:
            pass  # a run folder that cannot be touched: the heartbeat will call us wedged, which is true enough

    def set_state(self, state: str, reason: str | None = None, detail: str | None = None) -> bool:
        """Record the executor's state; True when it changed."""
        if self._state.get("state") == state and self._state.get("reason") == reason:
            return False
        self._state = {"pid": os.getpid(), "state": state, "reason": reason, "detail": detail, "since": iso_now()}
        self._write()
        return True

    def close(self) -> None:
        """A clean exit: no beat file, so nobody mistakes a stopped executor for a wedged one."""
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    def _write(self) -> None:
        if not self._state:
            self._state = {"pid": os.getpid(), "state": OK, "reason": None, "detail": None, "since": iso_now()}
        with contextlib.suppress(OSError):
            atomic_write_json(self.path, self._state, durable=False)
            self._next = time.monotonic() + self.period / 2


@dataclass(frozen=True)
class ExecutorInfo:
    """What supervisord says of the executor process (None fields when not under supervisord)."""

    state: str | None = None
    pid: int | None = None
    started: float | None = None  # epoch seconds


def judge(run_dir: Path, *, interval: float, info: ExecutorInfo, now: float | None = None) -> dict[str, Any] | None:
    """The heartbeat's view of the executor: its state, its beat's age, and whether it is wedged.

    None when there is nothing to judge: no beat file and no supervisord to say an executor runs.
    """
    now = time.time() if now is None else now
    path = beat_path(run_dir)
    record: dict[str, Any] = {}
    mtime: float | None = None
    with contextlib.suppress(OSError, ValueError):
        mtime = os.stat(path).st_mtime
        loaded = read_json(path)
        record = loaded if isinstance(loaded, dict) else {}
    if info.state is not None and info.state != "RUNNING":
        return None  # supervisord's own state already says what is wrong (or that it is starting)
    if mtime is None and info.pid is None:
        return None
    threshold = wedge_after(interval)
    current = info.pid is None or record.get("pid") == info.pid
    if current and mtime is not None:
        age = max(0.0, now - mtime)
    elif info.started is not None:
        age = max(0.0, now - info.started)  # a fresh process that has not beaten yet
        record = {}
    else:
        age = threshold + 1
        record = {}
    return {
        "state": record.get("state") or OK,
        "reason": record.get("reason"),
        "detail": record.get("detail"),
        "since": record.get("since"),
        "beat_age_s": round(age, 2),
        "wedged": age > threshold,
    }


@dataclass
class Trouble:
    """Why the executor takes no task right now, and when it tries again."""

    reason: str
    detail: str
    static: bool  # the executor's preflight sees it, so it is over as soon as preflight passes
    backoff: float
    retry_at: float  # time.monotonic()


class Condition:
    """The executor's ok/degraded state: one Trouble at a time, its backoff, its beat file, its log lines."""

    def __init__(self, pulse: ExecutorBeat, log: logging.Logger, worker: str) -> None:
        self.pulse = pulse
        self.log = log
        self.worker = worker
        self.trouble: Trouble | None = None
        self.streak = 0  # failed runs in a row, each shorter than FAST_FAIL_S
        # A dependency that is down (Redis, in streams mode): reported like a trouble, but it does
        # not gate the loop; its owner backs off on its own schedule (redis_link.Outage) and logs.
        self.outage: tuple[str, str] | None = None

    def degrade(self, reason: str, detail: str, *, static: bool = False, task_id: str | None = None) -> None:
        """Report degraded (the heartbeat passes it on to `check`) and back off; logged once per cause."""
        previous = self.trouble
        backoff = TROUBLE_BACKOFF_MIN
        if previous is not None and previous.reason == reason:
            backoff = min(previous.backoff * 2, TROUBLE_BACKOFF_MAX)
        self.trouble = Trouble(reason, detail, static, backoff, time.monotonic() + backoff)
        if self.pulse.set_state(DEGRADED, reason, detail):
            extra = {"worker": self.worker, "event": "degraded", **({"task_id": task_id} if task_id else {})}
            retry = (
                "re-checked every beat"
                if static
                else f"retrying in {backoff:g}s, backing off to {TROUBLE_BACKOFF_MAX:g}s"
            )
            self.log.error("degraded: %s; %s", detail, retry, extra=extra)

    def dependency_down(self, reason: str, detail: str) -> None:
        """Report degraded because a dependency is down, until `dependency_up`; logs nothing."""
        self.outage = (reason, detail)
        if self.trouble is None:
            self.pulse.set_state(DEGRADED, reason, detail)

    def dependency_up(self) -> None:
        if self.outage is None:
            return
        self.outage = None
        if self.trouble is None:
            self.pulse.set_state(OK)

    def recovered(self) -> None:
        trouble, self.trouble = self.trouble, None
        if self.outage is not None:  # the trouble is over, the dependency is still down
            self.pulse.set_state(DEGRADED, *self.outage)
            return
        if self.pulse.set_state(OK) and trouble is not None:
            extra = {"worker": self.worker, "event": "ok"}
            self.log.info("no longer degraded (%s is over)", trouble.reason, extra=extra)

    def started(self) -> None:
        """An agent started: whatever kept tasks from starting is over (a failing agent is judged by its runs)."""
        if self.trouble is not None and self.trouble.reason != AGENT_FAILING:
            self.recovered()

    def note_run(self, failed: bool, duration_s: float, exit_code: int, output: str) -> None:
        """After each run: a streak of fast failures means the agent itself is broken, so back off."""
        if not failed or duration_s >= FAST_FAIL_S:
            self.streak = 0
            if self.trouble is not None and self.trouble.reason == AGENT_FAILING:
                self.recovered()
            return
        self.streak += 1
        if self.streak >= FAST_FAIL_STREAK:
            said = output.splitlines()[:1]
            summary = f"exit {exit_code}" + (f": {said[0][:200]}" if said else "")
            detail = f"the agent failed {self.streak} tasks in a row, each within {FAST_FAIL_S:g}s (last: {summary})"
            self.degrade(AGENT_FAILING, f"{detail}; the next task waits")
