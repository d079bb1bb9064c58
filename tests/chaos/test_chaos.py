"""Chaos: three workers and the orchestrator under load, while programs die and Redis blinks.

Files mode (test_chaos): ACTIVATION_CHAOS_TASKS (default 3000) tasks of mixed durations,
dispatched as files, as events and through the orchestrator's API, on one shared spool. Faults
throughout: a random program SIGKILLed every 0.5-2 s, Redis stopped and restarted twice, 200
malformed files dropped in the inboxes. At the end every valid task has exactly one result, every
malformed file is in the dead letter with a reason, no agent process survives, every program
runs, and the audit is clean.

Streams mode (test_chaos_streams): the same three workers, each tree on its own local spool with
ACTIVATION_TRANSPORT=streams, and the orchestrator on its own (the outbox). ACTIVATION_CHAOS_STREAMS_TASKS
(default 600) tasks go through the orchestrator's API and through its outbox as `activation
dispatch` sends them; the same faults (Redis keeps an AOF, as the README asks of streams mode),
and bad input where a stream can carry it: entries whose payload is no task. The same invariants,
read where streams mode puts them: exactly one entry per valid task on the result streams and one
result in the orchestrator's results folder, every bad entry in its dead letter with a reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import psutil
import pytest
import redis as redis_py

from activation.errors import StreamsError
from activation.orchestrator.dispatch import EventPublisher, build_task, dispatch
from activation.spool.atomic import read_json
from activation.spool.audit import audit
from activation.spool.layout import Spool
from activation.spool.task import MAX_TASK_BYTES, is_task_name, task_id_of
from activation.transport.streams import outbox
from activation.transport.streams.client import StreamsTransport
from activation.transport.streams.keys import StreamKeys
from activation.worker.containment import STRAY_MARKER, containment_id
from tests.harness import RedisServer, WorkerTree, new_orchestrator, new_tree, wait_until

TASKS = int(os.environ.get("ACTIVATION_CHAOS_TASKS", "3000"))
MALFORMED = int(os.environ.get("ACTIVATION_CHAOS_MALFORMED", "200"))
STREAMS_TASKS = int(os.environ.get("ACTIVATION_CHAOS_STREAMS_TASKS", "600"))
STREAMS_MALFORMED = int(os.environ.get("ACTIVATION_CHAOS_STREAMS_MALFORMED", "60"))
STREAMS_LEASE = "15"  # seconds: short enough that a lost lease is won back within the run
WORKERS = ("marie", "anga", "fabien")
MIN_FAULT_SECONDS = 20
DURATIONS = ["0"] * 14 + ["0.01"] * 4 + ["0.05"] * 2 + ["0.3"]  # seconds the agent sleeps


def malformed_files(inbox: Path, index: int, rng: random.Random) -> str:
    """Drop one bad file of a rotating kind; return its name."""
    kind = index % 11
    name = f"bad-{index:04d}.json"
    path = inbox / name
    if kind == 0:
        path.write_text(f'{{"task_id": "bad-{index:04d}", "descr')
    elif kind == 1:
        path.write_text(json.dumps({"task_id": f"bad-{index:04d}"}))
    elif kind == 2:
        path.write_text(json.dumps({"task_id": f"bad-{index:04d}", "description": 7}))
    elif kind == 3:
        path.write_text(json.dumps({"task_id": "someone-else", "description": "x"}))
    elif kind == 4:
        path.write_bytes(b'{"task_id": "bad", "description": "\xff\xfe"}')
    elif kind == 5:
        name = f"bad-{index:04d}..%2f..%2fescape.json"
        (inbox / name).write_text(json.dumps({"task_id": "../../escape", "description": "x"}))
    elif kind == 6:
        os.symlink("/etc/hostname", path)
    elif kind == 7:
        path.mkdir()
    elif kind == 8:  # JSON that no writer can carry onward: a lone surrogate, 1e400, nesting past any limit
        path.write_text(f'{{"task_id": "bad-{index:04d}", "description": "hi \\ud800"}}')
    elif kind == 9:
        path.write_text(f'{{"task_id": "bad-{index:04d}", "description": "x", "timeout": 1e400}}')
    else:
        path.write_text(f'{{"task_id": "bad-{index:04d}", "description": "x", "m": {"[" * 50_000}{"]" * 50_000}}}')
    return name


class Faults(threading.Thread):
    """SIGKILL a random program every 0.5-2 s; stop and restart Redis twice."""

    def __init__(self, trees: list[WorkerTree], redis: RedisServer, rng: random.Random) -> None:
        super().__init__(name="chaos-faults")
        self.trees, self.redis, self.rng = trees, redis, rng
        self.stop = threading.Event()
        self.enough = threading.Event()  # both Redis restarts done and MIN_FAULT_SECONDS passed
        self.kills: Counter[str] = Counter()
        self.redis_restarts = 0

    def run(self) -> None:
        began = time.monotonic()
        redis_at = [began + 4, began + 14]
        while not self.stop.wait(self.rng.uniform(0.5, 2.0)):
            if redis_at and time.monotonic() >= redis_at[0]:
                redis_at.pop(0)
                self.redis.stop()
                self.stop.wait(2)
                self.redis.start()
                self.redis_restarts += 1
            if not redis_at and time.monotonic() - began >= MIN_FAULT_SECONDS:
                self.enough.set()
            tree = self.rng.choice(self.trees)
            program = self.rng.choice(tree.programs)
            with contextlib.suppress(ValueError, OSError, TimeoutError):
                pid = tree.pid(program)
                if pid > 1:  # 0 while supervisord restarts it: never signal a process group
                    os.kill(pid, signal.SIGKILL)
                    self.kills[f"{tree.worker}/{program}"] += 1


def post_task(url: str, body: dict[str, str]) -> None:
    """POST /tasks until the orchestrator takes it (it may be dead for a moment); 409 = taken before."""
    data = json.dumps(body).encode()
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(urllib.request.Request(f"{url}/tasks", data=data, method="POST"), timeout=5)
            return
        except urllib.error.HTTPError as exc:
            if exc.code == 409:
                return
            if exc.code < 500 or time.monotonic() > deadline:
                raise
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.2)


def result_ids(spool: Spool, worker: str) -> list[str]:
    """The task ids of the worker's results folder. Not its agent logs (``<id>.log``, moved beside
    the result) nor the temp files of a killed writer (dot files, whose age the audit bounds)."""
    return [task_id_of(name) for name in os.listdir(spool.results(worker)) if is_task_name(name)]


def report(title: str, table: list[tuple[str, object]], faults: Faults) -> None:
    print(f"\n{title}")
    for label, value in table:
        print(f"  {label:<34} {value}")
    print("  kills: " + ", ".join(f"{k}={v}" for k, v in sorted(faults.kills.items())))


def surviving_agents(trees: list[WorkerTree]) -> list[int]:
    markers = {containment_id(tree.worker, tree.run_dir) for tree in trees}
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(STRAY_MARKER) in markers:
                found.append(proc.pid)
    return found


def tear_down(faults: Faults, trees: list[WorkerTree], redis: RedisServer) -> None:
    """Whatever the run came to: the faults stop first (they would restart what goes), then every
    tree with all its descendants, then Redis."""
    faults.stop.set()
    if faults.is_alive():
        faults.join()
    for tree in trees:
        tree.kill_everything()
    redis.stop()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("ACTIVATION_CHAOS_SEED", "7")))
    redis = RedisServer(tmp_path / "redis").start()
    env = {"REDIS_URL": redis.url, "ACTIVATION_MODE": "inotify,redis", "ACTIVATION_RESCAN_INTERVAL": "2"}
    workers = [new_tree(tmp_path, w, agent="sleep -- {description}", **env) for w in WORKERS]
    orchestrator = new_orchestrator(tmp_path, REDIS_URL=redis.url, ORCHESTRATOR_MODE="events")
    trees = [*workers, orchestrator]
    faults = Faults(trees, redis, rng)
    spool = workers[0].spool
    try:
        for tree in trees:
            tree.start()
        api = f"http://{orchestrator.env['ACTIVATION_ADMIN_BIND']}"
        publisher = EventPublisher(redis.url)
        faults.start()
        expected: dict[str, str] = {}
        by_route: Counter[str] = Counter()
        bad_names: list[str] = []
        bad_every = max(1, TASKS // MALFORMED)
        for i in range(TASKS):
            worker = WORKERS[i % 3]
            task_id = f"chaos-{i:05d}"
            description = rng.choice(DURATIONS)
            route = ("files", "events", "api")[i % 3]
            if route == "api":
                post_task(api, {"worker": worker, "description": description, "task_id": task_id})
            else:
                dispatch(spool, worker, build_task(description, task_id=task_id), transport=route, publisher=publisher)
            expected[task_id] = worker
            by_route[route] += 1
            if i % bad_every == 0 and len(bad_names) < MALFORMED:
                bad_names.append(malformed_files(spool.inbox(worker), len(bad_names), rng))
            if i % 50 == 0:
                time.sleep(0.25)  # spread the load over the faults
        while len(bad_names) < MALFORMED:
            bad_names.append(malformed_files(spool.inbox(WORKERS[len(bad_names) % 3]), len(bad_names), rng))
        publisher.close()
        faults.enough.wait(120)  # small runs still get the whole fault schedule
        faults.stop.set()
        faults.join()
        if redis.process is None:
            redis.start()

        def finished() -> bool:
            return sum(len(result_ids(spool, w)) for w in WORKERS) >= len(expected)

        wait_until(finished, 600, 0.5, "every valid task to finish")
        for tree in trees:
            tree.wait_running(60)
        time.sleep(2)  # anything extra would land now

        results: Counter[str] = Counter()
        misplaced = 0
        for worker in WORKERS:
            for task_id in result_ids(spool, worker):
                results[task_id] += 1
                misplaced += expected.get(task_id) != worker
        lost = [t for t in expected if results[t] == 0]
        duplicates = [t for t, n in results.items() if n > 1]
        records = [read_json(p) for p in spool.dead_letters()]
        dead_sources = {Path(r["source"]).name: r for r in records if r.get("source")}
        bad_missing = [n for n in bad_names if n not in dead_sources or not dead_sources[n].get("reason")]
        valid_dead = [r["task_id"] for r in records if r.get("task_id") in expected]
        escaped = [p for p in tmp_path.rglob("*escape*") if spool.dead_letter_dir not in p.parents]
        agents = surviving_agents(workers)
        violations = audit(spool, heartbeat_timeout=30, temp_age=600)
        table = [
            ("tasks dispatched", len(expected)),
            ("  as files / events / api", f"{by_route['files']} / {by_route['events']} / {by_route['api']}"),
            ("results", sum(results.values())),
            ("lost", len(lost)),
            ("duplicate results", len(duplicates)),
            ("results in the wrong worker", misplaced),
            ("valid tasks dead-lettered", len(valid_dead)),
            ("malformed files dropped", len(bad_names)),
            ("malformed without a dead letter", len(bad_missing)),
            ("programs SIGKILLed", sum(faults.kills.values())),
            ("redis restarts", faults.redis_restarts),
            ("files outside the spool", len(escaped)),
            ("surviving agent processes", len(agents)),
            ("audit violations", len(violations)),
        ]
        report("chaos accounting", table, faults)
        assert not lost, lost[:10]
        assert not duplicates, duplicates[:10]
        assert misplaced == 0
        assert not valid_dead, valid_dead[:10]
        assert not bad_missing, bad_missing[:10]
        assert not escaped, escaped
        assert not agents, agents
        assert not violations, [v.as_dict() for v in violations[:10]]
        assert faults.redis_restarts == 2 and sum(faults.kills.values()) > 0
    finally:
        tear_down(faults, trees, redis)


# -- streams mode -------------------------------------------------------------------------------


def bad_entry(client: redis_py.Redis, worker: str, index: int) -> str:
    """Add one task entry whose payload is no task, of a rotating kind; return the task id it carries.

    Most go through StreamsTransport.dispatch, which sends any payload string as it is; the last
    kinds are raw XADDs, as a writer with access to Redis but not through dispatch could add.
    """
    kind = index % 12
    task_id = f"bad-{index:04d}"
    payload = {
        0: f'{{"task_id": "{task_id}", "descr',
        1: json.dumps({"task_id": task_id}),
        2: json.dumps({"task_id": task_id, "description": 7}),
        3: json.dumps({"task_id": "someone-else", "description": "x"}),
        4: f'{{"task_id": "{task_id}", "description": "hi \\ud800"}}',
        5: f'{{"task_id": "{task_id}", "description": "x", "timeout": 1e400}}',
        6: f'{{"task_id": "{task_id}", "description": "x", "m": {"[" * 50_000}{"]" * 50_000}}}',
        7: json.dumps([task_id, "x"]),
        8: json.dumps({"task_id": task_id, "description": "x", "timeout": -1}),
        9: "",
    }.get(kind)
    keys = StreamKeys(worker)
    if payload is not None:
        StreamsTransport(client, worker, consumer="chaos").dispatch(task_id, payload)
    elif kind == 10:  # over the size limit, which dispatch would refuse before sending
        client.xadd(
            keys.tasks,
            {"task_id": task_id, "task": json.dumps({"task_id": task_id, "description": "x" * MAX_TASK_BYTES})},
        )
    else:  # a hostile task id, which dispatch would refuse: it must never become a path
        task_id = f"../../escape-{index:04d}"
        client.xadd(keys.tasks, {"task_id": task_id, "task": json.dumps({"task_id": task_id, "description": "x"})})
    return task_id


def send_by_outbox(transport: StreamsTransport, spool: Spool, worker: str, task: dict[str, str]) -> None:
    """As `activation dispatch` on the orchestrator's host sends it: outbox first, then the entry.

    With Redis away the task stays in the outbox, and the orchestrator sends it when Redis answers.
    """
    with contextlib.suppress(StreamsError):
        outbox.send(transport, spool, worker, task)


def stream_results(client: redis_py.Redis, worker: str) -> Counter[str]:
    """How many entries each task id has on the role's result stream (trimmed by age only)."""
    return Counter(fields["task_id"] for _id, fields in client.xrange(StreamKeys(worker).results))


def streams_settled(client: redis_py.Redis) -> bool:
    """No task entry left on any role's stream (nudges included) and nothing pending."""
    for worker in WORKERS:
        keys = StreamKeys(worker)
        with contextlib.suppress(redis_py.ResponseError):  # no group yet: nothing pending either
            if client.xpending(keys.tasks, keys.group)["pending"]:
                return False
        if client.xlen(keys.tasks):
            return False
    return True


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_streams(tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("ACTIVATION_CHAOS_SEED", "7")))
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    env = {
        "REDIS_URL": redis.url,
        "ACTIVATION_TRANSPORT": "streams",
        "ACTIVATION_LEASE": STREAMS_LEASE,
        "ACTIVATION_REDIS_BACKOFF_MAX": "0.5",
    }
    workers = [
        new_tree(tmp_path / w, w, agent="sleep -- {description}", ACTIVATION_MODE="inotify", **env) for w in WORKERS
    ]
    orchestrator = new_orchestrator(tmp_path / "orchestrator", **env)
    spool = orchestrator.spool
    spool.init(WORKERS)  # the outboxes: `activation init marie anga fabien`
    trees = [*workers, orchestrator]
    faults = Faults(trees, redis, rng)
    client = redis_py.Redis.from_url(redis.url, decode_responses=True, socket_timeout=5)
    # Where the orchestrator's spool would be led by a hostile id: nothing there may be touched.
    decoys = [spool.root / f"escape-{i:04d}.json" for i in range(STREAMS_MALFORMED)]
    for decoy in decoys:
        decoy.write_text("{}")
    try:
        for tree in trees:
            tree.start()
        api = f"http://{orchestrator.env['ACTIVATION_ADMIN_BIND']}"
        transports = {w: StreamsTransport(client, w, consumer="chaos") for w in WORKERS}
        faults.start()
        expected: dict[str, str] = {}
        by_route: Counter[str] = Counter()
        bad_ids: list[str] = []
        bad_every = max(1, STREAMS_TASKS // STREAMS_MALFORMED)

        def add_bad(worker: str) -> None:
            deadline = time.monotonic() + 60
            while True:  # Redis may be down for a moment
                try:
                    bad_ids.append(bad_entry(client, worker, len(bad_ids)))
                    return
                except (StreamsError, redis_py.RedisError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)

        for i in range(STREAMS_TASKS):
            worker = WORKERS[i % 3]
            task_id = f"chaos-{i:05d}"
            description = rng.choice(DURATIONS)
            route = ("outbox", "api")[i % 2]
            if route == "api":
                post_task(api, {"worker": worker, "description": description, "task_id": task_id})
            else:
                send_by_outbox(transports[worker], spool, worker, build_task(description, task_id=task_id))
            expected[task_id] = worker
            by_route[route] += 1
            if i % bad_every == 0 and len(bad_ids) < STREAMS_MALFORMED:
                add_bad(worker)
            if i % 50 == 0:
                time.sleep(0.25)  # spread the load over the faults
        while len(bad_ids) < STREAMS_MALFORMED:
            add_bad(WORKERS[len(bad_ids) % 3])
        faults.enough.wait(120)  # small runs still get the whole fault schedule
        faults.stop.set()
        faults.join()
        if redis.process is None:
            redis.start()

        def finished() -> bool:
            return sum(len(result_ids(spool, w)) for w in WORKERS) >= len(expected)

        wait_until(finished, 600, 0.5, lambda: f"every valid task to finish; orchestrator:\n{orchestrator.log_tail()}")
        wait_until(lambda: streams_settled(client), 120, 0.5, "the task streams empty, nothing pending")
        for tree in trees:
            tree.wait_running(60)
        time.sleep(2)  # anything extra would land now

        results: Counter[str] = Counter()
        misplaced = 0
        on_stream: Counter[str] = Counter()
        for worker in WORKERS:
            for task_id in result_ids(spool, worker):
                results[task_id] += 1
                misplaced += expected.get(task_id) != worker
            on_stream.update(stream_results(client, worker))
        lost = [t for t in expected if results[t] == 0]
        duplicates = [t for t in expected if on_stream[t] != 1]
        left_in_outbox = [n for w in WORKERS for n in spool.inbox_names(w)]
        records = [read_json(p) for p in spool.dead_letters()]
        valid_dead = [r["task_id"] for r in records if r.get("task_id") in expected]
        # A bad entry's record is under its task id; one whose id is no task id names it in its detail.
        dead_ids = {r["task_id"] for r in records if r.get("reason") and r.get("task_id")}
        details = [str(r["detail"]) for r in records if r.get("reason") and not r.get("task_id")]
        bad_missing = [b for b in bad_ids if b not in dead_ids and not any(ascii(b) in d for d in details)]
        # Bad input is refused as such at its first delivery: none may crash its way to max deliveries.
        bad_crashed = [r["task_id"] for r in records if r.get("reason") == outbox.MAX_ATTEMPTS_REASON]
        escaped = [p for p in tmp_path.rglob("*escape*") if p not in decoys and spool.dead_letter_dir not in p.parents]
        touched = [d for d in decoys if not d.exists()]
        agents = surviving_agents(workers)
        violations = [
            v for s in (spool, *(w.spool for w in workers)) for v in audit(s, heartbeat_timeout=30, temp_age=600)
        ]
        table: list[tuple[str, object]] = [
            ("tasks dispatched", len(expected)),
            ("  by outbox / api", f"{by_route['outbox']} / {by_route['api']}"),
            ("results in the orchestrator", sum(results.values())),
            ("entries on the result streams", sum(on_stream.values())),
            ("lost", len(lost)),
            ("not exactly one result entry", len(duplicates)),
            ("results in the wrong worker", misplaced),
            ("left in the outbox", len(left_in_outbox)),
            ("valid tasks dead-lettered", len(valid_dead)),
            ("bad entries added", len(bad_ids)),
            ("bad without a dead letter", len(bad_missing)),
            ("bad dead at max deliveries", len(bad_crashed)),
            ("programs SIGKILLed", sum(faults.kills.values())),
            ("redis restarts", faults.redis_restarts),
            ("files outside the spools", len(escaped) + len(touched)),
            ("surviving agent processes", len(agents)),
            ("audit violations", len(violations)),
        ]
        report("chaos accounting, streams mode", table, faults)
        assert not lost, lost[:10]
        assert not duplicates, [(t, on_stream[t]) for t in duplicates[:10]]
        assert misplaced == 0
        assert not left_in_outbox, left_in_outbox[:10]
        assert not valid_dead, valid_dead[:10]
        assert not bad_missing, bad_missing[:10]
        assert not bad_crashed, bad_crashed[:10]
        assert not escaped and not touched, (escaped, touched)
        assert not agents, agents
        assert not violations, [v.as_dict() for v in violations[:10]]
        assert faults.redis_restarts == 2 and sum(faults.kills.values()) > 0
    finally:
        client.close()
        tear_down(faults, trees, redis)
