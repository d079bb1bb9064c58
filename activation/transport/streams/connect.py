"""The Redis client of the streams transport, built from settings: one server, a Cluster, or Sentinel.

With REDIS_SENTINELS set, the primary named REDIS_SENTINEL_MASTER is found through Sentinel
(redis-py's `Sentinel`), and REDIS_URL, if set, only gives the user, password and database.
No client retries a command on its own: every script is safe to replay, but a caller must know
when an answer was lost, so it decides (see client.py).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException
from redis.retry import Retry
from redis.sentinel import Sentinel

from activation.config import Settings, redact_url
from activation.errors import StreamsError
from activation.transport.pubsub import describe

RedisClient = redis.Redis | RedisCluster
# redis-py's cluster client raises some failures (no node reachable, slots not covered) outside
# the RedisError tree; every caller catches both.
REDIS_ERRORS = (redis.RedisError, RedisClusterException)

# Long enough for the longest blocking read the transport makes (client.MAX_BLOCK), plus slack.
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 2.0


def connect(settings: Settings, *, socket_timeout: float = SOCKET_TIMEOUT) -> RedisClient:
    """The client for settings.redis_url / redis_cluster / redis_sentinels, replies decoded as text.

    The lease keeper wants a client of its own with a ``socket_timeout`` well under the lease
    (and no blocking reads): a renewal stuck on a cut network must not hold up the executor's
    loop past the moment it has to give the lease up.
    """
    common: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": min(CONNECT_TIMEOUT, socket_timeout),
        "socket_timeout": socket_timeout,
    }
    try:
        if settings.redis_sentinels:
            return _through_sentinel(settings, common)
        if not settings.redis_url:
            raise StreamsError("the streams transport needs REDIS_URL or REDIS_SENTINELS")
        if settings.redis_cluster:
            return RedisCluster.from_url(settings.redis_url, retry=Retry(NoBackoff(), 0), **common)
        return redis.Redis.from_url(settings.redis_url, retry=Retry(NoBackoff(), 0), **common)
    except (ValueError, *REDIS_ERRORS) as exc:
        where = redact_url(settings.redis_url) if settings.redis_url else "REDIS_SENTINELS"
        raise StreamsError(f"cannot connect to {where}: {describe(exc, settings.redis_url or '')}") from None


def _through_sentinel(settings: Settings, common: dict[str, Any]) -> redis.Redis:
    auth: dict[str, Any] = {}
    if settings.redis_url:
        parts = urlsplit(settings.redis_url)
        if parts.username:
            auth["username"] = unquote(parts.username)
        if parts.password:
            auth["password"] = unquote(parts.password)
        database = parts.path.lstrip("/")
        if database.isdigit():
            auth["db"] = int(database)
    # redis-py leaves Sentinel untyped; its public API is all we use.
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(settings.redis_sentinels),
        socket_connect_timeout=CONNECT_TIMEOUT,
        socket_timeout=CONNECT_TIMEOUT,
    )
    client: redis.Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master, retry=Retry(NoBackoff(), 0), **common, **auth
    )
    return client
