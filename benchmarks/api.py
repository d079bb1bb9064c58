"""Probe 5: the admin API. ``POST /tasks`` from concurrent clients (separate processes, so the
clients share no GIL), each dispatch durable (the task file fsynced before the 202), into an
orchestrator under supervisord; dispatches per second, p50 and p99 per request.
"""

from __future__ import annotations

import http.client
import json
import multiprocessing
import time
from pathlib import Path
from typing import Any

from benchmarks.stats import summary
from tests.harness import new_orchestrator, wait_until

WORKER = "w1"


def _client(host: str, port: int, count: int, start: Any, out: Any) -> None:
    body = json.dumps({"worker": WORKER, "description": "x"}).encode()
    headers = {"Content-Type": "application/json"}
    delays, failures = [], 0
    start.wait()
    began = time.time()
    for _ in range(count):
        t0 = time.perf_counter()
        connection = http.client.HTTPConnection(host, port, timeout=30)
        try:
            connection.request("POST", "/tasks", body, headers)
            answer = connection.getresponse()
            answer.read()
            ok = answer.status == 202
        except OSError:
            ok = False
        finally:
            connection.close()
        delays.append((time.perf_counter() - t0) * 1000)
        failures += not ok
    out.put((began, time.time(), delays, failures))


def post_tasks(root: Path, clients: int, requests: int) -> dict[str, Any]:
    tree = new_orchestrator(root / "api", ORCHESTRATOR_MODE="files")
    tree.spool.init([WORKER])
    host, port = tree.env["ACTIVATION_ADMIN_BIND"].rsplit(":", 1)
    try:
        tree.start()
        wait_until(lambda: _answers(host, int(port)), 60, 0.05, "the orchestrator's API")
        context = multiprocessing.get_context("fork")
        start, out = context.Event(), context.Queue()
        each = max(1, requests // clients)
        procs = [context.Process(target=_client, args=(host, int(port), each, start, out)) for _ in range(clients)]
        for proc in procs:
            proc.start()
        time.sleep(0.5)  # every client forked and waiting
        start.set()
        answers = [out.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join(30)
        began = min(a[0] for a in answers)
        ended = max(a[1] for a in answers)
        delays = [d for a in answers for d in a[2]]
        failures = sum(a[3] for a in answers)
        files = tree.spool.count_inbox(WORKER)
        return {
            "clients": clients,
            "requests": len(delays),
            "failures": failures,
            "task_files": files,
            "elapsed_s": ended - began,
            "per_s": (len(delays) - failures) / (ended - began),
            "latency_ms": summary(delays),
        }
    finally:
        tree.kill_everything()


def _answers(host: str, port: int) -> bool:
    try:
        connection = http.client.HTTPConnection(host, port, timeout=2)
        connection.request("GET", "/config")
        connection.getresponse().read()
        connection.close()
    except OSError:
        return False
    return True
