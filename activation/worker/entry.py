"""The ``activation`` command's entry point: ``activation worker <program>`` without click.

supervisord starts each program of a worker tree as ``activation worker <program>``; those
processes live as long as the tree, and click (with inspect, uuid and platform, about 3.5 MB of
each) would serve only to parse two words. Every other command line goes to the click CLI.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from typing import NoReturn

from activation.errors import ActivationError, ConfigError

PROGRAMS = {
    "listener": "activation.worker.listener:Listener",
    "executor": "activation.worker.executor:Executor",
    "heartbeat": "activation.worker.heartbeat:Heartbeat",
}
EXIT_FAILED, EXIT_USAGE = 1, 2  # cli.support's


def main() -> None:
    """The console script: a worker program at once, anything else through the click CLI."""
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "worker" and args[1] in PROGRAMS:
        # As the CLI's group does for every command: whatever a record holds (a file name that is
        # not UTF-8, say), printing it is no crash.
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(AttributeError, ValueError):
                stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
        try:
            run(args[1])
        except ActivationError as exc:  # what cli.support.Group.invoke says, in the same line
            _fail(str(exc), EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED)
        except OSError as exc:
            _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc), EXIT_FAILED)
    from activation.cli import main as cli

    cli()


def _fail(message: str, code: int) -> NoReturn:
    print(f"activation: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(program: str) -> NoReturn:
    """Run one program of a worker tree, holding its lock on the worker for its whole life.

    The program's metric samples go to its file in the run folder (observability/samples.py),
    which the heartbeat serves. The lock (spool/ownership.py) is what recovery trusts as proof
    that the program is alive, and it refuses a second tree with the same WORKER_NAME on this
    spool (files mode: the worker's inbox is one folder; replicas of a role come with the
    streams transport).
    """
    from activation.config import load_settings
    from activation.lifecycle import EXIT_OWNED, run_program
    from activation.observability.logs import configure_logging
    from activation.observability.samples import record_to
    from activation.procctl import make_undumpable
    from activation.spool import ownership
    from activation.spool.layout import Spool

    make_undumpable()  # first: the secrets in this process's environment stay its own
    settings = load_settings()
    worker = settings.require_worker()
    configure_logging(level=settings.log_level, fmt=settings.log_format, worker=settings.worker_name)
    spool = Spool(settings.spool)
    try:
        lock = ownership.acquire(spool, worker, program, settings.run_dir)
    except ownership.WorkerOwned as exc:
        ownership.record_refusal(spool, worker, program, settings.run_dir, str(exc))
        _fail(str(exc), EXIT_OWNED)
    try:
        record_to(settings.run_dir, program)  # continue from the counters of this program's previous run
        module, _, name = PROGRAMS[program].partition(":")
        code = run_program(getattr(importlib.import_module(module), name)(settings))
    finally:
        lock.release()
    sys.exit(code)
