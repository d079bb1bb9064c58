"""Probe 7: the Redis Streams transport across real network namespaces (tests/hosts/netns.py).

Redis on one host, the dispatcher on a second (benchmarks/streams_dispatcher.py), worker trees of
one worker role on up to four more, each on its own spool. Measured: XADD to agent start, one task
at a time, beside files-mode inotify from the same run; throughput with 1, 2 and 4 replicas and
an agent that exits at once; the reclaim after a SIGKILL of the holding tree, against the lease;
Redis's used_memory after the throughput runs. Where namespaces cannot be made, it says why.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from benchmarks import burst, latency, streams_figures
from benchmarks.common import AGENT, PRODUCTION, bench_tree, read_json
from benchmarks.stats import summary
from tests.harness import ROOT, RedisServer, WorkerTree, wait_until

WORKER = "bench"
REPLICAS = (1, 2, 4)
LEASE_S = 5.0  # short, so a reclaim is quick to wait out; long enough that a loaded machine renews in time
# The slow agent for the reclaim: tests/streams_agent.py sleeps STREAMS_AGENT_SLEEP seconds.
SLOW_AGENT = shlex.join([sys.executable, str(ROOT / "tests" / "streams_agent.py")]) + " -p -- {description}"
SLOW_AGENT_MARK = "streams_agent.py"


def unavailable() -> str | None:
    """Why this probe cannot run here, or None."""
    from tests.hosts.netns import unavailable_reason

    reason = unavailable_reason()
    if reason:
        return reason.replace("the host tests need", "probe 7 needs")
    if shutil.which("redis-server") is None:
        return "probe 7 needs redis-server (make bench installs it)"
    return None


class Dispatcher:
    """benchmarks/streams_dispatcher.py running inside the dispatcher host, driven over its pipes."""

    def __init__(self, host: Any, url: str, worker: str) -> None:
        self.process = host.popen(
            [sys.executable, "-m", "benchmarks.streams_dispatcher", url, worker],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            bufsize=1,
            cwd=ROOT,
        )
        self._expect("ready")

    def _answer(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the dispatcher exited (code {self.process.poll()})")
        return line.strip()

    def _expect(self, word: str) -> None:
        answer = self._answer()
        if answer != word:
            raise RuntimeError(f"the dispatcher said {answer!r}, expected {word!r}")

    def one(self, task_id: str) -> float:
        """Dispatch one task; the dispatcher's wall clock just before its XADD."""
        assert self.process.stdin is not None
        self.process.stdin.write(f"one {task_id}\n")
        self.process.stdin.flush()
        answer = self._answer()
        try:
            return float(answer)
        except ValueError:
            raise RuntimeError(f"the dispatcher said {answer!r}") from None

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


class StreamsSubject:
    """The role's replicas behind the Subject shape of benchmarks/common.py.

    Tasks go in through the dispatcher host; a task's agent start is the ``started_at`` of its
    result in whichever replica's local spool ran it; results are counted on the result stream.
    """

    name = "streams"

    def __init__(self, client: Any, dispatcher: Dispatcher, trees: list[WorkerTree]) -> None:
        from activation.transport.streams.keys import StreamKeys

        self.client = client
        self.dispatcher = dispatcher
        self.trees = trees
        self.keys = StreamKeys(WORKER)

    def submit(self, task_id: str) -> float:
        return self.dispatcher.one(task_id)

    def started(self, task_id: str) -> float | None:
        from activation.clock import parse_iso

        for tree in self.trees:
            result = read_json(tree.spool.result_path(tree.worker, task_id))
            if result is not None:
                return parse_iso(result.get("started_at"))
        return None

    def done(self) -> int:
        return int(self.client.xlen(self.keys.results))

    def runs(self) -> Counter[str]:
        """Each local result file is one run (a refused late run keeps its local record too)."""
        counts: Counter[str] = Counter()
        for tree in self.trees:
            for path in tree.spool.results(tree.worker).glob("*.json"):
                counts[path.stem] += 1
        return counts


def streams(
    root: Path, samples: int, count: int, reclaims: int, inotify: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Every figure of probe 7; ``inotify`` is the files-mode latency probe's, when it ran in this run."""
    reason = unavailable()
    if reason:
        return {"status": f"not measured: {reason}"}
    r: dict[str, Any] = {"status": "measured", "lease_s": LEASE_S, "tasks": count}
    if inotify is None:
        r["files_inotify"] = _files_inotify(root / "files", samples)
        r["files_inotify_from"] = "this probe's"
    else:
        r["files_inotify"] = inotify["writer"]
        r["files_inotify_from"] = "latency probe"
    with _hosts(root) as (network, server, client):
        r["hosts"] = {name: host.address for name, host in network.hosts.items()}
        dispatcher = Dispatcher(network.hosts["dispatcher"], server.url, WORKER)
        trees: list[WorkerTree] = []
        try:
            r["memory_before_bytes"] = int(client.info("memory")["used_memory"])
            subject = StreamsSubject(client, dispatcher, trees)
            trees.append(_tree(network, 1, root, server).start())
            delays = latency.one_at_a_time(subject, samples, "xadd")
            r["latency"] = summary(delays)
            r.update(_split(trees[0], delays, "xadd"))
            # The same, with the AOF fsynced once a second: every script of the path waits for
            # Redis's fsync under `always` (the reply to a blocked reader goes out after it), and
            # `everysec` is what a user trades a second of acknowledged writes for.
            client.config_set("appendfsync", "everysec")
            try:
                r["latency_everysec"] = summary(latency.one_at_a_time(subject, samples, "xadd-everysec"))
            finally:
                client.config_set("appendfsync", "always")
            r["throughput"] = {}
            for replicas in REPLICAS:
                while len(trees) < replicas:
                    trees.append(_tree(network, len(trees) + 1, root, server).start())
                r["throughput"][str(replicas)] = burst.burst(subject, count, prefix=f"r{replicas}")
            r["scaling"] = streams_figures.scaling(r["throughput"])
            r["memory"] = streams_figures.memory(
                r["memory_before_bytes"], int(client.info("memory")["used_memory"]), subject.done()
            )
            r["memory"]["tasks_left"] = int(client.xlen(subject.keys.tasks))
            for tree in trees:
                tree.kill_everything()
            trees.clear()
            r["reclaim"] = [_reclaim(network, root, server, client, dispatcher, n) for n in range(reclaims)]
        finally:
            for tree in trees:
                tree.kill_everything()
            dispatcher.stop()
    return r


def _split(tree: WorkerTree, delays: list[float], prefix: str) -> dict[str, Any]:
    """Each task's XADD-to-start split at the moment its executor took it: the result's
    ``activation_latency_ms`` is from then (the entry in the local inbox) to the agent started."""
    local, transport = [], []
    for n, delay in enumerate(delays):
        result = tree.result(f"{prefix}-{n:05d}") or {}
        if "activation_latency_ms" in result:
            local.append(float(result["activation_latency_ms"]))
            transport.append(delay - local[-1])
    if not local:
        return {}
    return {"latency_local": summary(local), "latency_transport": summary(transport)}


def _files_inotify(root: Path, samples: int) -> dict[str, float]:
    tree = bench_tree(root)
    try:
        return dict(latency.inotify(tree.start(), samples)["writer"])
    finally:
        tree.kill_everything()


@contextlib.contextmanager
def _hosts(root: Path) -> Any:
    """The network (a Redis host, a dispatcher host, four worker hosts) and Redis, all removed after."""
    import redis

    from tests.hosts.netns import Network, redis_on

    network = Network().create()
    server: RedisServer | None = None
    client = None
    try:
        for name in ("redis", "dispatcher", *(f"worker-{n}" for n in range(1, max(REPLICAS) + 1))):
            network.add_host(name)
        # The settings the README asks of the transport's Redis: AOF (fsync always) and noeviction.
        server = redis_on(network.hosts["redis"], root / "redis").start()
        client = redis.Redis.from_url(server.url, socket_timeout=10, decode_responses=True)
        yield network, server, client
    finally:
        if client is not None:
            client.close()
        if server is not None:
            server.stop()
        network.remove()


def _tree(network: Any, n: int, root: Path, server: RedisServer, *, agent: str = AGENT, **env: str) -> WorkerTree:
    """A replica of WORKER on worker host ``n``, on its own spool, at production intervals."""
    from tests.hosts.netns import tree_on

    host = network.hosts[f"worker-{n}"]
    folder = root / f"{host.name}-{time.monotonic_ns()}"
    settings = {
        **PRODUCTION,
        "REDIS_URL": server.url,
        "ACTIVATION_TRANSPORT": "streams",
        "ACTIVATION_LEASE": f"{LEASE_S:g}",
        **env,
    }
    return tree_on(host, folder, WORKER, agent=agent, **settings)


def _consumer_of(tree: WorkerTree) -> str:
    """A replica's consumer name ends in its supervisord's pid and start (keys.replica_name)."""
    assert tree.process is not None
    return f"/{tree.process.pid}-"


def _pending(client: Any, keys: Any) -> dict[str, Any] | None:
    entries = client.xpending_range(keys.tasks, keys.group, "-", "+", 10)
    return dict(entries[0]) if entries else None


def _runs_agent(tree: WorkerTree) -> bool:
    assert tree.process is not None
    try:
        children = psutil.Process(tree.process.pid).children(recursive=True)
    except psutil.Error:
        return False
    for child in children:
        with contextlib.suppress(psutil.Error):
            if any(SLOW_AGENT_MARK in part for part in child.cmdline()):
                return True
    return False


def _reclaim(
    network: Any, root: Path, server: RedisServer, client: Any, dispatcher: Dispatcher, n: int
) -> dict[str, Any]:
    """SIGKILL the tree holding a running task; the other replica's agent start, against the lease."""
    from activation.clock import parse_iso
    from activation.transport.streams.keys import StreamKeys

    keys = StreamKeys(WORKER)
    task_id = f"reclaim-{n}"
    holder = _tree(network, 1, root, server, agent=SLOW_AGENT, STREAMS_AGENT_SLEEP="120").start()
    taker: WorkerTree | None = None
    try:
        dispatcher.one(task_id)

        def held() -> bool:
            entry = _pending(client, keys)
            return entry is not None and _consumer_of(holder) in entry["consumer"] and _runs_agent(holder)

        wait_until(held, 60, 0.02, lambda: f"the holder running {task_id}; log:\n{holder.log_tail()}")
        # The other replica joins only now, so the holder is the one that took the task.
        taker = _tree(network, 2, root, server, agent=SLOW_AGENT).start()
        entry = _pending(client, keys)
        assert entry is not None and _consumer_of(holder) in entry["consumer"], f"{task_id} left its holder early"
        killed = time.time()
        holder.kill_everything()

        def started() -> float | None:
            assert taker is not None
            result = read_json(taker.spool.result_path(WORKER, task_id))
            return None if result is None else parse_iso(result.get("started_at"))

        started_at = float(wait_until(started, LEASE_S * 4 + 60, 0.01, f"{task_id} reclaimed by the other replica"))
        figures = streams_figures.reclaim(LEASE_S, float(entry["time_since_delivered"]), killed, started_at)
        result = read_json(taker.spool.result_path(WORKER, task_id)) or {}
        figures["delivery"] = ((result.get("metadata") or {}).get("stream") or {}).get("deliveries")
        return figures
    finally:
        holder.kill_everything()
        if taker is not None:
            taker.kill_everything()
