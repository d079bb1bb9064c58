"""``activation cancel``: cancel through spool.cancel, and for a running task wait until its
executor has killed the tree and written the ``cancelled`` result."""

from __future__ import annotations

import time

import click

from activation.cli.support import fail, print_json
from activation.config import Settings
from activation.errors import StreamsError
from activation.spool.cancel import Cancelled, CannotCancel, cancel_task, clear_request
from activation.spool.layout import Spool
from activation.spool.readers import BadRecord, read_record, result_record

POLL = 0.05


def cancel_and_wait(
    spool: Spool, task_id: str, *, wait: bool, timeout: float, as_json: bool, settings: Settings | None = None
) -> None:
    """``settings`` with ACTIVATION_TRANSPORT=streams: the cancel goes through Redis (this is the
    orchestrator's spool, the task in its outbox), and a running task's holder is asked there."""
    try:
        if settings is not None and settings.transport == "streams":
            cancelled = _cancel_streamed(settings, spool, task_id)
        else:
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
            click.echo(f"{task_id}: cancel requested; {worker}'s executor kills its tree within moments")
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
        result = read_record(path, lambda value: result_record(value, task_id=task_id))
    except (OSError, BadRecord) as exc:
        fail(f"{task_id}: ended, but its result cannot be read: {exc}")
    status = result["status"]
    if status != "cancelled":
        clear_request(spool, worker, task_id)
        fail(f"cannot cancel {task_id}: it finished first ({status})")
    if as_json:
        print_json({**cancelled.as_dict(), "status": "cancelled", "path": str(path)})
        return
    from activation.cli.explain import how_killed

    how = how_killed(result.get("kill"))
    click.echo(f"{task_id}: cancelled (was running on {worker}" + (f"; {how})" if how else ")"))


def _cancel_streamed(settings: Settings, spool: Spool, task_id: str) -> Cancelled:
    """Through the spool's orchestrator when one answers (it holds the Redis connection and the
    outbox's relay: one cancel path, as `dispatch` has), else on the outbox here."""
    from activation.orchestrator.endpoint import read_endpoint

    url = read_endpoint(spool)
    if url is not None:
        cancelled = _through_api(url, task_id, settings.admin_token)
        if cancelled is not None:
            return cancelled
    from activation.transport.streams import outbox
    from activation.transport.streams.client import StreamsTransport
    from activation.transport.streams.connect import connect

    try:
        link = connect(settings)
        return outbox.cancel_dispatched(
            lambda worker: StreamsTransport(link, worker, lease=settings.lease, retention=settings.stream_retention),
            spool,
            task_id,
            by="cli",
        )
    except StreamsError as exc:
        fail(f"cannot cancel {task_id} now: {exc}")


def _through_api(url: str, task_id: str, token: str | None) -> Cancelled | None:
    """POST /tasks/<id>/cancel; None when nothing answered (nothing was sent)."""
    from urllib.parse import quote

    from activation.cli.admin import ApiRefusal, ApiUnreachable, api_call

    try:
        answer = api_call(url, "POST", f"/tasks/{quote(task_id, safe='')}/cancel", None, token)
    except ApiUnreachable:
        return None
    except ApiRefusal as exc:
        if exc.status in (404, 409):
            raise CannotCancel(exc.message, None if exc.status == 404 else "done") from None
        fail(f"cannot cancel {task_id} now: {exc.message}")
    fields = answer if isinstance(answer, dict) else {}
    try:
        return Cancelled(
            task_id=str(fields["task_id"]),
            worker=str(fields["worker"]),
            path=str(fields.get("path", "")),
            status=str(fields.get("status", "cancelled")),
            was=str(fields.get("while", "pending")),
        )
    except KeyError:
        fail(f"POST /tasks/{task_id}/cancel at {url}: the answer is not a cancel ({answer!r:.200})")
