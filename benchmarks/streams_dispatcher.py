"""The dispatcher host's side of probe 7: a process started inside the dispatcher's network namespace
that dispatches tasks to a worker role's stream when the bench asks, and answers with its clock.

One command a line on stdin, one answer a line on stdout: ``one TASK_ID`` dispatches that task and
answers the wall time just before its XADD (the dispatch script). EOF ends it.
Usage: ``python -m benchmarks.streams_dispatcher REDIS_URL WORKER``.
"""

from __future__ import annotations

import sys
import time

import redis

from activation.clock import iso_now
from activation.transport.streams.client import StreamsTransport


def serve(url: str, worker: str) -> int:
    client = redis.Redis.from_url(url, socket_timeout=10, decode_responses=True)
    transport = StreamsTransport(client, worker, consumer="bench-dispatcher")
    transport.ensure_groups()
    print("ready", flush=True)
    for line in sys.stdin:
        command, _, task_id = line.strip().partition(" ")
        if command != "one" or not task_id:
            print(f"error: expected 'one TASK_ID', got {line.strip()[:80]!r}", flush=True)
            continue
        task = {"task_id": task_id, "description": "x", "created_at": iso_now()}
        before = time.time()
        transport.dispatch(task_id, task)
        print(f"{before:.6f}", flush=True)
    client.close()
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        sys.exit(2)
    sys.exit(serve(sys.argv[1], sys.argv[2]))
