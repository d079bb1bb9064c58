"""The orchestrator program: hands out tasks, watches heartbeats, rescues dead workers' tasks, serves the admin API.

initialize loads the persisted mode, runs recovery and starts the API; each loop step refreshes
the adaptive metrics every few seconds and runs recovery every ACTIVATION_RECOVERY_INTERVAL;
shutdown stops the API. The routes of admin_api.py call the `Orchestrator`'s public methods.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest

from activation.clock import SYSTEM_CLOCK, Clock, iso_now
from activation.config import ORCHESTRATOR_MODES, Settings
from activation.errors import ActivationError, Broken, Conflict, Invalid, NotFound, StreamsError, Unavailable
from activation.lifecycle import Program
from activation.orchestrator import recovery
from activation.orchestrator.adaptive import MODE_CODES, Decision, ResultWindow, Snapshot, Thresholds, decide
from activation.orchestrator.dispatch import EventPublisher
from activation.orchestrator.endpoint import clear_endpoint, write_endpoint
from activation.orchestrator.http import AdminApi, check_bind, parse_bind
from activation.orchestrator.liveness import LivenessWatch
from activation.orchestrator.relay import StreamsRelay, redispatcher
from activation.orchestrator.submit import STREAMS, Dispatcher
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.cancel import Cancelled
from activation.spool.health import WorkerHealth, dead_letter_counts, worker_health
from activation.spool.layout import Spool
from activation.spool.readers import BadRecord, dead_letter_record, read_record, result_record
from activation.spool.retention import Sweeper
from activation.spool.status import live
from activation.transport.pubsub import EventsError

REFRESH_INTERVAL = 2.0  # seconds between metric refreshes: "every few seconds", and cheap
REFRESH_COST_FACTOR = 10.0  # wait at least this many times as long as the last refresh took
MAX_WAIT = 1.0  # the longest one loop step sleeps, so a stop is noticed promptly
HEALTH_LOG_GRACE = 5.0  # seconds of trouble before the log warns (status says it at once)
RELAY_INTERVAL = 0.25  # streams mode: seconds between passes that mirror results (dispatch --wait waits on it)
STATE_FILE = Path("orchestrator") / "state.json"  # under the spool root: survives a restart

log = logging.getLogger("activation.orchestrator")


def state_path(spool: Spool) -> Path:
    return spool.root / STATE_FILE


def load_mode(spool: Spool) -> str | None:
    """The mode last set through the API, or None (never set, or an unreadable state file)."""
    path = state_path(spool)
    try:
        state = read_json(path)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable %s: %s", path, exc, extra={"event": "state_unreadable"})
        return None
    mode = state.get("mode") if isinstance(state, dict) else None
    if mode not in ORCHESTRATOR_MODES:
        log.warning("ignoring %s: no valid mode in it", path, extra={"event": "state_unreadable"})
        return None
    return str(mode)


def save_mode(spool: Spool, mode: str) -> None:
    path = state_path(spool)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"mode": mode, "updated_at": iso_now()})


class OrchestratorMetrics:
    """The orchestrator's own registry: one process, so no multiprocess mode."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.dispatch = Counter(
            "dispatch",
            "Tasks dispatched, by the transport that carried the wake-up",
            ["worker", "transport"],
            registry=self.registry,
        )
        self.mode = Gauge("orchestrator_mode", "ORCHESTRATOR_MODE: 0 files, 1 events, 2 auto", registry=self.registry)
        self.heartbeat_age = Gauge(
            "worker_heartbeat_age_seconds",
            "Seconds since each worker's last heartbeat",
            ["worker"],
            registry=self.registry,
        )
        self.response_time = Gauge(
            "orchestrator_avg_response_time_ms",
            "Mean finished_at - created_at of the last 100 results",
            registry=self.registry,
        )
        self.task_rate = Gauge("orchestrator_task_rate_per_minute", "Results in the last 60 s", registry=self.registry)
        self.recovered = Counter(
            "orchestrator_recovered", "Tasks moved by recovery, by action", ["action"], registry=self.registry
        )


class Orchestrator(Program):
    """One per deployment. ``bind`` overrides ACTIVATION_ADMIN_BIND (tests bind port 0).

    ``clock`` is what it decides by: every age it acts on is measured on its own monotonic
    clock from what it saw change (see liveness.py), never against a time a worker wrote.
    """

    name = "orchestrator"

    def __init__(
        self,
        settings: Settings,
        *,
        bind: tuple[str, int] | None = None,
        refresh_interval: float = REFRESH_INTERVAL,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.spool = Spool(settings.spool)
        self.clock = clock
        self.watch = LivenessWatch(self.spool, clock=clock.monotonic)
        self.recovery_passes = 0  # finished passes: tests wait on it, never on a sleep
        self.thresholds = Thresholds.from_settings(settings)
        self.window = ResultWindow(self.spool)
        self.metrics = OrchestratorMetrics()
        self.host, self.port = bind or parse_bind(settings.admin_bind)
        check_bind(self.host, settings.admin_token)  # refuse before anything starts
        self.refresh_interval = refresh_interval
        self.api: AdminApi | None = None
        self.streams = settings.transport == STREAMS
        self.relay = StreamsRelay(self.spool, settings) if self.streams else None
        self.publisher = EventPublisher(settings.redis_url) if settings.redis_url and not self.streams else None
        self.dispatcher = Dispatcher(
            self.spool,
            settings,
            decide=self.decision,
            publisher=self.publisher,
            streams=self.relay.transport if self.relay is not None else None,
            unsent=self.relay.resend_soon if self.relay is not None else None,
            counted=lambda worker, transport: self.metrics.dispatch.labels(worker, transport).inc(),
        )
        self._mode_lock = threading.Lock()
        self._mode = settings.orchestrator_mode
        self._snapshot = Snapshot()  # replaced whole by the loop; request threads only read it
        self._unhealthy: set[str] = set()  # workers whose trouble was logged
        self._unhealthy_since: dict[str, float] = {}  # worker -> when this spell of trouble began
        # Longer than a tree's start or stop (a sibling STARTING, the listener not serving yet).
        self._health_grace = max(HEALTH_LOG_GRACE, 2 * settings.heartbeat_interval)
        self._refusals: dict[str, Any] = {}  # worker -> "at" of the last refusal logged
        self._refreshed = False
        self._next_refresh = 0.0
        self._next_recovery = 0.0
        self._next_relay = 0.0
        # ACTIVATION_RESULT_TTL, a bounded step at a time: the idle cost does not grow with history.
        self.sweeper = Sweeper(self.spool, settings.result_ttl) if settings.result_ttl > 0 else None

    # -- lifecycle --------------------------------------------------------------------------

    def open_api(self) -> AdminApi:
        """Bind the API's socket (serving starts at the end of initialize); raises OSError."""
        if self.api is None:
            self.api = AdminApi(
                self,
                host=self.host,
                port=self.port,
                token=self.settings.admin_token,
                max_connections=self.settings.admin_max_connections,
                request_timeout=self.settings.admin_request_timeout,
            )
        return self.api

    def initialize(self) -> None:
        self.spool.init()
        persisted = load_mode(self.spool)
        if persisted is not None and persisted != self._mode:
            self.log.info(
                "mode %s restored from %s (ORCHESTRATOR_MODE says %s)",
                persisted,
                state_path(self.spool),
                self._mode,
                extra={"event": "mode_restored"},
            )
        self._mode = persisted or self._mode
        self.metrics.mode.set(MODE_CODES[self._mode])
        api = self.open_api()
        self._guarded(self.run_recovery)
        self._guarded(self.refresh)
        if self.relay is not None:
            self._guarded(self.relay.step)
        now = time.monotonic()
        self._next_refresh, self._next_recovery = now + self.refresh_interval, now + self.settings.recovery_interval
        api.start()
        write_endpoint(self.spool, api.host, api.port)  # `activation dispatch` on this spool comes here

    def loop(self) -> None:
        now = time.monotonic()
        if now >= self._next_refresh:
            self._guarded(self.refresh)
            took = time.monotonic() - now
            # However large the spool, refreshing takes at most about a tenth of a core.
            self._next_refresh = time.monotonic() + max(self.refresh_interval, REFRESH_COST_FACTOR * took)
            if self.sweeper is not None:
                self._guarded(self.sweeper.step)
        if now >= self._next_recovery:
            self._guarded(self.run_recovery)
            self._next_recovery = time.monotonic() + self.settings.recovery_interval
        nexts = [self._next_refresh, self._next_recovery]
        if self.relay is not None:
            if now >= self._next_relay:
                self._guarded(self.relay.step)
                self._next_relay = time.monotonic() + RELAY_INTERVAL
            nexts.append(self._next_relay)
        due = min(nexts) - time.monotonic()
        self.stopping.wait(min(max(due, 0.01), MAX_WAIT))

    def shutdown(self) -> None:
        if self.sweeper is not None:
            self.sweeper.close()
        if self.api is not None:
            clear_endpoint(self.spool)
            self.api.stop()
        if self.publisher is not None:
            self.publisher.close()
        if self.relay is not None:
            self.relay.close()

    def _guarded(self, step: Callable[[], object]) -> None:
        """A spool that is briefly unreadable must not stop the orchestrator: log, go on."""
        try:
            step()
        except (OSError, ActivationError) as exc:
            self.log.error("%s failed: %s", step.__name__, exc, extra={"event": "step_failed"})

    # -- the periodic work ------------------------------------------------------------------

    def refresh(self) -> Snapshot:
        """New results into the window, queue sizes and health from the heartbeats.

        Health is judged here, every few seconds, rather than only every recovery interval: it is
        a handful of small heartbeat files, and a sick worker is worth hearing about early.
        """
        self.window.refresh()
        queues: dict[str, int] = {}
        for health in self.healths():
            worker = health.worker
            if isinstance(health.queue_size, int) and not isinstance(health.queue_size, bool):
                queues[worker] = health.queue_size
            if health.age_s is not None:
                self.metrics.heartbeat_age.labels(worker).set(health.age_s)
            self._note_health(worker, health.healthy, health.problems)
            self._note_refusal(worker, health.refused)
        self._refreshed = True
        snapshot = self.window.snapshot(queues)
        self._snapshot = snapshot
        if snapshot.avg_response_time_ms is not None:
            self.metrics.response_time.set(snapshot.avg_response_time_ms)
        self.metrics.task_rate.set(snapshot.task_rate_per_min)
        return snapshot

    def _note_health(self, worker: str, healthy: bool, problems: list[str]) -> None:
        """Log a worker's health when it changes, not on every refresh.

        Every start and stop of a tree has a few seconds in which its heartbeat honestly reports
        a sibling not up yet (or gone already): status says so at once, but the log warns only
        about trouble that outlasts that, and a clean stop is news, not trouble.
        """
        extra = {"worker": worker, "event": "worker_health"}
        now = self.clock.monotonic()
        if healthy:
            self._unhealthy_since.pop(worker, None)
            if worker in self._unhealthy:
                self._unhealthy.discard(worker)
                self.log.info("worker %s healthy again", worker, extra=extra)
            return
        if worker in self._unhealthy:
            return
        if problems == ["stopped"]:
            self._unhealthy.add(worker)
            self.log.info("worker %s stopped", worker, extra=extra)
            return
        since = self._unhealthy_since.setdefault(worker, now)
        if now - since >= self._health_grace:
            self._unhealthy.add(worker)
            self.log.warning("worker %s unhealthy: %s", worker, "; ".join(problems) or "not alive", extra=extra)

    def healths(self, dead_letters: dict[str | None, int] | None = None) -> list[WorkerHealth]:
        """Every worker's health, its heartbeat's age as this orchestrator saw it change.

        In streams mode the heartbeats are the replicas' keys in Redis, not files in this spool.
        """
        if self.relay is not None:
            return self.relay.healths(dead_letters)
        found = []
        for worker in self.spool.workers():
            self.watch.observe(worker)
            found.append(
                worker_health(
                    self.spool,
                    worker,
                    timeout=self.settings.heartbeat_timeout,
                    dead_letters=(dead_letters or {}).get(worker, 0),
                    now=self.clock.time(),
                    observed_age=self.watch.heartbeat_age(worker),
                )
            )
        return found

    def _note_refusal(self, worker: str, refused: dict[str, Any] | None) -> None:
        """Log each second tree refused for a worker name once: two trees, one name, is an operator's mistake."""
        at = refused.get("at") if refused else None
        if refused is None or at == self._refusals.get(worker):
            return
        self._refusals[worker] = at
        if not self._refreshed:
            return  # what the spool held when this orchestrator started is history, not news
        self.log.warning(
            "a second tree for worker %s was refused (%s on host %s at %s)",
            worker,
            refused.get("program"),
            refused.get("host"),
            at,
            extra={"worker": worker, "event": "second_tree_refused"},
        )

    def run_recovery(self) -> list[recovery.Action]:
        if self.streams:
            # This spool is the outbox: its tasks wait for remote replicas, whose claims are leases
            # in Redis (reclaimed there). No heartbeat or .processing here means nothing about them.
            self.recovery_passes += 1
            return []
        actions = recovery.recover(
            self.spool,
            orphan_age=self.settings.orphan_age,
            stopped_grace=self.settings.stopped_grace,
            max_attempts=self.settings.max_attempts,
            watch=self.watch,
        )
        for action in actions:
            self.metrics.recovered.labels(action.action).inc()
        self.recovery_passes += 1
        return actions

    # -- what the API serves ----------------------------------------------------------------

    @property
    def mode(self) -> str:
        return self._mode

    def decision(self, worker: str | None = None) -> Decision:
        return decide(self._mode, self._snapshot, self.thresholds, worker)

    def get_config(self) -> dict[str, Any]:
        mode, snapshot = self._mode, self._snapshot
        overall = decide(mode, snapshot, self.thresholds)
        return {
            "mode": mode,
            "transport": self.settings.transport,  # streams: every task goes by stream, whatever the mode
            "current_decision": overall.transport,
            "rule": overall.rule,
            "detail": overall.detail,
            "metrics": snapshot.as_dict(),
            "thresholds": self.thresholds.as_dict(),
            "per_worker": {w: decide(mode, snapshot, self.thresholds, w).as_dict() for w in self._dispatchable()},
            **self._events_availability(),
        }

    def _events_availability(self) -> dict[str, Any]:
        """Whether an events dispatch can publish at all, and if not, why (``config set-mode`` says it)."""
        if self.streams:
            why = "ACTIVATION_TRANSPORT=streams: every task goes by stream, the files/events modes do not apply"
            return {"events_available": False, "events_unavailable": why}
        if self.publisher is None:
            why = "the orchestrator has no REDIS_URL, so it cannot publish; every dispatch goes by file only"
            return {"events_available": False, "events_unavailable": why}
        try:
            # The link's backoff keeps this cheap in an outage: no new connect until it is due.
            with self.dispatcher.publish_lock:  # the one Redis connection, shared with dispatch
                self.publisher.check()
        except EventsError as exc:
            why = f"REDIS_URL is set but Redis does not answer ({exc}); dispatches go by file until it does"
            return {"events_available": False, "events_unavailable": why}
        return {"events_available": True, "events_unavailable": None}

    def set_mode(self, mode: Any) -> dict[str, Any]:
        if not isinstance(mode, str) or mode.strip().lower() not in ORCHESTRATOR_MODES:
            raise Invalid(f"mode must be one of {', '.join(ORCHESTRATOR_MODES)}, got {ascii(mode)[:80]}")
        mode = mode.strip().lower()
        with self._mode_lock:
            try:
                save_mode(self.spool, mode)  # persisted first: an answer of 200 means it survives a restart
            except OSError as exc:
                raise Unavailable(f"cannot persist the mode: {exc}") from None
            previous, self._mode = self._mode, mode
        self.metrics.mode.set(MODE_CODES[mode])
        self.log.info("mode %s -> %s", previous, mode, extra={"event": "mode_changed"})
        return self.get_config()

    def get_status(self) -> dict[str, Any]:
        healths = self.healths(dead_letter_counts(self.spool))
        if self.relay is None:
            # As `activation status` shows it: the spool's facts (claim, inbox, results) read now,
            # over the heartbeat's judgement, so the answer never lags by a heartbeat interval.
            workers = [live(self.spool, h).as_dict() for h in healths]
        else:
            workers = [h.as_dict() for h in healths]  # the replicas' own state: their spools are theirs
        answer = {
            "workers": workers,
            "unhealthy": [h.worker for h in healths if not h.healthy],
            "mode": self._mode,
            "transport": self.settings.transport,
        }
        if self.relay is not None:
            answer["streams"] = self.relay.status()
        return answer

    def submit_task(self, body: dict[str, Any]) -> dict[str, Any]:
        """POST /tasks: the one dispatch path (submit.py), which `activation dispatch` shares."""
        return self.dispatcher.submit(body).as_dict()

    def cancel_task(self, task_id: str) -> dict[str, Any]:
        """POST /tasks/<id>/cancel (spool.cancel): a pending task becomes a cancelled result; a running
        one's executor is asked to kill its tree, and the answer says ``cancelling`` (poll GET /tasks/<id>)."""
        from activation.spool.cancel import CannotCancel, cancel_task

        try:
            if self.relay is not None:
                cancelled = self._cancel_streamed(task_id)
            else:
                cancelled = cancel_task(self.spool, task_id, by="api")
        except CannotCancel as exc:
            raise (NotFound if exc.state is None else Conflict)(str(exc)) from None
        except StreamsError as exc:
            raise Unavailable(f"cannot cancel {task_id} now: {exc}") from None
        self.log.info(
            "task %s %s while %s",
            task_id,
            "cancelled" if cancelled.status == "cancelled" else "cancel requested",
            cancelled.was,
            extra={"worker": cancelled.worker, "task_id": task_id, "event": "task_cancelled"},
        )
        return cancelled.as_dict()

    def _cancel_streamed(self, task_id: str) -> Cancelled:
        """Streams mode: the task is in this spool's outbox until its result comes back."""
        from activation.transport.streams import outbox

        assert self.relay is not None
        return outbox.cancel_dispatched(self.relay.transport, self.spool, task_id, by="api")

    def get_task(self, task_id: str) -> dict[str, Any]:
        for _ in range(3):  # it may move between finding it and reading it: look again
            found = self.spool.locate(task_id)
            if found is None:
                break
            answer: dict[str, Any] = {"task_id": task_id, "state": found.state, "worker": found.worker}
            if found.state not in ("done", "dead"):
                return answer
            try:
                if found.state == "done":
                    answer["result"] = read_record(found.path, result_record)
                else:
                    letter = read_record(found.path, dead_letter_record)
                    answer["dead_letter"] = {k: letter.get(k) for k in ("reason", "detail", "dead_at")}
            except FileNotFoundError:
                continue
            except (OSError, BadRecord) as exc:
                raise Broken(f"cannot read {found.state} record: {exc}") from None
            return answer
        raise NotFound(f"no task {task_id[:140]!r}")

    def list_dead_letters(self) -> dict[str, Any]:
        """``GET /dlq``: the readable records; the others are counted, each with one line (the first 20)."""
        skipped: list[str] = []
        letters = [d.summary() for d in recovery.dead_letters(self.spool, skipped)]
        return {"count": len(letters), "dead_letters": letters, "unreadable": len(skipped), "skipped": skipped[:20]}

    def retry_dead_letter(self, key: str) -> dict[str, Any]:
        try:
            retried = recovery.retry_dead_letter(self.spool, key, send=self.redispatch)
        except recovery.UnknownDeadLetter as exc:
            raise NotFound(str(exc)) from None
        except recovery.NotRetryable as exc:
            raise Conflict(str(exc)) from None
        except recovery.DeadLetterError as exc:
            raise Broken(str(exc)) from None
        return retried.as_dict()

    @property
    def redispatch(self) -> Callable[[str, dict[str, Any]], None] | None:
        """How a retried dead letter goes again: in streams mode its entry too, the id kept."""
        return redispatcher(self.relay)

    def render_metrics(self) -> tuple[bytes, str]:
        return generate_latest(self.metrics.registry), CONTENT_TYPE_LATEST

    def _dispatchable(self) -> list[str]:
        return [w for w in self.spool.workers() if self.spool.inbox(w).is_dir()]
