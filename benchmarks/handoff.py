"""The work queue's hand-off: from put() to a blocked taker holding the id, in-process and over the socket.

These were timing assertions in the unit tests; timings belong here, as figures beside the spawn.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from activation.worker.queue import QueueClient, QueueServer, WorkQueue, load_authkey, socket_path


def _handoffs(samples: int, take: object, work: WorkQueue, settle: float) -> list[float]:
    delays = []
    for i in range(samples):
        stamp: list[float] = []
        taker = threading.Thread(target=lambda out=stamp: (take(), out.append(time.perf_counter())))  # type: ignore[operator]
        taker.start()
        time.sleep(settle)  # let it block in its wait
        started = time.perf_counter()
        work.put(f"t{i}", "inotify")
        taker.join(5)
        delays.append((stamp[0] - started) * 1000)
    return delays


def in_process(samples: int) -> list[float]:
    work = WorkQueue()
    return _handoffs(samples, lambda: work.take("consumer", 5), work, 0.002)


def over_socket(samples: int) -> list[float]:
    with tempfile.TemporaryDirectory(prefix="actbench-q-") as tmp:
        run_dir = Path(tmp)
        work = WorkQueue()
        server = QueueServer(socket_path(run_dir), load_authkey(run_dir), work, lambda: {})
        server.start()
        client = QueueClient(socket_path(run_dir), load_authkey(run_dir))
        try:
            client.get(0)  # connect first
            return _handoffs(samples, lambda: client.get(5), work, 0.003)
        finally:
            client.close()
            server.stop()
