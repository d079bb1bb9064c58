"""How the operator's views and the orchestrator's idle cost grow with history.

``python -m benchmarks.history [1000 10000 100000]`` writes N synthetic results (finished within
the last day, so the TTL deletes none of them), then times ``tasks``/``status`` in-process and
measures an idle ``activation orchestrator`` process's CPU over a window. Prints one line per N.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from activation.spool.layout import Spool
from activation.spool.listing import Query, list_tasks
from activation.spool.retention import Sweeper
from activation.spool.status import live_status
from tests.harness import BIN, free_port

WINDOW = float(os.environ.get("ACTIVATION_BENCH_IDLE_WINDOW", "30"))
WARMUP = float(os.environ.get("ACTIVATION_BENCH_IDLE_WARMUP", "20"))  # start-up reads the spool once


def fill(spool: Spool, count: int) -> None:
    spool.init(["marie"])
    folder = spool.results("marie")
    start = time.time() - 86400
    for i in range(count):
        path = folder / f"t{i:07d}.json"
        status = "failed" if i % 10 == 0 else "completed"
        path.write_text(json.dumps({"task_id": f"t{i:07d}", "status": status, "attempts": 1, "duration_s": 0.1}))
        os.utime(path, (start + i * 0.5, start + i * 0.5))


def best(fn: object, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        begun = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append(time.perf_counter() - begun)
    return min(times)


def idle_cpu(spool: Spool, **extra: str) -> float:
    """Percent of one core used by an idle orchestrator over WINDOW s, after WARMUP s."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTIVATION_", "ORCHESTRATOR_", "REDIS_"))}
    env.update(
        ACTIVATION_SPOOL=str(spool.root),
        ACTIVATION_RUN_DIR=tempfile.mkdtemp(prefix="actb-"),
        ACTIVATION_ADMIN_BIND=f"127.0.0.1:{free_port()}",
        ACTIVATION_LOG_LEVEL="error",
        **extra,
    )
    process = subprocess.Popen([str(BIN / "activation"), "orchestrator"], env=env, stdin=subprocess.DEVNULL)
    try:
        watched = psutil.Process(process.pid)
        time.sleep(WARMUP)
        before, begun = watched.cpu_times(), time.monotonic()
        time.sleep(WINDOW)
        after, took = watched.cpu_times(), time.monotonic() - begun
        used = (after.user + after.system) - (before.user + before.system)
        return 100.0 * used / took
    finally:
        process.terminate()
        process.wait(30)
        shutil.rmtree(env["ACTIVATION_RUN_DIR"], ignore_errors=True)


def measure(count: int) -> str:
    root = Path(tempfile.mkdtemp(prefix="acth-"))
    try:
        spool = Spool(root / "spool")
        fill(spool, count)
        listing = best(lambda: list_tasks(spool, Query(limit=50)))
        failed = best(lambda: list_tasks(spool, Query(states=("failed",), since=time.time() - 3600, limit=50)))
        status = best(lambda: live_status(spool, timeout=30))
        sweeper = Sweeper(spool, 7 * 86400, interval=0)
        sweep = best(lambda: sweeper.step())
        # Writing the results set their ctime, which the orchestrator reads as their arrival: in the
        # first minute they look like a burst that just arrived. The second start sees history.
        burst = idle_cpu(spool)
        cpu = idle_cpu(spool)
        return (
            f"{count:>7} results: tasks {listing * 1000:.0f} ms, tasks --state failed --since 1h "
            f"{failed * 1000:.0f} ms, status {status * 1000:.0f} ms, sweep step {sweep * 1000:.1f} ms, "
            f"orchestrator idle {cpu:.2f} % of a core (just after the results arrived: {burst:.2f} %)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main(sizes: list[int]) -> None:
    for count in sizes:
        print(measure(count), flush=True)


if __name__ == "__main__":
    main([int(n) for n in sys.argv[1:]] or [1000, 10000, 100000])
