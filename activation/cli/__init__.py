"""The ``activation`` command: administration, and the programs that supervisord runs.

Settings come from the environment (see config.py); a few options override them. Every error
ends in a one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, cast

import click

from activation import __version__
from activation.cli.support import EXIT_FAILED, EXIT_USAGE, Context, Group, fail, pass_ctx, print_json
from activation.spool.layout import Spool

if TYPE_CHECKING:
    from activation.spool.records import DeadLetterRecord, ResultRecord


@click.group(cls=Group)
@click.version_option(__version__, prog_name="activation")
@click.option(
    "--spool",
    type=click.Path(path_type=Path),
    envvar="ACTIVATION_SPOOL",
    help="Spool root (env ACTIVATION_SPOOL; default: the var/spool of this folder or the nearest one above).",
)
@click.pass_context
def main(ctx: click.Context, spool: Path | None) -> None:
    """Wake AI-agent workers the moment a task arrives, and lose no task on the way."""
    # Whatever a record holds (a file name that is not UTF-8, say), printing it is no crash.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")  # type: ignore[union-attr]
    source = None
    if spool is not None:
        given = ctx.get_parameter_source("spool")
        source = "ACTIVATION_SPOOL" if given is click.core.ParameterSource.ENVIRONMENT else "--spool"
    ctx.obj = Context(spool.absolute() if spool else None, source)


# -- spool administration -----------------------------------------------------------------


@main.command()
@click.argument("workers", nargs=-1)
@pass_ctx
def init(obj: Context, workers: tuple[str, ...]) -> None:
    """Create the spool layout, with an inbox for each WORKER."""
    from activation.config import WORKER_NAME_PATTERN

    for worker in workers:
        if not WORKER_NAME_PATTERN.match(worker):
            fail(f"invalid worker name {worker!r}", EXIT_USAGE)
    spool = Spool(obj.settings.spool)  # init is the one command that may create a spool
    spool.init(workers)
    click.echo(f"spool ready at {spool.root}" + (f" for {', '.join(workers)}" if workers else ""))


def _parse_meta(pairs: tuple[str, ...]) -> dict[str, str]:
    meta = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--meta expects KEY=VALUE, got {pair!r}", EXIT_USAGE)
        meta[key] = value
    return meta


@main.command()
@click.argument("worker")
@click.argument("description")
@click.option("--task-id", help="Task id (default: time-sortable and unique).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), help="Agent timeout in seconds.")
@click.option("--meta", "meta", multiple=True, metavar="KEY=VALUE", help="Metadata copied into the result; repeatable.")
@click.option(
    "--transport",
    type=click.Choice(["files", "events"]),
    help="Force files, or events (also PUBLISH activate:<worker>; needs REDIS_URL, falls back to files). "
    "Default: the spool's orchestrator decides (its mode), else files.",
)
@click.option("--wait", is_flag=True, help="Block until the result, print it, exit 1 unless it completed.")
@click.option("--wait-timeout", type=click.FloatRange(min=0), help="Give up waiting after this many seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def dispatch(
    obj: Context,
    worker: str,
    description: str,
    task_id: str | None,
    timeout: float | None,
    meta: tuple[str, ...],
    transport: str | None,
    wait: bool,
    wait_timeout: float | None,
    as_json: bool,
) -> None:
    """Give WORKER a task and print its id: through the spool's orchestrator when one answers
    (POST /tasks: its mode decides, its metrics count), else written here the same way.

    With ACTIVATION_TRANSPORT=streams the task is kept in this spool's outbox and sent as a
    stream entry; a task id already dispatched is refused, and nothing is sent twice.
    """
    from activation.cli.dispatching import submit
    from activation.orchestrator import dispatch as dispatching

    settings = obj.settings
    body: dict[str, Any] = {"worker": worker, "description": description}
    if task_id is not None:
        body["task_id"] = task_id
    if timeout is not None:
        body["timeout"] = timeout
    metadata = _parse_meta(meta)
    if metadata:
        body["metadata"] = metadata
    if transport is not None and settings.transport == "streams":
        fail(f"--transport {transport}: ACTIVATION_TRANSPORT=streams sends every task by stream", EXIT_USAGE)
    sent = submit(obj.spool, settings, body, transport)
    if sent.get("fallback"):
        click.echo(f"activation: events unavailable, the file delivers: {sent['fallback']}", err=True)
    if not wait:
        if as_json:
            print_json(sent)
        else:
            click.echo(sent["task_id"])
        return
    redis_url = settings.redis_url if settings.transport != "streams" else None
    from activation.cli.progress import WaitProgress

    task_id = sent["task_id"]
    probe = None
    if settings.transport == "streams" and not as_json:
        from activation.cli.remote import HeldProbe

        probe = HeldProbe(settings, worker, task_id)
    progress = WaitProgress(obj.spool, worker, task_id, held=probe) if not as_json else contextlib.nullcontext()
    try:
        with progress:
            location = dispatching.wait_for_outcome(obj.spool, worker, task_id, wait_timeout, redis_url=redis_url)
    finally:
        if probe is not None:
            probe.close()
    outcome = dispatching.read_outcome(location)
    if as_json:
        print_json(outcome)
    else:
        _print_outcome(location.state, outcome)
    if location.state != "done" or outcome.get("status") != "completed":
        sys.exit(EXIT_FAILED)


def _print_outcome(state: str, outcome: ResultRecord | DeadLetterRecord) -> None:
    from activation.cli.explain import outcome_notes

    if state == "dead" or "status" not in outcome:
        click.echo(f"{outcome.get('task_id')}: dead letter ({outcome.get('reason')}: {outcome.get('detail')})")
        return
    result = cast("ResultRecord", outcome)
    click.echo(
        f"{result['task_id']}: {result['status']} (exit {result.get('exit_code')}, "
        f"{result.get('duration_s') or 0:.3f}s, attempt {result.get('attempts')})"
    )
    for note in outcome_notes(result):
        click.echo(f"  {note}")
    stdout, stderr = result.get("stdout"), result.get("stderr")
    if stdout:
        click.echo(stdout, nl=not stdout.endswith("\n"))
    if stderr:
        click.echo(stderr, nl=not stderr.endswith("\n"), err=True)


@main.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def show(obj: Context, task_id: str, as_json: bool) -> None:
    """Show where TASK_ID is, and its result or dead-letter record."""
    from activation.orchestrator.dispatch import read_outcome, read_pending

    location = obj.spool.locate(task_id)
    if location is None:
        fail(f"no task {task_id!r} in {obj.spool.root}")
    finished = location.state in ("done", "dead")
    if as_json:
        pending = location.state in ("pending", "processing")
        record: object = read_outcome(location) if finished else read_pending(location) if pending else {}
        print_json({"state": location.state, "worker": location.worker, "path": str(location.path), "record": record})
        return
    click.echo(f"{task_id}: {location.state} (worker {location.worker}, {location.path})")
    if finished:  # a record that is none is one line (DispatchError), after the line that says where
        _print_outcome(location.state, read_outcome(location))


@main.command()
@click.argument("task_id")
@click.option("--no-wait", is_flag=True, help="A running task: only ask its executor, do not wait for the result.")
@click.option(
    "--wait-timeout",
    type=click.FloatRange(min=0),
    default=30.0,
    show_default=True,
    help="A running task: how long to wait for its cancelled result.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def cancel(obj: Context, task_id: str, no_wait: bool, wait_timeout: float, as_json: bool) -> None:
    """Cancel TASK_ID: a pending one never runs; a running one's tree is killed (SIGINT, grace, SIGKILL).

    Either way its result is `cancelled`. In streams mode, from the orchestrator's spool: through
    Redis, to the replica that holds it.
    """
    from activation.cli.cancelling import cancel_and_wait

    cancel_and_wait(obj.spool, task_id, wait=not no_wait, timeout=wait_timeout, as_json=as_json, settings=obj.settings)


# -- the programs supervisord runs ------------------------------------------------------------


def _run(program: str) -> NoReturn:
    """Run one program of a worker tree (worker/entry.py, which the console script also runs
    without click for exactly ``activation worker <program>``)."""
    from activation.worker.entry import run

    run(program)


@main.group()
def worker() -> None:
    """The worker's programs, as supervisord runs them (configured by environment)."""


@worker.command()
def listener() -> None:
    """Wake on new tasks and serve the work queue."""
    _run("listener")


@worker.command()
def executor() -> None:
    """Run the agent for each task, one at a time."""
    _run("executor")


@worker.command()
def heartbeat() -> None:
    """Report the worker's health and serve its metrics."""
    _run("heartbeat")


# -- health ---------------------------------------------------------------------------------


@main.command()
@click.argument("worker")
@pass_ctx
def check(obj: Context, worker: str) -> None:
    """Exit 0 when WORKER is alive and all its programs run, 1 otherwise (for HEALTHCHECK)."""
    from activation.spool.health import worker_health

    settings = obj.settings
    # In the worker's own container, also ask whether *this* tree runs it, or was refused.
    run_dir = settings.run_dir if settings.worker_name == worker else None
    health = worker_health(obj.spool, worker, timeout=settings.heartbeat_timeout, run_dir=run_dir)
    if settings.transport == "streams":
        health = _streams_health(obj, worker, health)
    if not health.healthy:
        fail(f"{worker} unhealthy: {'; '.join(health.problems)}")
    if health.age_s is None:  # streams, seen from elsewhere: the replicas' heartbeat keys
        click.echo(f"{worker} healthy ({health.state}; its replicas beat in Redis)")
        return
    click.echo(f"{worker} healthy (heartbeat {health.age_s:g}s ago)")


def _streams_health(obj: Context, worker: str, local: Any) -> Any:
    """In streams mode: the worker's own container keeps its heartbeat file, and needs Redis too;
    anywhere else (the orchestrator's host) only the replicas' heartbeats in Redis tell."""
    from activation.errors import StreamsError
    from activation.orchestrator.relay import StreamsRelay, role_health

    relay = StreamsRelay(obj.spool, obj.settings)
    try:
        replicas, error = relay.replicas(worker), None
    except StreamsError as exc:
        replicas, error = {}, str(exc)
    finally:
        relay.close()
    if obj.settings.worker_name == worker:
        if error is not None:
            local.problems.append(f"redis unreachable: {error}")
        return local
    return role_health(worker, replicas, 0, error)


@main.command()
@click.option(
    "--temp-age",
    type=click.FloatRange(min=0),
    default=600,
    show_default=True,
    help="Seconds before a temp file is stale.",
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def audit(obj: Context, temp_age: float, as_json: bool) -> None:
    """Check the spool's invariants; exit 1 and list each violation if any is broken."""
    from activation.spool.audit import audit as run_audit

    violations = run_audit(obj.spool, heartbeat_timeout=obj.settings.heartbeat_timeout, temp_age=temp_age)
    if as_json:
        print_json([v.as_dict() for v in violations])
    else:
        for v in violations:
            click.echo(f"{v.kind}: {v.task_id or '-'}: {v.detail}")
        click.echo(f"audit: {len(violations)} violation(s) in {obj.spool.root}", err=bool(violations))
    if violations:
        sys.exit(EXIT_FAILED)


@main.command()
@click.option("--workers", default="marie,anga,fabien", show_default=True, help="Comma-separated worker names.")
@pass_ctx
def up(obj: Context, workers: str) -> None:
    """Run a local stack in the foreground: one supervisord per worker, state under ./var/."""
    from activation.cli.localstack import run_local_stack

    names = [w.strip() for w in workers.split(",") if w.strip()]
    sys.exit(run_local_stack(obj.settings, names))


# -- the orchestrator and the operator's views: imported when used (support.Group's ``lazy``) --
main.lazy.update(
    {
        "orchestrator": "activation.cli.admin:orchestrator_command",
        "config": "activation.cli.admin:config_group",
        "dlq": "activation.cli.admin:dlq_group",
        "recover": "activation.cli.admin:recover_command",
        "tasks": "activation.cli.tasks:tasks_command",
        "status": "activation.cli.tasks:status_command",
        "results": "activation.cli.results:results_group",
        "where": "activation.cli.results:where_command",
        "logs": "activation.cli.logs:logs_command",
    }
)
