"""``activation logs`` on the orchestrator's host in streams mode: a task that runs on another host.

Its replica ships the log to Redis as it grows (worker/log_ship.py); this reads that copy, and with
``-f`` follows it (a blocking read, no polling) until the task's result is mirrored into this spool.
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
from activation.transport.streams.client import StreamsTransport

PAGE = 100  # entries one read asks for
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
