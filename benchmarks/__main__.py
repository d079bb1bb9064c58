"""Measure a real worker tree, side by side in one run, and print the figures as a table.

Timings on a shared 2-core machine drift from run to run, so every latency is also given as a
ratio to the bare cost of spawning the same agent, measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from activation.clock import iso_now, parse_iso
from benchmarks import handoff
from tests.harness import ROOT, RedisServer, WorkerTree, new_tree, wait_until

AGENT = "true -- {description}"  # an agent that exits at once: what is left is activation's own cost
RESULTS = ROOT / "benchmarks" / "results"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "mean": statistics.fmean(values),
    }


def spawn_cost(samples: int) -> dict[str, float]:
    """The bare cost of starting the agent: Popen returning, as the executor measures it."""
    argv = shlex.split(AGENT.replace("{description}", "x"))
    times = []
    for _ in range(samples):
        began = time.perf_counter()
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        times.append((time.perf_counter() - began) * 1000)
        child.communicate()
    return summary(times)


def atomic_write(folder: Path, task_id: str) -> float:
    """Write a task the way a dispatcher does; return the wall time just before the rename."""
    tmp = folder / f".tmp_{task_id}.json"
    payload = json.dumps({"task_id": task_id, "description": "x", "created_at": iso_now()}).encode()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, payload)
    os.fsync(fd)
    os.close(fd)
    before = time.time()
    os.rename(tmp, folder / f"{task_id}.json")
    return before


def latency(tree: WorkerTree, samples: int, prefix: str) -> dict[str, dict[str, float]]:
    """One task at a time, the executor idle: from the atomic rename to the agent starting.

    ``writer`` is measured from the writer's clock just before the rename to the result's
    ``started_at``; ``executor`` is the result's own ``activation_latency_ms``.
    """
    writer, executor = [], []
    inbox = tree.spool.inbox(tree.worker)
    for i in range(samples):
        task_id = f"{prefix}-{i:04d}"
        time.sleep(0.02 + (i % 7) * 0.003)  # do not beat in step with any timer
        renamed = atomic_write(inbox, task_id)
        result = wait_until(lambda task_id=task_id: tree.result(task_id), 60, 0.005, f"result of {task_id}")
        started = parse_iso(result["started_at"])
        assert started is not None
        writer.append((started - renamed) * 1000)
        executor.append(float(result["activation_latency_ms"]))
    return {"writer": summary(writer), "executor": summary(executor)}


def event_latency(tree: WorkerTree, redis_url: str, samples: int) -> dict[str, dict[str, float]]:
    """Polling at 30 s, so only the Redis event can explain a fast wake: PUBLISH to agent start."""
    import redis

    client = redis.Redis.from_url(redis_url)
    writer, executor = [], []
    inbox = tree.spool.inbox(tree.worker)
    try:
        for i in range(samples):
            task_id = f"evt-{i:04d}"
            time.sleep(0.02 + (i % 7) * 0.003)
            atomic_write(inbox, task_id)
            published = time.time()
            client.publish(f"activate:{tree.worker}", task_id)
            result = wait_until(lambda task_id=task_id: tree.result(task_id), 60, 0.005, f"result of {task_id}")
            assert result["source"] == "redis", result["source"]
            started = parse_iso(result["started_at"])
            assert started is not None
            writer.append((started - published) * 1000)
            executor.append(float(result["activation_latency_ms"]))
    finally:
        client.close()
    return {"writer": summary(writer), "executor": summary(executor)}


def burst(tree: WorkerTree, count: int) -> dict[str, Any]:
    ids = [f"burst-{i:05d}" for i in range(count)]
    results = tree.spool.results(tree.worker)
    already = len(os.listdir(results))
    began = time.perf_counter()
    for task_id in ids:
        tree.write_task(task_id, "x")
    written = time.perf_counter() - began
    wait_until(lambda: len(os.listdir(results)) - already >= count, 300, 0.01, f"{count} results")
    elapsed = time.perf_counter() - began
    got = sorted(p.stem for p in results.glob("burst-*.json"))
    return {
        "tasks": count,
        "write_s": round(written, 3),
        "elapsed_s": round(elapsed, 3),
        "tasks_per_s": round(count / elapsed, 1),
        "lost": len(set(ids) - set(got)),
        "extra": len(got) - len(set(got)) + len(set(got) - set(ids)),
    }


def idle(tree: WorkerTree, seconds: float) -> dict[str, Any]:
    """CPU and memory of supervisord and all its programs while nothing happens."""
    assert tree.process is not None
    time.sleep(10)  # let the burst's last heartbeat and rescan pass: this measures idling
    root = psutil.Process(tree.process.pid)
    procs = [root, *root.children(recursive=True)]
    before = {p.pid: sum(p.cpu_times()[:4]) for p in procs}
    time.sleep(seconds)
    cpu = sum(sum(p.cpu_times()[:4]) - before[p.pid] for p in procs)
    memory = [p.memory_full_info() for p in procs]
    return {
        "seconds": seconds,
        "processes": len(procs),
        "cpu_percent_of_one_core": round(cpu / seconds * 100, 4),
        "rss_mb": round(sum(m.rss for m in memory) / 2**20, 1),
        "pss_mb": round(sum(m.pss for m in memory) / 2**20, 1),
        "uss_mb": round(sum(m.uss for m in memory) / 2**20, 1),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with tempfile.TemporaryDirectory(prefix="actbench-") as tmp:
        root = Path(tmp)
        report["spawn_ms"] = spawn_cost(args.samples)
        report["handoff_ms"] = {
            "in_process": summary(handoff.in_process(min(args.samples, 100))),
            "socket": summary(handoff.over_socket(min(args.samples, 100))),
        }

        tree = new_tree(
            root / "inotify", agent=AGENT, ACTIVATION_HEARTBEAT_INTERVAL="10", ACTIVATION_RESCAN_INTERVAL="5"
        )
        try:
            tree.start()
            report["inotify_ms"] = latency(tree, args.samples, "ino")
            report["burst"] = burst(tree, args.burst)
            report["idle"] = idle(tree, args.idle)
        finally:
            tree.kill_everything()

        redis_server = RedisServer(root / "redis").start()
        tree = new_tree(
            root / "events",
            agent=AGENT,
            REDIS_URL=redis_server.url,
            ACTIVATION_MODE="poll,redis",
            ACTIVATION_POLL_INTERVAL="30",
            ACTIVATION_RESCAN_INTERVAL="30",
        )
        try:
            tree.start()
            report["redis_ms"] = event_latency(tree, redis_server.url, args.samples)
        finally:
            tree.kill_everything()
            redis_server.stop()

        tree = new_tree(
            root / "poll", agent=AGENT, ACTIVATION_MODE="poll", ACTIVATION_POLL_INTERVAL=str(args.poll_interval)
        )
        try:
            tree.start()
            report["poll_ms"] = latency(tree, max(20, args.samples // 10), "poll")
            report["poll_interval_ms"] = args.poll_interval * 1000
        finally:
            tree.kill_everything()
    spawn = report["spawn_ms"]
    report["inotify_ratio_p50"] = round(report["inotify_ms"]["writer"]["p50"] / spawn["p50"], 2)
    report["inotify_ratio_p99"] = round(report["inotify_ms"]["writer"]["p99"] / spawn["p99"], 2)
    report["redis_ratio_p50"] = round(report["redis_ms"]["writer"]["p50"] / spawn["p50"], 2)
    return report


def table(report: dict[str, Any]) -> str:
    def row(name: str, s: dict[str, float], ratio_to: dict[str, float] | None = None) -> str:
        line = f"{name:<28} {s['p50']:>9.3f} {s['p95']:>9.3f} {s['p99']:>9.3f}  n={s['n']}"
        if ratio_to:
            line += f"   p50 = {s['p50'] / ratio_to['p50']:.2f} x spawn"
        return line

    spawn = report["spawn_ms"]
    burst_ = report["burst"]
    idle_ = report["idle"]
    lines = [
        f"machine: {report['machine']}  ({report['when']})",
        f"{'activation latency (ms)':<28} {'p50':>9} {'p95':>9} {'p99':>9}",
        row("bare agent spawn", spawn),
        row("queue hand-off, in process", report["handoff_ms"]["in_process"]),
        row("queue hand-off, socket", report["handoff_ms"]["socket"]),
        row("inotify (writer's clock)", report["inotify_ms"]["writer"], spawn),
        row("inotify (result field)", report["inotify_ms"]["executor"], spawn),
        row("redis event, poll at 30 s", report["redis_ms"]["writer"], spawn),
        row(f"poll {report['poll_interval_ms']:g} ms (writer)", report["poll_ms"]["writer"]),
        f"burst: {burst_['tasks']} tasks in {burst_['elapsed_s']} s = {burst_['tasks_per_s']} tasks/s, "
        f"lost {burst_['lost']}, extra {burst_['extra']}",
        f"idle over {idle_['seconds']:g} s: {idle_['cpu_percent_of_one_core']}% of one core, "
        f"{idle_['processes']} processes, RSS {idle_['rss_mb']} MB "
        f"(PSS {idle_['pss_mb']} MB, USS {idle_['uss_mb']} MB)",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="make bench", description=__doc__)
    parser.add_argument("--samples", type=int, default=300, help="latency samples per mode")
    parser.add_argument("--burst", type=int, default=2000, help="tasks in the burst")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle measurement")
    parser.add_argument("--poll-interval", type=float, default=0.25, help="ACTIVATION_POLL_INTERVAL for poll mode")
    args = parser.parse_args()
    report = run(args)
    print(table(report))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"(raw figures in {RESULTS / 'latest.json'})")


if __name__ == "__main__":
    main()
