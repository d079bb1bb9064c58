"""``activation logs``: a task's agent output (spool.tasklog), rendered (cli.agent_log), while it
runs and after; or, with ``--worker``, a local worker tree's program logs (``var/log/<worker>.log``,
written by ``activation up``). In streams mode, on the orchestrator's spool, a task that runs on
another host is read from the copy its replica ships to Redis (cli.remote).

``-f`` follows: a task until it has its result (then exit 0), from before it has printed anything,
even before it has started; a worker's log until Ctrl-C. It reads with plain polling (a stat and a
read per interval), which works on every filesystem the spool may be on.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

import click

from activation.cli.agent_log import Line, LineSplitter, render_line, styled
from activation.cli.support import EXIT_USAGE, Context, fail, pass_ctx
from activation.spool import tasklog
from activation.spool.layout import Location, Spool
from activation.spool.readers import BadRecord, peek_record, read_record, result_record
from activation.spool.task import is_valid_task_id

READ_CHUNK = 1024 * 1024
FINISHED = ("done", "dead")


def stack_log_dir(spool_root: Path) -> Path:
    """Where `activation up` writes each tree's lines: ``var/log/`` beside ``var/spool/``."""
    return spool_root.parent / "log"


@click.command("logs")
@click.argument("task_id", required=False)
@click.option("--worker", metavar="WORKER", help="Show WORKER's program logs (var/log/WORKER.log) instead.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing as output arrives; a task: until it ends.")
@click.option("--raw", is_flag=True, help="Print the log as the agent wrote it, without rendering stream-json.")
@click.option(
    "--interval", type=click.FloatRange(min=0.01), default=0.2, show_default=True, help="-f: seconds between looks."
)
@pass_ctx
def logs_command(
    obj: Context, task_id: str | None, worker: str | None, follow: bool, raw: bool, interval: float
) -> None:
    """Show TASK_ID's agent output (stream-json made readable), or --worker WORKER's program logs."""
    if (task_id is None) == (worker is None):
        fail("give a TASK_ID, or --worker WORKER (not both)", EXIT_USAGE)
    if worker is not None:
        with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a follow of a worker ends
            _worker_logs(stack_log_dir(obj.spool.root), worker, follow, interval)
        return
    assert task_id is not None
    if not is_valid_task_id(task_id):
        fail(f"{task_id!r} is not a task id", EXIT_USAGE)
    spool = obj.spool
    found = spool.locate(task_id)
    if found is None:
        fail(f"no task {task_id!r} in {spool.root}")
    if found.state == "dead":
        fail(f"{task_id} is in the dead letter: it never ran to a result, so it has no log (`activation show`)")
    assert found.worker is not None
    echo = _echo(raw)
    if found.state == "pending" and _dispatched_by_stream(obj):
        _remote(spool, obj, found.worker, task_id, echo, follow)
        return
    if follow:
        with contextlib.suppress(KeyboardInterrupt):  # the task runs on; only the reader stops
            TaskFollower(spool, found.worker, task_id, echo, interval).run()
        return
    path = tasklog.find_log(spool, found.worker, task_id)
    if path is not None:
        _print_file(path, echo)
    elif found.state == "done":
        _print_result_output(found, echo)
    else:
        what = "is waiting in the inbox" if found.state == "pending" else "has printed nothing yet"
        click.echo(f"activation: {task_id} {what}; `activation logs -f {task_id}` follows it", err=True)


def _dispatched_by_stream(obj: Context) -> bool:
    """This is an orchestrator's spool in streams mode: a pending task there is the outbox copy of
    one that may run on another host, whose log its replica ships to Redis."""
    settings = obj.settings
    return settings.transport == "streams" and not settings.worker_name


def _remote(spool: Spool, obj: Context, worker: str, task_id: str, echo: Callable[[bytes], None], follow: bool) -> None:
    from activation.cli.remote import show_remote

    with contextlib.suppress(KeyboardInterrupt):
        printed = show_remote(spool, obj.settings, worker, task_id, echo, follow=follow)
        if not follow:
            if not printed:
                click.echo(
                    f"activation: {task_id} has printed nothing yet (or waits in the stream); "
                    f"`activation logs -f {task_id}` follows it",
                    err=True,
                )
            return
        found = spool.locate(task_id, [worker])
        if found is not None and found.state == "done" and not printed:
            _print_result_output(found, echo)
        click.echo(styled(Line(f"── {task_id}: {_status_of(found)}", "meta")), err=True)


def _status_of(found: Location | None) -> str:
    if found is None or found.state != "done":
        return found.state if found is not None else "gone"
    record = peek_record(found.path, result_record)
    return "?" if record is None else record["status"]


def _echo(raw: bool) -> Callable[[bytes], None]:
    if raw:
        return lambda line: click.echo(line.rstrip(b"\r\n").decode("utf-8", errors="replace"))

    def rendered(line: bytes) -> None:
        for out in render_line(line):
            click.echo(styled(out))

    return rendered


def _print_file(path: Path, echo: Callable[[bytes], None]) -> None:
    splitter = LineSplitter()
    with open(path, "rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            for line in splitter.feed(chunk):
                echo(line)
    for line in splitter.flush():
        echo(line)


def _print_result_output(found: Location, echo: Callable[[bytes], None]) -> None:
    """A result without a log (cancelled before it ran, or older than logs): what the result kept."""
    try:
        result = read_record(found.path, result_record)
    except (OSError, BadRecord) as exc:
        fail(f"cannot read the result {found.path}: {exc}")
    click.echo(styled(Line(f"── no log was kept; the output the result holds ({result['status']}):", "meta")))
    for text in (result.get("stdout"), result.get("stderr")):
        if text:
            for line in text.encode("utf-8", "surrogateescape").splitlines(keepends=True):
                echo(line)


class TaskFollower:
    """Follows one task's log to its result, whatever state it is in when it starts."""

    def __init__(self, spool: Spool, worker: str, task_id: str, echo: Callable[[bytes], None], interval: float) -> None:
        self.spool, self.worker, self.task_id = spool, worker, task_id
        self.echo, self.interval = echo, interval
        self.handle: IO[bytes] | None = None
        self.inode: int | None = None
        self.splitter = LineSplitter()
        self.printed = False

    def run(self) -> str | None:
        """Print until the task has a result (or dies); its final state."""
        try:
            while True:
                self._open()
                self._read()
                found = self.spool.locate(self.task_id, [self.worker])
                if found is None or found.state in FINISHED:
                    return self._finish(found)
                time.sleep(self.interval)
        finally:
            if self.handle is not None:
                self.handle.close()

    def _open(self) -> None:
        running = tasklog.running_log_path(self.spool, self.worker, self.task_id)
        if self.handle is not None:
            # Another attempt (after a drain or a restart) writes a new file: follow that one.
            try:
                inode = os.stat(running).st_ino
            except FileNotFoundError:
                return
            if inode == self.inode:
                return
            self._read()
            self.handle.close()
            self.handle = None
            for line in self.splitter.flush():
                self.echo(line)
            click.echo(styled(Line("── the task started again (a new attempt):", "meta")))
        path = tasklog.find_log(self.spool, self.worker, self.task_id)
        if path is None:
            return
        try:
            self.handle = open(path, "rb")  # noqa: SIM115 (kept open across looks; run() closes it)
        except FileNotFoundError:  # moved beside its result in between: the next look finds it
            return
        self.inode = os.fstat(self.handle.fileno()).st_ino

    def _read(self) -> None:
        if self.handle is None:
            return
        while chunk := self.handle.read(READ_CHUNK):
            for line in self.splitter.feed(chunk):
                self.printed = True
                self.echo(line)

    def _finish(self, found: Location | None) -> str | None:
        if self.handle is None:
            self._open()
        self._read()
        for line in self.splitter.flush():
            self.echo(line)
        if found is None:
            fail(f"{self.task_id} is gone from {self.spool.root} (purged?)")
        if found.state == "dead":
            fail(f"{self.task_id} went to the dead letter (`activation show {self.task_id}`)")
        if self.handle is None and not self.printed:
            _print_result_output(found, self.echo)
        click.echo(styled(Line(f"── {self.task_id}: {_status_of(found)}", "meta")), err=True)
        return found.state


def _worker_logs(folder: Path, worker: str, follow: bool, interval: float) -> None:
    path = folder / f"{worker}.log"
    if not path.exists():
        known = sorted(p.stem for p in folder.glob("*.log")) if folder.is_dir() else []
        also = f" (there are: {', '.join(known)})" if known else " (`activation up` writes them)"
        fail(f"no log for {worker!r} in {folder}{also}")
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(READ_CHUNK)
            if chunk:
                click.echo(chunk.decode("utf-8", errors="replace"), nl=False)
                continue
            if not follow:
                return
            if _replaced(path, handle):  # `activation up` started again and the file was recreated
                return _worker_logs(folder, worker, follow, interval)
            time.sleep(interval)


def _replaced(path: Path, handle: IO[bytes]) -> bool:
    try:
        return os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino
    except FileNotFoundError:
        return False
