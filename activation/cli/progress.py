"""``dispatch --wait``'s progress: the task moving queued -> running -> done, with the time in each
state, on stderr (stdout keeps the result). On a terminal a live line counts the seconds (rich);
off a terminal one plain line per change of state.

It only watches the spool (one ``locate`` per tick); the waiting itself stays
orchestrator.dispatch.wait_for_outcome's, whatever wakes it.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

import click

from activation.spool.layout import Spool

TICK = 0.1
WORDS = {"pending": "queued", "processing": "running", "done": "finished", "dead": "dead letter"}


class WaitProgress:
    """A context manager around the wait; a thread reports the task's state until the wait ends."""

    def __init__(
        self,
        spool: Spool,
        worker: str,
        task_id: str,
        *,
        live: bool | None = None,
        held: Callable[[], bool] | None = None,
    ) -> None:
        self.spool, self.worker, self.task_id = spool, worker, task_id
        self.held = held  # streams mode: whether a replica elsewhere runs it (the outbox says queued)
        self.live = sys.stderr.isatty() if live is None else live
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="wait-progress", daemon=True)
        self.states: list[tuple[str, float]] = []  # (state, seconds since the wait began), each change

    def __enter__(self) -> WaitProgress:
        self._began = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join(5)

    def _state(self) -> str | None:
        found = self.spool.locate(self.task_id, [self.worker])
        if found is None:
            return None
        if found.state == "pending" and self.held is not None and self.held():
            return WORDS["processing"]
        return WORDS.get(found.state, found.state)

    def _changed(self, state: str, elapsed: float) -> str:
        self.states.append((state, elapsed))
        if len(self.states) == 1:
            return f"{self.task_id}: {state} on {self.worker}"
        previous, since = self.states[-2]
        return f"{self.task_id}: {state} after {elapsed - since:.1f} s {previous} ({elapsed:.1f} s in all)"

    def _watch(self) -> None:
        if self.live:
            self._watch_live()
            return
        while True:
            last = self._stop.is_set()  # one more look after the wait ended: it shows the end
            state = self._state()
            if state is not None and (not self.states or self.states[-1][0] != state):
                click.echo(self._changed(state, time.monotonic() - self._began), err=True)
            if last:
                return
            self._stop.wait(TICK)

    def _watch_live(self) -> None:
        from rich.console import Console

        console = Console(stderr=True)
        with console.status("") as status:
            while True:
                last = self._stop.is_set()
                state = self._state()
                now = time.monotonic() - self._began
                if state is not None and (not self.states or self.states[-1][0] != state):
                    console.print(self._changed(state, now), highlight=False)
                if last:
                    return
                if self.states:
                    current, since = self.states[-1]
                    status.update(f"{self.task_id}: {current} for {now - since:.1f} s")
                self._stop.wait(TICK)
