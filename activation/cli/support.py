"""What every click command of ``activation`` shares: exit codes, one-line failures, JSON output,
the lazily built settings, and the group that turns an ActivationError into one line.

cli.py and admin_cli.py both build on it; neither has to import the other for it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

import click

from activation.config import Settings, load_settings
from activation.errors import ActivationError, ConfigError
from activation.observability.logs import configure_logging
from activation.spool import codec
from activation.spool.layout import Spool

EXIT_FAILED = 1  # the command ran, and what it reports is a failure (a failed task, a sick worker)
EXIT_USAGE = 2  # bad arguments or settings


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    click.echo(f"activation: {message}", err=True)
    sys.exit(code)


def print_json(data: Any) -> None:
    click.echo(codec.encode_text(data, indent=2))  # a lone surrogate in a record prints as its escape


SPOOL_FOLDER = Path("var") / "spool"


def find_spool(start: Path) -> Path | None:
    """The project's ``var/spool`` in ``start`` or the nearest folder above it that has one.

    Only a spool laid out as ours (with its ``tasks/`` folder) counts, and never the root's:
    ``/var/spool`` is the system's (cron, mail), not a project's.
    """
    for folder in (start, *start.parents):
        if folder == folder.parent:
            break
        candidate = folder / SPOOL_FOLDER
        if (candidate / "tasks").is_dir():
            return candidate
    return None


class Context:
    """Lazily built settings, so that `--help` works even when the environment is broken.

    The spool is ``--spool`` or ACTIVATION_SPOOL when given (``source`` says which); else the
    ``var/spool`` of the current folder or the nearest one above it. When there is none, the
    commands that read a spool fail in one line instead of reporting on a stray empty one.
    """

    def __init__(self, spool: Path | None, source: str | None = None) -> None:
        self.source = source or ("--spool" if spool else "")
        if spool is None:
            found = find_spool(Path.cwd())
            if found is not None:
                spool, self.source = found, f"found by walking up from {Path.cwd()}"
        self._spool = spool
        self._settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(spool=self._spool)
        return self._settings

    @property
    def spool_found(self) -> bool:
        return self._spool is not None or (self.settings.spool / "tasks").is_dir()

    @property
    def spool(self) -> Spool:
        if not self.spool_found:
            raise ActivationError(
                f"no spool here: {Path.cwd()} has no var/spool, nor has any folder above it; "
                "set ACTIVATION_SPOOL (or --spool), run this from the project, or `activation init`"
            )
        return Spool(self.settings.spool)


pass_ctx = click.make_pass_decorator(Context)


class Group(click.Group):
    """Turns ActivationError into a one-line message and exit code, and a closed pipe
    (``activation tasks | head``) into a quiet exit.

    ``lazy`` names commands by ``module:attribute``, imported only when that command runs or
    help lists it (click's documented lazy-loading pattern): each program of a worker tree
    starts through this group and must not carry the operator commands' imports (urllib and
    ssl, rich, the spool readers) in its memory for its whole life.
    """

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.lazy and cmd_name not in self.commands:
            import importlib

            module, attribute = self.lazy[cmd_name].split(":")
            command = getattr(importlib.import_module(module), attribute)
            if not isinstance(command, click.Command):
                raise TypeError(f"{self.lazy[cmd_name]} is no click command")
            self.add_command(command, cmd_name)
        return super().get_command(ctx, cmd_name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # The reader left: say nothing (there is no one to say it to), and point stdout at
            # /dev/null so that the interpreter's final flush cannot raise it again.
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_FAILED)
        except ActivationError as exc:
            fail(str(exc), EXIT_USAGE if isinstance(exc, ConfigError) else EXIT_FAILED)
        except OSError as exc:
            fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


def setup_logging(settings: Settings) -> None:
    configure_logging(level=settings.log_level, fmt=settings.log_format, worker=settings.worker_name)
