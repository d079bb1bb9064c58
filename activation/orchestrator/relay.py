"""The orchestrator's streams side (ACTIVATION_TRANSPORT=streams): which roles it serves, and its loop.

Roles served: every worker with an outbox folder in the orchestrator's spool (``inbox/<worker>/``,
made by ``activation init <worker>`` or by an earlier dispatch), plus every role that has a live
replica heartbeat in Redis (its outbox folder is then made, so it can be dispatched to at once).

Each pass, per role (transport/streams/outbox.py does the work):
- the outbox is sent again when the role's marker key is missing (first pass, or Redis restarted
  without persistence and lost streams, groups and task ids) and after every outage: a task kept
  in the outbox while Redis was unreachable goes then; dispatch is idempotent, so only lost ones go;
- results and dead letters are mirrored into the spool, where files mode would put them.

Redis unreachable: one warning when the outage starts, one line when it ends (redis_link.Outage),
Redis left alone meanwhile for a capped backoff; /status and ``activation check`` say so.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from activation.config import WORKER_NAME_PATTERN, Settings, redact_url
from activation.errors import StreamsError, Unavailable
from activation.spool.health import WorkerHealth
from activation.spool.layout import Spool
from activation.spool.records import ReplicaState
from activation.transport.redis_link import Outage
from activation.transport.streams import outbox
from activation.transport.streams.client import StreamsTransport
from activation.transport.streams.connect import REDIS_ERRORS, RedisClient, connect
from activation.transport.streams.keys import StreamKeys

log = logging.getLogger("activation.orchestrator")

REPLICAS_PATTERN = StreamKeys("x").replicas.replace("{activation:x}", "{activation:*}")
ROLE_PREFIX, ROLE_SUFFIX = "{activation:", "}:replicas"
ORCHESTRATOR_CONSUMER = "orchestrator"  # it never reads the task streams: the name is only a label
ROLES_INTERVAL = 5.0  # seconds between SCANs for roles seen in Redis: a pass itself stays a few commands


class StreamsRelay:
    """The roles' streams transports on one Redis client, the outbox resend and the mirror."""

    def __init__(self, spool: Spool, settings: Settings, client: RedisClient | None = None) -> None:
        self.spool = spool
        self.settings = settings
        self._client = client
        self._transports: dict[str, StreamsTransport] = {}
        self._lock = threading.Lock()  # request threads and the loop share the transports
        where = redact_url(settings.redis_url) if settings.redis_url else "REDIS_SENTINELS"
        self.outage = Outage(
            log,
            f"{where} (streams transport)",
            cap=settings.redis_backoff_max,
            consequence="dispatched tasks wait in the outbox and results in Redis",
        )
        self._resend_all = True  # the first pass sends the outbox: a crash may have left tasks unsent
        self.passes = 0  # finished passes: tests wait on it
        self._roles: list[str] = []
        self._next_scan = 0.0

    # -- what the dispatcher and the views ask for ----------------------------------------------

    def transport(self, worker: str) -> StreamsTransport:
        with self._lock:
            found = self._transports.get(worker)
            if found is None:
                found = self._transports[worker] = StreamsTransport(
                    self.client(),
                    worker,
                    consumer=ORCHESTRATOR_CONSUMER,
                    lease=self.settings.lease,
                    max_attempts=self.settings.max_attempts,
                    retention=self.settings.stream_retention,
                )
            if worker not in self._roles:  # dispatched to before the next SCAN: serve it at once
                self._roles = sorted({*self._roles, worker})
            return found

    def client(self) -> RedisClient:
        if self._client is None:
            self._client = connect(self.settings)
        return self._client

    def roles(self) -> list[str]:
        """Outbox folders, and roles with a live replica (whose outbox folder is made here)."""
        roles = {w for w in self.spool.workers() if self.spool.inbox(w).is_dir()}
        seen = set(self.seen_roles()) - roles
        if seen:
            self.spool.init(sorted(seen))
            log.info("serving role(s) seen in Redis: %s", ", ".join(sorted(seen)), extra={"event": "roles_seen"})
        return sorted(roles | seen)

    def seen_roles(self) -> list[str]:
        """Roles with a replica index in Redis (SCAN; on a Cluster, redis-py scans every primary)."""
        found = []
        try:
            for key in self.client().scan_iter(match=REPLICAS_PATTERN, count=200):
                name = str(key)
                if name.startswith(ROLE_PREFIX) and name.endswith(ROLE_SUFFIX):
                    role = name[len(ROLE_PREFIX) : -len(ROLE_SUFFIX)]
                    if WORKER_NAME_PATTERN.match(role):
                        found.append(role)
        except REDIS_ERRORS as exc:
            raise StreamsError(f"SCAN for replica indexes failed: {exc}") from None
        return found

    def replicas(self, worker: str) -> dict[str, ReplicaState]:
        """Each live replica of ``worker`` and the heartbeat state it published; StreamsError when down."""
        found: dict[str, ReplicaState] = self._guard(lambda: self.transport(worker).replicas())
        return found

    def status(self) -> dict[str, Any]:
        """For /status: Redis's state and each role's replicas."""
        answer: dict[str, Any] = {"transport": "streams", "redis": "up", "replicas": {}}
        for worker in sorted(w for w in self.spool.workers() if self.spool.inbox(w).is_dir()):
            try:
                answer["replicas"][worker] = self.replicas(worker)
            except StreamsError as exc:
                answer["redis"] = f"unreachable: {exc}"
                answer["replicas"] = None
                break
        return answer

    def healths(self, dead_letters: dict[str | None, int] | None = None) -> list[WorkerHealth]:
        """Each role's health from its replicas' heartbeats: alive while one replica beats."""
        found = []
        error = None
        for worker in sorted(w for w in self.spool.workers() if self.spool.inbox(w).is_dir()):
            replicas: dict[str, ReplicaState] = {}
            if error is None:
                try:
                    replicas = self.replicas(worker)
                except StreamsError as exc:
                    error = str(exc)
            found.append(role_health(worker, replicas, (dead_letters or {}).get(worker, 0), error))
        return found

    def resend_soon(self) -> None:
        """A dispatch could not send its task (Redis failed it): re-send the outbox at the next pass."""
        self._resend_all = True

    # -- the loop's pass ------------------------------------------------------------------------

    def step(self) -> int:
        """One pass over every role; how many results and dead letters were mirrored.

        Redis unreachable is no error here: the outage is logged once and the pass skipped until
        the backoff is over.
        """
        if not self.outage.ready():
            return 0
        mirrored = 0
        try:
            if time.monotonic() >= self._next_scan or self._resend_all:
                self._roles = self.roles()
                self._next_scan = time.monotonic() + ROLES_INTERVAL
            for worker in list(self._roles):
                mirrored += self._serve(worker)
        except StreamsError as exc:
            self.outage.failed(str(exc))
            self._resend_all = True  # what was dispatched meanwhile sits in the outbox
            return mirrored
        if self.outage.down:
            self.outage.recovered()
        self._resend_all = False
        self.passes += 1
        return mirrored

    def _serve(self, worker: str) -> int:
        transport = self.transport(worker)
        marker = transport.keys.outbox_marker
        lost = not self._guard(lambda: self.client().exists(marker))
        if lost or self._resend_all:
            if lost and not self._resend_all:
                log.warning(
                    "redis lost the streams of %s (restarted without persistence?): re-sending its outbox",
                    worker,
                    extra={"worker": worker, "event": "outbox_resend"},
                )
            transport.ensure_groups()
            outbox.resend_outbox(transport, self.spool, worker)
            self._guard(lambda: self.client().set(marker, "1"))
        return outbox.mirror(transport, self.spool, worker)

    def _guard(self, call: Any) -> Any:
        try:
            return call()
        except REDIS_ERRORS as exc:
            raise StreamsError(f"streams transport: {exc}") from None

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(*REDIS_ERRORS):
                client.close()


def role_health(
    worker: str, replicas: Mapping[str, ReplicaState], dead_letters: int, redis_error: str | None
) -> WorkerHealth:
    """A role's health from its replicas' states (typed by spool.readers.replica_state): alive while
    one beats; a replica whose state was unreadable still beats, and is one problem line."""
    problems = []
    if redis_error is not None:
        problems.append(f"its replicas cannot be seen: redis unreachable ({redis_error})")
    elif not replicas:
        problems.append("no live replica: no heartbeat key in Redis")
    states = list(replicas.values())
    unreadable = [s["problem"] for s in states if "problem" in s]
    if unreadable:
        problems.append(f"{len(unreadable)} replica state(s) unreadable, first {unreadable[0]}")
    tasks = [task for s in states if (task := s.get("current_task"))]
    queues = [queue for s in states if (queue := s.get("queue_size")) is not None]
    return WorkerHealth(
        worker=worker,
        alive=bool(replicas),
        age_s=None,
        state="running" if replicas else None,
        current_task=tasks[0] if tasks else None,
        queue_size=sum(queues) if queues else None,
        dead_letters=dead_letters,
        problems=problems,
    )


def redispatcher(relay: StreamsRelay | None) -> Callable[[str, dict[str, Any]], None] | None:
    """For recovery.retry_dead_letter in streams mode: send the revived task, dead id allowed."""
    if relay is None:
        return None

    def send(worker: str, task: dict[str, Any]) -> None:
        try:
            relay.transport(worker).dispatch(task["task_id"], task, allow_dead=True)
        except StreamsError as exc:
            raise Unavailable(f"{exc}; the dead letter stays where it is") from None

    return send
