"""Peer: a naive single-process wrapper of the kind the seed guide shows: watchdog's inotify
observer straight into subprocess. No claim, no validation, no timeout, plain writes; it guarantees
nothing. Run as ``python -m benchmarks.peer_naive INBOX RESULTS``; it creates RESULTS/ready once
it watches.

Atomic writes arrive as moves, so it acts on moved-to as well as created (the guide's on_created
alone never sees a renamed file).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from benchmarks.common import AGENT, peer_done, peer_runs, peer_started, record_run
from tests.harness import wait_until


class Handler(FileSystemEventHandler):
    def __init__(self, results: Path) -> None:
        self.results = results

    def on_created(self, event: FileSystemEvent) -> None:
        self.run(str(event.src_path))

    def on_moved(self, event: FileSystemEvent) -> None:
        self.run(str(event.dest_path))

    def run(self, path: str) -> None:
        name = os.path.basename(path)
        if name.startswith(".") or not name.endswith(".json"):
            return
        with open(path) as handle:
            task = json.load(handle)
        argv = shlex.split(AGENT.replace("{description}", shlex.quote(task["description"])))
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started = time.time()
        child.communicate()
        record_run(self.results, task["task_id"], started)
        os.unlink(path)


def main(inbox: Path, results: Path) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    observer = Observer()
    observer.schedule(Handler(results), str(inbox))
    observer.start()
    (results / "ready").touch()
    stop.wait()
    observer.stop()
    observer.join(5)


class NaiveWrapper:
    """The bench's side of the naive wrapper: the same atomic task files, its plain result files."""

    name = "naive wrapper"

    def __init__(self, root: Path) -> None:
        self.inbox, self.results = root / "inbox", root / "results"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> NaiveWrapper:
        from tests.harness import ROOT

        self.inbox.mkdir(parents=True, exist_ok=True)
        self.results.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.peer_naive", str(self.inbox), str(self.results)],
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
        )
        wait_until(lambda: (self.results / "ready").exists(), 30, 0.02, "the naive wrapper to watch")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def submit(self, task_id: str) -> float:
        from benchmarks.common import atomic_task

        return atomic_task(self.inbox, task_id)

    def started(self, task_id: str) -> float | None:
        return peer_started(self.results, task_id)

    def done(self) -> int:
        return peer_done(self.results)

    def runs(self) -> Any:
        return peer_runs(self.results)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
