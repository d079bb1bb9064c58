"""Wake sources: every way the listener learns that "a task may be ready", behind one interface.

base (the interface, a threaded base, the test stub), inotify, poll, redis (pub/sub), and messages
(the one validator of what others tell us). `build_sources` turns ACTIVATION_MODE into sources.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from activation.config import Settings
from activation.spool.layout import Spool
from activation.worker.wake.base import EventsLost, WakeSource

log = logging.getLogger("activation.listener")

SourceFactory = Callable[[Settings, Spool, EventsLost], WakeSource]


def _inotify(settings: Settings, spool: Spool, events_lost: EventsLost) -> WakeSource:
    # Imported here: a poll-only worker never loads watchdog.
    from activation.worker.wake.inotify import InotifySource

    return InotifySource(spool.inbox(settings.require_worker()), lambda: events_lost("overflow"))


def _poll(settings: Settings, spool: Spool, events_lost: EventsLost) -> WakeSource:
    from activation.worker.wake.poll import PollSource

    return PollSource(spool, settings.require_worker(), settings.poll_interval)


def _redis(settings: Settings, spool: Spool, events_lost: EventsLost) -> WakeSource:
    # Imported here: a worker that does not use Redis never loads redis-py.
    from activation.worker.wake.redis import RedisSource

    return RedisSource(
        spool,
        settings.require_worker(),
        settings.redis_url or "",
        backoff_max=settings.redis_backoff_max,
        on_subscribed=lambda: events_lost("redis subscribed"),
    )


# ACTIVATION_MODE name -> factory.
SOURCE_FACTORIES: dict[str, SourceFactory] = {"inotify": _inotify, "poll": _poll, "redis": _redis}
FILE_SOURCES = ("inotify", "poll")


def build_sources(settings: Settings, spool: Spool, events_lost: EventsLost) -> list[WakeSource]:
    """The wake sources ``settings.mode`` asks for; the listener's periodic rescan runs besides them.

    Redis is at-most-once and only hears what someone publishes, so a mode with ``redis`` but no
    file source also polls the inbox every ``ACTIVATION_POLL_INTERVAL`` as its safety net.
    """
    extra = {"worker": settings.worker_name, "event": "source_missing"}
    modes = list(settings.mode)
    if "redis" in modes and not any(m in modes for m in FILE_SOURCES):
        modes.append("poll")
    sources = []
    for mode in modes:
        if mode == "redis" and not settings.redis_url:
            log.error(
                "ACTIVATION_MODE includes redis but REDIS_URL is not set; waking on files only",
                extra=extra,
            )
            continue
        factory = SOURCE_FACTORIES.get(mode)
        if factory is None:
            log.warning(
                "wake source %r is not implemented; relying on the rescan every %gs",
                mode,
                settings.rescan_interval,
                extra=extra,
            )
            continue
        sources.append(factory(settings, spool, events_lost))
    return sources
