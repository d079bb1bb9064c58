"""What the probes share: the agent, the subject under test (ours and each peer behind one shape),
the atomic writer, and a fast view of supervisord's process states over its own XML-RPC socket.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import xmlrpc.client
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

from activation.clock import iso_now, parse_iso
from activation.spool.task import is_task_name
from tests.harness import WorkerTree, new_tree, wait_until

AGENT = "true -- {description}"  # exits at once: what is left is the wrapper's own cost; "--" as the config requires
AGENT_ARGV = ["true", "--", "x"]
# The production intervals (README's configuration table), not the harness's quick test ones.
PRODUCTION = {"ACTIVATION_HEARTBEAT_INTERVAL": "10", "ACTIVATION_RESCAN_INTERVAL": "5", "ACTIVATION_KILL_GRACE": "5"}


def bench_tree(root: Path, **env: str) -> WorkerTree:
    """A worker tree (not started) running the instant agent, at production intervals unless told."""
    return new_tree(root, agent=AGENT, **{**PRODUCTION, **env})


def launch(tree: WorkerTree) -> WorkerTree:
    """Start the tree's supervisord without waiting for its programs (tree.start() waits, slowly)."""
    with open(tree.log, "ab") as out:
        tree.process = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(tree.conf)],
            env=tree.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    return tree


def atomic_task(folder: Path, task_id: str) -> float:
    """Write a task the way a dispatcher does (temp, fsync, rename); the wall clock just before the rename."""
    tmp = folder / f".tmp_{task_id}.json"
    payload = json.dumps({"task_id": task_id, "description": "x", "created_at": iso_now()}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, payload)
    os.fsync(fd)
    os.close(fd)
    before = time.time()
    os.rename(tmp, folder / f"{task_id}.json")
    return before


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return dict(json.loads(path.read_bytes()))
    except (FileNotFoundError, ValueError):
        return None


class Subject(Protocol):
    """Something that runs the agent for a task: our worker tree, or a peer."""

    name: str

    def submit(self, task_id: str) -> float:
        """Hand the task over; return the wall clock just before the hand-off."""

    def started(self, task_id: str) -> float | None:
        """The wall time its agent started (Popen returned), once its result exists."""

    def done(self) -> int:
        """How many results exist."""

    def runs(self) -> Counter[str]:
        """How many times each task id's agent ran."""


class OurTree:
    """Our worker tree: tasks are atomic files in the inbox, results are the executor's result files."""

    name = "activation"

    def __init__(self, tree: WorkerTree) -> None:
        self.tree = tree
        self.inbox = tree.spool.inbox(tree.worker)
        self.results = tree.spool.results(tree.worker)

    def submit(self, task_id: str) -> float:
        return atomic_task(self.inbox, task_id)

    def started(self, task_id: str) -> float | None:
        result = read_json(self.results / f"{task_id}.json")
        return None if result is None else parse_iso(result.get("started_at"))

    def done(self) -> int:
        # Results only: a task's log (<id>.log) and the listing index (.index) live there too.
        return sum(1 for name in os.listdir(self.results) if is_task_name(name))

    def runs(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for path in self.results.glob("*.json"):
            result = read_json(path) or {}
            counts[path.stem] += int(result.get("attempts") or 1)
        return counts


def record_run(results: Path, task_id: str, started: float) -> None:
    """How the peers record a run: one line in runs.log (O_APPEND), then a plain result file."""
    fd = os.open(results / "runs.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, f"{task_id}\n".encode())
    finally:
        os.close(fd)
    (results / f"{task_id}.json").write_text(json.dumps({"task_id": task_id, "started_at": started}))


def peer_runs(results: Path) -> Counter[str]:
    try:
        return Counter(line for line in (results / "runs.log").read_text().splitlines() if line)
    except FileNotFoundError:
        return Counter()


def peer_started(results: Path, task_id: str) -> float | None:
    result = read_json(results / f"{task_id}.json")
    return None if result is None else float(result["started_at"])


def peer_done(results: Path) -> int:
    return sum(1 for name in os.listdir(results) if name.endswith(".json"))


class Supervisor:
    """supervisord's XML-RPC over its socket, in process: polling it costs a millisecond, not a supervisorctl."""

    def __init__(self, tree: WorkerTree) -> None:
        from supervisor.xmlrpc import SupervisorTransport

        self.tree = tree
        self._transport_class = SupervisorTransport

    def _proxy(self) -> Any:
        # A fresh transport each call: one that saw a refused connection (supervisord still
        # starting) stays stuck in its half-sent request.
        transport = self._transport_class(None, None, f"unix://{self.tree.run_dir}/supervisor.sock")
        return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor

    def states(self) -> dict[str, str]:
        try:
            return {p["name"]: p["statename"] for p in self._proxy().getAllProcessInfo()}
        except (OSError, xmlrpc.client.Error, http.client.HTTPException):
            return {}

    def pid(self, program: str) -> int:
        return int(self._proxy().getProcessInfo(program)["pid"])

    def wait_running(self, timeout: float = 30, interval: float = 0.005) -> float:
        """Poll until every program is RUNNING; the wall time it was first seen so."""

        def running() -> float | None:
            states = self.states()
            ok = bool(states) and all(states.get(p) == "RUNNING" for p in self.tree.programs)
            return time.time() if ok else None

        return float(wait_until(running, timeout, interval, lambda: f"RUNNING; log:\n{self.tree.log_tail()}"))

    def stop_all(self) -> None:
        self._proxy().stopAllProcesses(True)

    def start_all(self) -> None:
        self._proxy().startAllProcesses(False)
