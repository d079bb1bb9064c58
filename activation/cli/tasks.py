"""``activation tasks`` and ``activation status``: what runs, what waits, what finished or died,
read live from the spool (spool.listing, spool.status); ``--watch`` redraws them (cli.watch)."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import click

from activation.cli.support import EXIT_FAILED, EXIT_USAGE, Context, fail, pass_ctx, print_json
from activation.cli.watch import watch_options
from activation.errors import StreamsError
from activation.spool.listing import RUNNING, STATES, Query, TaskRow, list_tasks
from activation.spool.status import RECENT_CAP, LiveStatus, live_status

if TYPE_CHECKING:
    from rich.table import Table

    from activation.config import Settings
    from activation.spool.layout import Spool
    from activation.spool.records import ReplicaState

_STYLE = {
    "running": "bold cyan",
    "pending": "yellow",
    "done": "green",
    "failed": "bold red",
    "timeout": "bold magenta",
    "cancelled": "dim",
    "dead": "red",
}


def _since(text: str | None) -> float | None:
    if text is None:
        return None
    from activation.orchestrator.recovery import parse_duration

    try:
        return time.time() - parse_duration(text)
    except ValueError as exc:
        fail(f"--since: {exc}", EXIT_USAGE)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"
    if seconds < 86400:
        return f"{seconds // 3600:.0f}h{seconds % 3600 // 60:02.0f}m"
    return f"{seconds // 86400:.0f}d{seconds % 86400 // 3600:02.0f}h"


def _timing(row: TaskRow) -> str:
    if row.state == "running":
        return f"running {_age(row.elapsed_s)}"
    if row.duration_s is not None:
        return f"took {row.duration_s:.1f}s" if row.duration_s >= 1 else f"took {row.duration_s:.2f}s"
    return "-"


def _where(row: TaskRow) -> str:
    """The worker, and for a task running on another host (streams mode) that host: marie@host-b."""
    if row.replica:
        return f"{row.worker}@{row.replica.split('/', 1)[0]}"
    return row.worker or "-"


def _cells(row: TaskRow, now: float) -> list[str]:
    return [
        row.task_id,
        _where(row),
        row.state,
        "-" if row.attempt is None else str(row.attempt),
        f"{_age(now - row.since)} ago",
        _timing(row),
        row.detail or row.description or "",
    ]


def skipped_note(skipped: list[str], what: str = "result file") -> str:
    """One line for the records a listing skipped because they are no record: how many, and the first."""
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    return f"note: skipped {len(skipped)} {what}(s) that are not valid: {skipped[0]}{more}"


HEADERS = ["TASK", "WORKER", "STATE", "ATTEMPT", "WHEN", "TIME", "DESCRIPTION / REASON"]


def task_lines(rows: list[TaskRow], now: float) -> list[str]:
    """A plain table: one header line and one line per task, columns padded to fit."""
    table = [HEADERS] + [_cells(r, now) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(HEADERS) - 1)]
    lines = []
    for line in table:
        padded = "  ".join(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True))
        lines.append(f"{padded}  {line[-1]}".rstrip())
    return lines


def task_table(rows: list[TaskRow], now: float, title: str) -> Table:
    from rich.table import Table

    table = Table(title=title, title_justify="left", expand=False)
    for header in HEADERS:
        table.add_column(header, overflow="fold" if header.startswith("DESC") else "ellipsis")
    for row in rows:
        cells = _cells(row, now)
        table.add_row(*cells, style=_STYLE.get(row.state))
    return table


@click.command("tasks")
@click.option("--worker", "workers", multiple=True, help="Only this worker's tasks; repeatable.")
@click.option(
    "--state", "states", multiple=True, type=click.Choice(STATES), help="Only tasks in this state; repeatable."
)
@click.option(
    "--since", metavar="DURATION", help="Only tasks that arrived, started or ended within DURATION (1h, 30m, 7d)."
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many rows.")
@watch_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def tasks_command(
    obj: Context,
    workers: tuple[str, ...],
    states: tuple[str, ...],
    since: str | None,
    limit: int,
    watch: bool,
    interval: float,
    count: int | None,
    as_json: bool,
) -> None:
    """List tasks by state across workers: running first, then pending, then the newest finished.

    Running tasks show how long they have run and their attempt.
    """
    spool = obj.spool
    settings = obj.settings

    def query() -> Query:
        return Query(workers=workers, states=states or STATES, since=_since(since), limit=limit)

    def rows(skipped: list[str] | None = None) -> list[TaskRow]:
        remote = None
        if settings.transport == "streams" and not settings.worker_name and RUNNING in query().states:
            from activation.cli.remote import remote_runs

            remote = remote_runs(settings, spool, workers)
        return list_tasks(spool, query(), remote=remote, skipped=skipped)

    if as_json:
        skipped: list[str] = []
        print_json([r.as_dict() for r in rows(skipped)])
        if skipped:
            click.echo(skipped_note(skipped), err=True)
        return

    def plain() -> list[str]:
        skipped: list[str] = []
        found = rows(skipped)
        lines = task_lines(found, time.time()) if found else [f"no tasks in {spool.root}"]
        return lines + ([skipped_note(skipped)] if skipped else [])

    if watch:
        from activation.cli.watch import watch as run_watch

        def rich_view() -> Table:
            return task_table(rows(), time.time(), f"tasks in {spool.root}")

        run_watch(rich_view, plain, interval=interval, count=count)
        return
    for line in plain():
        click.echo(line)


# -- status ---------------------------------------------------------------------------------


def streams_statuses(
    statuses: list[LiveStatus], settings: Settings, spool: Spool
) -> tuple[list[LiveStatus], dict[str, dict[str, ReplicaState]]]:
    """In streams mode: each role's health from its replicas' heartbeats in Redis, and the replicas."""
    from activation.orchestrator.relay import StreamsRelay, role_health

    relay = StreamsRelay(spool, settings)
    replicas: dict[str, dict[str, ReplicaState]] = {}
    error = None
    shown = []
    try:
        for s in statuses:
            found: dict[str, ReplicaState] = {}
            if error is None:
                try:
                    found = relay.replicas(s.worker)
                except StreamsError as exc:
                    error = str(exc)
            replicas[s.worker] = found
            shown.append(dataclasses.replace(s, health=role_health(s.worker, found, s.health.dead_letters, error)))
    finally:
        relay.close()
    return shown, replicas


def replica_lines(replicas: Mapping[str, ReplicaState]) -> list[str]:
    """One line per replica, from its typed state (spool.readers.replica_state); an unreadable
    one says why in its line. A name or state any Redis client wrote is shown as ASCII, clipped."""
    lines = []
    for name, state in sorted(replicas.items()):
        programs = " ".join(f"{k}={v}" for k, v in sorted((state.get("programs") or {}).items()))
        queue = state.get("queue_size")
        line = (
            f"{'':<12} replica {_shown(name)}: {_shown(state.get('state', '?'))} "
            f"task={_shown(state.get('current_task') or '-')} queue={'?' if queue is None else queue}"
            + (f" {_shown(programs, 200)}" if programs else "")
        )
        if "problem" in state:
            line += f" ({_shown(state['problem'], 200)})"
        lines.append(line)
    return lines


def _shown(text: str, limit: int = 80) -> str:
    return ascii(text)[1:-1][:limit] if not text.isprintable() or len(text) > limit else text


def status_lines(
    statuses: list[LiveStatus], root: object, replicas: Mapping[str, Mapping[str, ReplicaState]] | None = None
) -> list[str]:
    if not statuses:
        return [f"no workers in {root}"]
    lines = []
    for s in statuses:
        h = s.health
        age = "never" if h.age_s is None else f"{h.age_s:g}s ago"
        mark = "ok" if h.healthy else "SICK"
        programs = " ".join(f"{name}={state}" for name, state in sorted((h.programs or {}).items())) or "programs=?"
        task = s.current_task or "-"
        if len(s.running) > 1:
            task += f" (+{len(s.running) - 1} claimed)"
        lines.append(
            f"{h.worker:<12} {mark:<4} heartbeat {age:<10} task={task} "
            f"queue={s.queue_size} dead_letters={h.dead_letters} {programs}"
        )
        recent = " ".join(f"{k}={v}" for k, v in sorted(s.recent.items())) or "none"
        window = f"newest {RECENT_CAP} of the last hour" if s.recent_capped else "last hour"
        results = (
            f"results: {s.results_total} in the folder; {window}: {recent}" if s.results_total else "results: none yet"
        )
        lines.append(f"{'':<12} {results}" + (f"; problems: {'; '.join(h.problems)}" if h.problems else ""))
        if s.unreadable:
            lines.append(f"{'':<12} {skipped_note(s.unreadable)}")
        if h.refused:
            lines.append(
                f"{'':<12} refused a second tree: {h.refused.get('program')} "
                f"on host {h.refused.get('host')} at {h.refused.get('at')}"
            )
        if replicas is not None:
            lines += replica_lines(replicas.get(h.worker, {}))
    return lines


def status_table(statuses: list[LiveStatus], root: object) -> Table:
    from rich.table import Table

    table = Table(title=f"workers in {root}", title_justify="left")
    for header in (
        "WORKER",
        "HEALTH",
        "HEARTBEAT",
        "TASK",
        "QUEUE",
        "RESULTS",
        "LAST HOUR",
        "DEAD",
        "PROGRAMS / PROBLEMS",
    ):
        table.add_column(header)
    for s in statuses:
        h = s.health
        programs = " ".join(f"{n}={v}" for n, v in sorted((h.programs or {}).items())) or "?"
        table.add_row(
            h.worker,
            "[green]ok[/]" if h.healthy else "[bold red]SICK[/]",
            "never" if h.age_s is None else f"{h.age_s:g}s ago",
            s.current_task or "-",
            str(s.queue_size),
            str(s.results_total),
            " ".join(f"{k}={v}" for k, v in sorted(s.recent.items())) or "-",
            str(h.dead_letters),
            "; ".join(h.problems) if h.problems else programs,
        )
    return table


@click.command("status")
@click.argument("worker", required=False)
@watch_options
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def status_command(
    obj: Context, worker: str | None, watch: bool, interval: float, count: int | None, as_json: bool
) -> None:
    """Show every worker (or WORKER), live from the spool: current task, queue, results, dead
    letters; the heartbeat adds the programs' states and whether the worker is alive.

    Exits 1 when any worker it shows is unhealthy (not with --watch), as `check` does for one.
    """
    spool = obj.spool
    settings = obj.settings
    timeout = settings.heartbeat_timeout
    local = (settings.worker_name, settings.run_dir)
    if worker is not None and worker not in spool.workers():
        fail(f"no worker {worker!r} in {spool.root} (known: {', '.join(spool.workers()) or 'none'})")

    streams = settings.transport == "streams"
    replicas: dict[str, dict[str, ReplicaState]] | None = None

    def statuses() -> list[LiveStatus]:
        nonlocal replicas
        found = live_status(spool, timeout=timeout, worker=worker, local=local)
        if streams:  # the heartbeats are the replicas' keys in Redis, not files in this spool
            found, replicas = streams_statuses(found, settings, spool)
        return found

    if as_json:
        shown = statuses()
        print_json(
            [
                {**s.as_dict(), **({"replicas": replicas.get(s.worker, {})} if replicas is not None else {})}
                for s in shown
            ]
        )
        if any(not s.health.healthy for s in shown):
            sys.exit(EXIT_FAILED)
        return
    if watch:
        from activation.cli.watch import watch as run_watch

        run_watch(
            lambda: status_table(statuses(), spool.root),
            lambda: status_lines(statuses(), spool.root, replicas),
            interval=interval,
            count=count,
        )
        return
    shown = statuses()
    for line in status_lines(shown, spool.root, replicas):
        click.echo(line)
    if any(not s.health.healthy for s in shown):
        sys.exit(EXIT_FAILED)
