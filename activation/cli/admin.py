"""The admin commands: ``config get|set-mode`` (over the orchestrator's HTTP API), ``dlq ...`` and
``recover`` (on the spool, like ``status``), and ``orchestrator`` (the program supervisord runs).

cli.py registers these on ``main``; the helpers both share live in cli_support.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click

from activation.cli.support import EXIT_FAILED, EXIT_USAGE, Context, Group, fail, print_json, setup_logging
from activation.config import ORCHESTRATOR_MODES
from activation.errors import ActivationError, ConfigError, Unavailable

HTTP_TIMEOUT = 10.0
F = TypeVar("F", bound=Callable[..., Any])


def _context() -> Context:
    """cli.py's Context, also when a group here runs on its own (tests, or another entry point)."""
    ctx = click.get_current_context()
    found = ctx.find_object(Context)
    if found is None:
        found = ctx.obj = Context(None)
    return found


def _fail(message: str, usage: bool = False) -> NoReturn:
    fail(message, EXIT_USAGE if usage else EXIT_FAILED)


def _json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


# -- config, over the admin API ---------------------------------------------------------------


def default_url(bind: str) -> str:
    """The API's URL for ``ACTIVATION_ADMIN_BIND``; a wildcard bind is reached over loopback."""
    from activation.orchestrator.endpoint import reachable_url
    from activation.orchestrator.http import parse_bind

    return reachable_url(*parse_bind(bind))


class ApiRefusal(ActivationError):
    """The API answered with an error status: ``status`` and the API's own ``message``."""

    def __init__(self, text: str, status: int, message: str) -> None:
        super().__init__(text)
        self.status = status
        self.message = message


class ApiUnreachable(ActivationError):
    """Nothing answered at the URL (connection refused): the request was never sent."""


def api_call(url: str, method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
    """One request to the admin API; its JSON answer, or ActivationError with the API's own message."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url.rstrip("/") + path, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error") or exc.reason
        except (ValueError, AttributeError, OSError):
            message = exc.reason
        raise ApiRefusal(f"{method} {path}: {exc.code} {message}", exc.code, str(message)) from None
    except urllib.error.URLError as exc:
        kind = ApiUnreachable if isinstance(exc.reason, ConnectionRefusedError) else ActivationError
        raise kind(f"cannot reach the orchestrator at {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:
        raise ActivationError(f"{method} {path} at {url} failed: {exc}") from None


def _url_option(func: F) -> F:
    return click.option(
        "--url", help="The orchestrator's admin API (default: http://ACTIVATION_ADMIN_BIND, e.g. 127.0.0.1:8000)."
    )(func)


def _api(url: str | None, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    settings = _context().settings
    return api_call(url or default_url(settings.admin_bind), method, path, body, settings.admin_token)


@click.group("config", cls=Group)
def config_group() -> None:
    """Show or change the orchestrator's dispatch mode (token from ACTIVATION_ADMIN_TOKEN)."""


@config_group.command("get")
@_url_option
@_json_option
def config_get(url: str | None, as_json: bool) -> None:
    """Show the mode, the transport a dispatch would use now, and the metrics behind it."""
    config = _api(url, "GET", "/config")
    if as_json:
        print_json(config)
        return
    _print_config(config)


@config_group.command("set-mode")
@click.argument("mode", type=click.Choice(ORCHESTRATOR_MODES, case_sensitive=False))
@_url_option
@_json_option
def config_set_mode(mode: str, url: str | None, as_json: bool) -> None:
    """Set ORCHESTRATOR_MODE at run time: files, events or auto. It survives a restart."""
    config = _api(url, "POST", "/config", {"mode": mode.lower()})
    if as_json:
        print_json(config)
        return
    click.echo(f"mode {config.get('mode')}; a dispatch now uses {config.get('current_decision')}")
    if mode.lower() != "files" and config.get("events_available") is False:
        click.echo(f"activation: events cannot be used: {config.get('events_unavailable')}", err=True)


def _print_config(config: dict[str, Any]) -> None:
    metrics = config.get("metrics") or {}
    avg = metrics.get("avg_response_time_ms")
    click.echo(f"mode             {config.get('mode')}")
    if config.get("events_available") is False:
        click.echo(f"events           unavailable: {config.get('events_unavailable')}")
    click.echo(f"current decision {config.get('current_decision')} ({config.get('rule')}: {config.get('detail')})")
    click.echo(
        "metrics          "
        + ("avg response -" if avg is None else f"avg response {avg:g} ms over {metrics.get('response_samples')}")
        + f", {metrics.get('task_rate_per_min')} results/min"
    )
    queues = metrics.get("queue_sizes") or {}
    click.echo("queues           " + (" ".join(f"{w}={q}" for w, q in sorted(queues.items())) or "-"))
    for worker, decision in sorted((config.get("per_worker") or {}).items()):
        click.echo(f"  {worker:<14} {decision.get('transport'):<6} ({decision.get('rule')}: {decision.get('detail')})")


# -- the dead letter, on the spool ------------------------------------------------------------


@click.group("dlq", cls=Group)
def dlq_group() -> None:
    """Inspect, retry and purge the dead letter (tasks/.dead_letter/)."""


@dlq_group.command("list")
@click.option("--worker", help="Only this worker's dead letters.")
@_json_option
def dlq_list(worker: str | None, as_json: bool) -> None:
    """List dead letters, oldest first."""
    from activation.cli.tasks import skipped_note
    from activation.orchestrator.recovery import dead_letters

    skipped: list[str] = []
    letters = [d.summary() for d in dead_letters(_context().spool, skipped)]
    if worker:
        letters = [d for d in letters if d["worker"] == worker]
    note = skipped_note(skipped, "dead-letter record") if skipped else None
    if as_json:
        print_json(letters)
        if note:
            click.echo(note, err=True)
        return
    if not letters:
        click.echo("no dead letters" + (f"; {note}" if note else ""))
        return
    click.echo(f"{'ID':<32} {'WORKER':<12} {'REASON':<16} {'DEAD SINCE':<32}  DETAIL")
    for d in letters:
        mark = "" if d["retryable"] else "  (not retryable: original did not parse)"
        click.echo(f"{d['id']:<32} {d['worker'] or '-':<12} {d['reason']:<16} {d['dead_at']!s:<32} {d['detail']}{mark}")
    if note:
        click.echo(note)


@dlq_group.command("show")
@click.argument("dead_id", metavar="ID")
@_json_option
def dlq_show(dead_id: str, as_json: bool) -> None:
    """Show one dead letter: why it died, and its task."""
    from activation.orchestrator.recovery import get_dead_letter

    letter = get_dead_letter(_context().spool, dead_id)
    if as_json:
        print_json(letter.record)
        return
    record = letter.record
    task = record.get("task")
    rows = [
        ("dead letter", letter.key),
        ("task", record.get("task_id") or "-"),
        ("worker", record.get("worker") or "-"),
        ("reason", f"{record.get('reason')}: {record.get('detail')}"),
        ("dead since", record.get("dead_at")),
        ("from", record.get("source")),
    ]
    if isinstance(task, dict):
        rows += [
            ("attempts", task.get("attempts", 0)),
            ("timeout", "-" if task.get("timeout") is None else f"{task.get('timeout')} s"),
            ("metadata", _pairs(task.get("metadata"))),
            ("description", task.get("description")),
        ]
    else:
        rows.append(("original", f"did not parse; kept at {record.get('raw')}, cannot be retried"))
    for label, value in rows:
        click.echo(f"{label + ':':<13} {value}")
    if isinstance(task, dict):
        for entry in task.get("history") or []:
            click.echo(f"{'earlier:':<13} {entry}")
        click.echo(f"retry with `activation dlq retry {letter.key}` (--description, --timeout, --meta fix it first)")


def _pairs(value: object) -> str:
    return " ".join(f"{k}={v}" for k, v in value.items()) or "-" if isinstance(value, dict) else str(value or "-")


@dlq_group.command("retry")
@click.argument("dead_id", metavar="[ID]", required=False)
@click.option("--all", "retry_all", is_flag=True, help="Retry every retryable dead letter.")
@click.option("--description", help="Replace the task's description first.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Set the task's timeout (s) first.")
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", help="Set a metadata key first; repeatable.")
@_json_option
def dlq_retry(
    dead_id: str | None,
    retry_all: bool,
    description: str | None,
    timeout: float | None,
    meta: tuple[str, ...],
    as_json: bool,
) -> None:
    """Put a dead letter's task back in its worker's inbox under the same id, keeping its history;
    --description, --timeout and --meta fix the task first. In streams mode it is dispatched
    again under its id (the outbox keeps it until its new result comes)."""
    from activation.cli import _parse_meta
    from activation.orchestrator.dlq_fix import fix_dead_letter
    from activation.orchestrator.recovery import DeadLetterError, dead_letters, retry_dead_letter

    if bool(dead_id) == retry_all:
        _fail("give one dead letter ID or --all", usage=True)
    fixes = description is not None or timeout is not None or bool(meta)
    if fixes and retry_all:
        _fail("--description, --timeout and --meta fix one dead letter: give its ID, not --all", usage=True)
    context = _context()
    spool = context.spool
    with _redispatch(context) as send:
        if dead_id:
            if fixes:
                metadata = _parse_meta(meta)
                fix_dead_letter(
                    spool,
                    dead_id,
                    description=description,
                    timeout=timeout,
                    metadata=metadata,
                    max_timeout=context.settings.max_task_timeout,
                )
            retried = retry_dead_letter(spool, dead_id, send=send)
            if as_json:
                print_json(retried.as_dict())
            else:
                click.echo(f"{retried.task_id} back in {retried.worker}'s inbox")
            return
        done, failed = [], []
        for letter in dead_letters(spool):
            if not letter.retryable:
                continue
            try:
                done.append(retry_dead_letter(spool, letter.key, send=send).as_dict())
            except (DeadLetterError, Unavailable) as exc:
                failed.append({"id": letter.key, "error": str(exc)})
    if as_json:
        print_json({"retried": done, "failed": failed})
    else:
        for item in done:
            click.echo(f"{item['task_id']} back in {item['worker']}'s inbox")
        for item in failed:
            click.echo(f"activation: {item['error']}", err=True)
        click.echo(f"{len(done)} retried, {len(failed)} failed")
    if failed:
        sys.exit(1)


@contextlib.contextmanager
def _redispatch(context: Context) -> Iterator[Callable[[str, dict[str, Any]], None] | None]:
    """In streams mode, how a retried dead letter is dispatched again (its id kept); else None."""
    if context.settings.transport != "streams":
        yield None
        return
    from activation.orchestrator.relay import StreamsRelay, redispatcher

    relay = StreamsRelay(context.spool, context.settings)
    try:
        yield redispatcher(relay)
    finally:
        relay.close()


@dlq_group.command("purge")
@click.option("--older-than", "older_than", required=True, metavar="DURATION", help="e.g. 7d, 12h, 30m, 90s.")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@_json_option
def dlq_purge(older_than: str, dry_run: bool, as_json: bool) -> None:
    """Delete dead letters (and their raw originals) older than DURATION."""
    from activation.orchestrator.recovery import parse_duration, purge_dead_letters

    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        _fail(f"--older-than: {exc}", usage=True)
    purged = purge_dead_letters(_context().spool, seconds, dry_run=dry_run)
    if as_json:
        print_json({"dry_run": dry_run, "purged": [d.summary() for d in purged]})
        return
    verb = "would delete" if dry_run else "deleted"
    for letter in purged:
        click.echo(f"{verb} {letter.key} ({letter.record.get('reason')}, {letter.record.get('dead_at')})")
    click.echo(f"{len(purged)} dead letters {'would be deleted (dry run)' if dry_run else 'deleted'}")


# -- recovery, on the spool -------------------------------------------------------------------


@click.command("recover")
@click.option("--dry-run", is_flag=True, help="Only say what would be done.")
@_json_option
def recover_command(dry_run: bool, as_json: bool) -> None:
    """Settle the claims of workers whose executor is provably gone (requeued, or dead-lettered).

    Orphans need a watch over time (no sign of life for ACTIVATION_ORPHAN_AGE, on one clock): the
    orchestrator keeps that watch and dead-letters them; one run of this command never does.
    """
    from activation.orchestrator.recovery import recover

    obj = _context()
    if obj.settings.transport == "streams":
        # This spool is the outbox; the replicas' claims are leases in Redis, reclaimed there.
        click.echo("nothing to recover here: with ACTIVATION_TRANSPORT=streams, replicas reclaim lapsed leases")
        return
    try:
        settings = obj.settings
        actions = recover(
            obj.spool,
            orphan_age=settings.orphan_age,
            stopped_grace=settings.stopped_grace,
            max_attempts=settings.max_attempts,
            dry_run=dry_run,
        )
    except ActivationError as exc:
        _fail(str(exc), usage=isinstance(exc, ConfigError))
    except OSError as exc:
        _fail(str(exc))
    if as_json:
        print_json({"dry_run": dry_run, "actions": [a.as_dict() for a in actions]})
        return
    for action in actions:
        click.echo(f"{action.action:<14} {action.worker:<12} {action.task_id}  {action.detail}")
    count = f"{len(actions)} task{'' if len(actions) == 1 else 's'}"
    click.echo(f"{count} {'to recover (dry run)' if dry_run else 'recovered'}")


# -- the program ------------------------------------------------------------------------------


@click.command("orchestrator")
def orchestrator_command() -> None:
    """Hand out tasks, rescue dead workers' tasks, serve the admin API (as supervisord runs it)."""
    from activation.config import load_settings
    from activation.lifecycle import run_program
    from activation.procctl import make_undumpable

    make_undumpable()  # first: the admin token and the Redis password stay this process's own
    # The orchestrator keeps its metrics in its own registry; a multiprocess folder inherited
    # from a worker's environment would divert them into files nobody serves.
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    from activation.orchestrator.service import Orchestrator

    try:
        settings = load_settings()
        setup_logging(settings)
        orchestrator = Orchestrator(settings)
    except ConfigError as exc:
        _fail(str(exc), usage=True)
    try:
        orchestrator.open_api()  # bind now, so a taken port is one line here, not a traceback later
    except OSError as exc:
        _fail(f"cannot bind the admin API on {settings.admin_bind}: {exc.strerror or exc}")
    sys.exit(run_program(orchestrator))
