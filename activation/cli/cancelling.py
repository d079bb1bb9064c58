"""``activation cancel``: cancel through spool.cancel, and for a running task wait until its
executor has killed the tree and written the ``cancelled`` result."""

from __future__ import annotations

import time

import click

from activation.cli.support import fail, print_json
from activation.spool.atomic import read_json
from activation.spool.cancel import CannotCancel, cancel_task, clear_request
from activation.spool.layout import Spool

POLL = 0.05


def cancel_and_wait(spool: Spool, task_id: str, *, wait: bool, timeout: float, as_json: bool) -> None:
    try:
        cancelled = cancel_task(spool, task_id, by="cli")
    except CannotCancel as exc:
        fail(str(exc))
    if cancelled.status == "cancelled":
        if as_json:
            print_json(cancelled.as_dict())
        else:
            click.echo(f"{task_id}: cancelled (was pending for {cancelled.worker})")
        return
    worker = cancelled.worker
    if not wait:
        if as_json:
            print_json(cancelled.as_dict())
        else:
            click.echo(f"{task_id}: cancel requested; {worker}'s executor kills its tree within a tick")
        return
    deadline = time.monotonic() + timeout
    path = spool.result_path(worker, task_id)
    while not path.exists():
        if time.monotonic() >= deadline:
            fail(
                f"{task_id}: cancel requested, but {worker}'s executor has not ended it within {timeout:g} s "
                "(is the executor running?); the request stands"
            )
        time.sleep(POLL)
    try:
        result = read_json(path)
    except (OSError, ValueError) as exc:
        fail(f"{task_id}: ended, but its result cannot be read: {exc}")
    status = result.get("status") if isinstance(result, dict) else None
    if status != "cancelled":
        clear_request(spool, worker, task_id)
        fail(f"cannot cancel {task_id}: it finished first ({status})")
    if as_json:
        print_json({**cancelled.as_dict(), "status": "cancelled", "path": str(path)})
        return
    from activation.cli.explain import how_killed

    how = how_killed(result.get("kill"))
    click.echo(f"{task_id}: cancelled (was running on {worker}" + (f"; {how})" if how else ")"))
