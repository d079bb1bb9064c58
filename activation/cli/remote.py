"""What runs on other hosts, seen from the orchestrator's spool in streams mode, by asking Redis.

- ``activation logs``: the task's replica ships its log as it grows (worker/log_ship.py); this
  reads that copy, and with ``-f`` follows it (a blocking read, no polling) until the task's
  result is mirrored into this spool.
- ``activation tasks`` and ``dispatch --wait``: which outbox tasks a replica holds (XPENDING), so
  that they show as running, not queued.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import click

from activation.cli.agent_log import Line, LineSplitter, styled
from activation.cli.support import fail
from activation.config import Settings
from activation.errors import StreamsError
from activation.spool.layout import Spool
from activation.spool.listing import Remote, RemoteRun
from activation.transport.streams.client import StreamsTransport

PAGE = 100  # entries one read asks for
PROBE_EVERY = 0.5  # seconds between dispatch --wait's looks at who holds its task
BLOCK = 1.0  # seconds a follow waits on Redis before it looks at the spool for the result


class RemoteLog:
    """One task's shipped log, read in order; a new attempt is announced as the local follower does."""

    def __init__(self, transport: StreamsTransport, task_id: str, echo: Callable[[bytes], None]) -> None:
        self.transport = transport
        self.task_id = task_id
        self.echo = echo
        self.after = "0"
        self.attempt: int | None = None
        self.splitter = LineSplitter()
        self.printed = False

    def read(self, block: float = 0.0) -> int:
        """Print what arrived (waiting up to ``block`` s for something); how many entries came."""
        entries = self.transport.read_log(self.task_id, self.after, block=block, count=PAGE)
        for entry in entries:
            self.after = entry.stream_id
            if self.attempt is not None and entry.attempt != self.attempt:
                self.flush()
                click.echo(styled(Line(f"── the task started again (attempt {entry.attempt}):", "meta")))
            self.attempt = entry.attempt
            for line in self.splitter.feed(entry.text.encode("utf-8")):
                self.printed = True
                self.echo(line)
        return len(entries)

    def flush(self) -> None:
        for line in self.splitter.flush():
            self.echo(line)


def show_remote(
    spool: Spool, settings: Settings, worker: str, task_id: str, echo: Callable[[bytes], None], *, follow: bool
) -> bool:
    """Print the shipped log of ``task_id`` (dispatched from this spool to ``worker``); with
    ``follow``, until its result is here. Whether anything was printed."""
    from activation.transport.streams.connect import connect

    try:
        client = connect(settings)
    except StreamsError as exc:
        fail(f"cannot read {task_id}'s log from Redis: {exc}")
    try:
        remote = RemoteLog(StreamsTransport(client, worker, lease=settings.lease), task_id, echo)
        while remote.read() == PAGE:  # everything shipped so far, a page at a time
            pass
        if follow:
            _follow(spool, worker, task_id, remote)
        remote.flush()
    except StreamsError as exc:
        fail(f"cannot read {task_id}'s log from Redis: {exc}")
    finally:
        client.close()
    return remote.printed


def _follow(spool: Spool, worker: str, task_id: str, remote: RemoteLog) -> None:
    while True:
        found = spool.locate(task_id, [worker])
        if found is None or found.state in ("done", "dead"):
            break
        remote.read(block=BLOCK)
    # The holder shipped its last lines before it recorded the result: read what is left.
    deadline = time.monotonic() + BLOCK
    while remote.read() and time.monotonic() < deadline:
        pass


def remote_runs(settings: Settings, spool: Spool, workers: tuple[str, ...]) -> Remote:
    """Which outbox tasks replicas hold. Unreachable: one note on stderr, and the outbox's tasks
    list as pending."""
    from activation.transport.streams.connect import connect

    runs: dict[tuple[str, str], RemoteRun] = {}
    try:
        client = connect(settings)
    except StreamsError as exc:
        click.echo(f"activation: cannot ask Redis which tasks run ({exc}); they list as pending", err=True)
        return runs
    try:
        for worker in workers or tuple(spool.workers()):
            held = StreamsTransport(client, worker, lease=settings.lease).held()
            for task_id, holder in held.items():
                runs[(worker, task_id)] = RemoteRun(holder.consumer, holder.deliveries, holder.running_s)
    except StreamsError as exc:
        click.echo(f"activation: cannot ask Redis which tasks run ({exc}); they list as pending", err=True)
    finally:
        client.close()
    return runs


class HeldProbe:
    """For ``dispatch --wait``: whether a replica holds the task yet, asked at most every PROBE_EVERY s
    (its thread's own connection; Redis away reads as not held, and the wait goes on)."""

    def __init__(self, settings: Settings, worker: str, task_id: str) -> None:
        self.settings, self.worker, self.task_id = settings, worker, task_id
        self._transport: StreamsTransport | None = None
        self._next = 0.0
        self._held = False

    def __call__(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return self._held
        self._next = now + PROBE_EVERY
        from activation.transport.streams.connect import connect

        try:
            if self._transport is None:
                self._transport = StreamsTransport(connect(self.settings), self.worker, lease=self.settings.lease)
            self._held = self.task_id in self._transport.held()
        except StreamsError:
            self._held = False
        return self._held

    def close(self) -> None:
        if self._transport is not None:
            self._transport.client.close()
