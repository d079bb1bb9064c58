"""Chaos: three workers and the orchestrator under load, while programs die and Redis blinks.

Load: ACTIVATION_CHAOS_TASKS (default 3000) tasks of mixed durations, dispatched as files, as
events and through the orchestrator's API. Faults throughout: a random program SIGKILLed every
0.5-2 s, Redis stopped and restarted twice, 200 malformed files dropped in the inboxes. At the
end every valid task has exactly one result, every malformed file is in the dead letter with a
reason, no agent process survives, every program runs, and the audit is clean.
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

from activation.orchestrator.dispatch import EventPublisher, build_task, dispatch
from activation.spool.atomic import read_json
from activation.spool.audit import audit
from activation.spool.task import is_task_name
from activation.worker.containment import STRAY_MARKER, containment_id
from tests.harness import RedisServer, WorkerTree, new_orchestrator, new_tree, wait_until

TASKS = int(os.environ.get("ACTIVATION_CHAOS_TASKS", "3000"))
MALFORMED = int(os.environ.get("ACTIVATION_CHAOS_MALFORMED", "200"))
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


def surviving_agents(trees: list[WorkerTree]) -> list[int]:
    markers = {containment_id(tree.worker, tree.run_dir) for tree in trees}
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(STRAY_MARKER) in markers:
                found.append(proc.pid)
    return found


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
            return sum(sum(map(is_task_name, os.listdir(spool.results(w)))) for w in WORKERS) >= len(expected)

        wait_until(finished, 600, 0.5, "every valid task to finish")
        for tree in trees:
            tree.wait_running(60)
        time.sleep(2)  # anything extra would land now

        results: Counter[str] = Counter()
        misplaced = 0
        for worker in WORKERS:
            for name in os.listdir(spool.results(worker)):
                if not is_task_name(name):
                    continue  # a temp file of a killed executor (the audit bounds their age), a task's log
                task_id = name[: -len(".json")]
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
        print("\nchaos accounting")
        for label, value in table:
            print(f"  {label:<34} {value}")
        print("  kills: " + ", ".join(f"{k}={v}" for k, v in sorted(faults.kills.items())))
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
        faults.stop.set()
        if faults.is_alive():
            faults.join()
        for tree in trees:
            tree.kill_everything()
        redis.stop()
