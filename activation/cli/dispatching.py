"""``activation dispatch``'s way to the one dispatch path (orchestrator/submit.py).

When the spool has an orchestrator (orchestrator/endpoint.py) and no ``--transport`` forces a
choice, the task goes through its ``POST /tasks``: the orchestrator's decision (``auto``), its
metrics, its answer. When none answers (the connection is refused, so nothing was sent), or a
transport is forced, this process runs the same Dispatcher on the spool itself. Either way a
refusal is the domain's error with the domain's message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from activation.config import Settings
from activation.errors import ActivationError
from activation.orchestrator.adaptive import Decision
from activation.orchestrator.http import DOMAIN_STATUS
from activation.orchestrator.submit import Dispatcher
from activation.spool.layout import Spool

if TYPE_CHECKING:
    from activation.orchestrator.dispatch import EventPublisher
    from activation.orchestrator.relay import StreamsRelay

# The API's refusal as the domain said it: the inverse of the one mapping, in orchestrator/http.
STATUS_ERROR: dict[int, type[ActivationError]] = {int(status): error for error, status in DOMAIN_STATUS.items()}


def submit(spool: Spool, settings: Settings, body: dict[str, Any], transport: str | None) -> dict[str, Any]:
    """Dispatch ``body`` as POST /tasks would; the answer (task_id, worker, transport, rule, via)."""
    if transport is None:
        from activation.orchestrator.endpoint import read_endpoint

        url = read_endpoint(spool)
        if url is not None:
            # Refused here as the orchestrator would refuse it, and before anything travels: what
            # JSON cannot carry (a lone surrogate from a non-UTF-8 argument) is named as such.
            _dispatcher(spool, settings, None).validate(body)
            answer = _through_api(url, body, settings.admin_token)
            if answer is not None:
                return {**answer, "via": url}
    return {**_here(spool, settings, body, transport), "via": "cli"}


def _through_api(url: str, body: dict[str, Any], token: str | None) -> dict[str, Any] | None:
    from activation.cli.admin import ApiRefusal, ApiUnreachable, api_call

    try:
        answer = api_call(url, "POST", "/tasks", body, token)
    except ApiUnreachable:
        return None  # nothing was sent: this process dispatches instead
    except ApiRefusal as exc:
        raise STATUS_ERROR.get(exc.status, ActivationError)(exc.message) from None
    if not isinstance(answer, dict):
        raise ActivationError(f"POST /tasks at {url}: the answer is not a JSON object")
    return answer


def _dispatcher(
    spool: Spool,
    settings: Settings,
    transport: str | None,
    publisher: EventPublisher | None = None,
    relay: StreamsRelay | None = None,
) -> Dispatcher:
    chosen = transport or "files"
    rule = f"--transport {transport}" if transport else "no orchestrator answers for this spool"
    return Dispatcher(
        spool,
        settings,
        decide=lambda worker: Decision(chosen, rule, rule),
        publisher=publisher,
        streams=relay.transport if relay is not None else None,
    )


def _here(spool: Spool, settings: Settings, body: dict[str, Any], transport: str | None) -> dict[str, Any]:
    chosen = transport or "files"
    relay = None
    publisher = None
    if settings.transport == "streams":
        if settings.worker_name:
            # A worker's spool is no outbox: its inbox is what the stream fills, and a task
            # written there would run here and again wherever its entry is delivered.
            raise ActivationError(
                f"this is worker {settings.worker_name}'s own spool (WORKER_NAME is set): with "
                "ACTIVATION_TRANSPORT=streams, dispatch on the orchestrator's host or through its API"
            )
        from activation.orchestrator.relay import StreamsRelay

        relay = StreamsRelay(spool, settings)
    elif chosen == "events" and settings.redis_url:
        from activation.orchestrator.dispatch import EventPublisher

        publisher = EventPublisher(settings.redis_url)
    dispatcher = _dispatcher(spool, settings, transport, publisher, relay)
    try:
        return dispatcher.submit(body).as_dict()
    finally:
        if publisher is not None:
            publisher.close()
        if relay is not None:
            relay.close()
