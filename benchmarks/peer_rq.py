"""Peer: RQ's SimpleWorker (the job runs in the worker's own process, no fork), on a private
redis-server, running the same agent from its job. RQ is the bench extra (setup.cfg).

The job records its run the way the naive wrapper does (runs.log, then a plain result file), so
one loop measures both peers.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import AGENT, peer_done, peer_runs, peer_started, record_run
from tests.harness import ROOT, RedisServer, wait_until

QUEUE = "bench"


def run_agent(task_id: str, description: str, results: str) -> None:
    """The job: spawn the agent, note when it started, wait for it, record the run."""
    argv = shlex.split(AGENT.replace("{description}", shlex.quote(description)))
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    started = time.time()
    child.communicate()
    record_run(Path(results), task_id, started)


class RqSimpleWorker:
    name = "RQ SimpleWorker"

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results = root / "results"
        self.redis = RedisServer(root / "redis")
        self.process: subprocess.Popen[bytes] | None = None
        self.queue: Any = None

    def start(self) -> RqSimpleWorker:
        import redis
        import rq

        self.results.mkdir(parents=True, exist_ok=True)
        self.redis.start()
        connection = redis.Redis.from_url(self.redis.url)
        self.queue = rq.Queue(QUEUE, connection=connection)
        rq_bin = Path(sys.executable).parent / "rq"
        self.process = subprocess.Popen(
            [
                str(rq_bin),
                "worker",
                "-w",
                "rq.worker.SimpleWorker",
                "-u",
                self.redis.url,
                "--path",
                str(ROOT),
                "-q",
                QUEUE,
            ],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=open(self.root / "rq.log", "ab"),  # noqa: SIM115 - the child keeps it
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: rq.Worker.count(connection=connection) > 0, 30, 0.05, "the RQ worker to register")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.redis.stop()

    def submit(self, task_id: str) -> float:
        before = time.time()
        self.queue.enqueue(run_agent, task_id, "x", str(self.results), job_id=task_id)
        return before

    def started(self, task_id: str) -> float | None:
        return peer_started(self.results, task_id)

    def done(self) -> int:
        return peer_done(self.results)

    def runs(self) -> Any:
        return peer_runs(self.results)
