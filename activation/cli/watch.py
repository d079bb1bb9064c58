"""``--watch``: redraw a view in place on a terminal (rich, imported only here), or print it
again as plain lines every interval when stdout is a pipe or a file."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from activation.clock import iso_now

F = TypeVar("F", bound=Callable[..., Any])

if TYPE_CHECKING:
    from rich.console import RenderableType

# A view is built twice: as a rich renderable for the terminal, as plain lines for a pipe.
RichView = Callable[[], "RenderableType"]
PlainView = Callable[[], list[str]]


def watch_options(command: F) -> F:
    """``--watch``, ``--interval`` and (hidden, for tests) ``--count``: one copy for every live view."""
    for option in reversed(
        (
            click.option("--watch", is_flag=True, help="Refresh in place until Ctrl-C (plain lines off a terminal)."),
            click.option(
                "--interval",
                type=click.FloatRange(min=0.1),
                default=2.0,
                show_default=True,
                help="--watch refresh, seconds.",
            ),
            click.option("--count", type=click.IntRange(min=1), hidden=True, help="--watch: stop after N refreshes."),
        )
    ):
        command = option(command)
    return command


def watch(rich_view: RichView, plain_view: PlainView, *, interval: float, count: int | None = None) -> None:
    """Show the view until Ctrl-C (or ``count`` refreshes); KeyboardInterrupt ends it quietly."""
    try:
        if sys.stdout.isatty():
            _live(rich_view, interval, count)
        else:
            _plain(plain_view, interval, count)
    except KeyboardInterrupt:
        pass


def _live(view: RichView, interval: float, count: int | None) -> None:
    from rich.console import Group
    from rich.live import Live
    from rich.text import Text

    def frame() -> RenderableType:
        footer = Text(f"{iso_now()[:19]}Z, every {interval:g}s; Ctrl-C stops", style="dim")
        return Group(view(), footer)

    shown = 1
    with Live(frame(), auto_refresh=False, screen=False) as live:
        while count is None or shown < count:
            time.sleep(interval)
            live.update(frame(), refresh=True)
            shown += 1


def _plain(view: PlainView, interval: float, count: int | None) -> None:
    shown = 0
    while count is None or shown < count:
        click.echo(f"-- {iso_now()}")
        for line in view():
            click.echo(line)
        sys.stdout.flush()
        shown += 1
        if count is not None and shown >= count:
            break
        time.sleep(interval)
