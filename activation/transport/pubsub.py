"""Redis events: the channel names, the connection, and best-effort publishing.

Redis only wakes; the spool delivers. So every function here fails fast and reports failure as
a value or a one-line `EventsError`, with the password redacted, never as a stall.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from activation.config import redact_url
from activation.errors import ActivationError

log = logging.getLogger("activation.events")



class EventsError(ActivationError):
    """Redis could not be reached or refused a command."""


def activate_channel(worker: str) -> str:
    return f"activate:{worker}"


def done_channel(worker: str) -> str:
    return f"done:{worker}"


def heartbeat_key(worker: str) -> str:
    return f"heartbeat:{worker}"


def connect(url: str, *, timeout: float = 2.0, for_pubsub: bool = False) -> redis.Redis:
    """A client for ``url`` (redis://, rediss:// for TLS, user, password, db) that fails fast.

    No retries: callers fall back to files or reconnect on their own schedule. A subscriber
    blocks in ``get_message(timeout=...)`` instead of a socket timeout.
    """
    try:
        return redis.Redis.from_url(
            url,
            socket_connect_timeout=timeout,
            socket_timeout=None if for_pubsub else timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=30 if for_pubsub else 0,
        )
    except (ValueError, redis.RedisError) as exc:
        raise EventsError(f"bad REDIS_URL {redact_url(url)}: {describe(exc)}") from None


def describe(exc: BaseException, url: str = "") -> str:
    """A one-line description of a Redis failure, safe to log: ``url``'s password is scrubbed from it."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for secret in passwords_of(url):
        text = text.replace(secret, "***")
    return text[:200]


def passwords_of(url: str) -> tuple[str, ...]:
    """The URL's password as written and as decoded, longest first (for scrubbing)."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return ()
    if not password:
        return ()
    return tuple(sorted({password, unquote(password)}, key=len, reverse=True))


def publish(client: redis.Redis, channel: str, message: str) -> int:
    """PUBLISH and return how many subscribers got it; raises EventsError."""
    try:
        receivers: Any = client.publish(channel, message)
        return int(receivers)
    except redis.RedisError as exc:
        raise EventsError(f"PUBLISH {channel} failed: {describe(exc)}") from None


def ping(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
