"""``make bench``: every figure of issue 15 beside its target, each as a ratio to a floor measured in
the same run, with RQ and a naive wrapper side by side. One module per probe; this one runs them
in order and prints the table (raw figures in benchmarks/results/latest.json).

Timings on a shared 2-core machine drift between runs: compare the ratios.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import api, burst, first_task, floor, handoff, history, idle, latency, peer_naive, peer_rq, report
from benchmarks import streams as streams_probe
from benchmarks.common import AGENT_ARGV, OurTree, bench_tree
from benchmarks.stats import summary
from tests.harness import ROOT

RESULTS = ROOT / "benchmarks" / "results"
PROBES = ("latency", "first", "idle", "burst", "api", "history", "peers", "streams")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="a short run: fewer samples, a 300-task burst, 10 s idle, history 1k,10k"
    )
    parser.add_argument("--only", default=",".join(PROBES), help=f"probes to run, comma-separated: {','.join(PROBES)}")
    parser.add_argument("--samples", type=int, help="latency samples per subject (default 300; quick 50)")
    parser.add_argument("--burst", type=int, help="tasks in each burst (default 2000; quick 300)")
    parser.add_argument("--idle", type=float, help="seconds of the idle window (default 60; quick 10)")
    parser.add_argument("--poll-interval", type=float, default=0.25, help="ACTIVATION_POLL_INTERVAL for poll mode")
    parser.add_argument("--starts", type=int, help="fresh starts for the first-task probe (default 3; quick 1)")
    parser.add_argument("--restarts", type=int, help="restarts for the first-task probe (default 3; quick 1)")
    parser.add_argument("--history", help="history sizes (default 1k,10k,100k; quick 1k,10k; add 1m for 1M results)")
    parser.add_argument("--history-window", type=float, help="seconds of the orchestrator's idle window (default 30)")
    parser.add_argument("--api-requests", type=int, help="POST /tasks in all (default 2000; quick 400)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent API clients")
    parser.add_argument("--reclaims", type=int, help="streams: SIGKILLs of a holding tree to time (default 3; quick 1)")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults: dict[str, Any] = {
        "samples": 50 if quick else 300,
        "burst": 300 if quick else 2000,
        "idle": 10.0 if quick else 60.0,
        "starts": 1 if quick else 3,
        "restarts": 1 if quick else 3,
        "history": "1k,10k" if quick else "1k,10k,100k",
        "history_window": 10.0 if quick else 30.0,
        "api_requests": 400 if quick else 2000,
        "reclaims": 1 if quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.only = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = args.only - set(PROBES)
    if unknown:
        parser.error(f"unknown probe(s) {', '.join(sorted(unknown))}; choose from {', '.join(PROBES)}")
    args.settle = 3.0 if quick else 10.0
    return args


def step(name: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] load {os.getloadavg()[0]:.1f}: {name}", flush=True)


def run(args: argparse.Namespace) -> dict[str, Any]:
    r: dict[str, Any] = {
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "cores": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load": {"start": os.getloadavg()[0]},
        "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
    }
    only = args.only

    def probe(key: str, what: str, measure: Callable[[], Any], into: dict[str, Any] = r) -> None:
        """Run one probe; a failure is printed and recorded, and the others still run."""
        step(what)
        try:
            into[key] = measure()
        except Exception as exc:  # a bench that dies on one probe prints nothing at all
            traceback.print_exc()
            r.setdefault("errors", {})[f"{key} ({what})"] = f"{type(exc).__name__}: {exc}"

    with tempfile.TemporaryDirectory(prefix="actbench-") as tmp:
        root = Path(tmp)
        r["floor"] = floor.measure(root / "floor", AGENT_ARGV, args.samples)
        n = min(args.samples, 100)
        probe(
            "handoff_ms",
            "work queue hand-off",
            lambda: {"in_process": summary(handoff.in_process(n)), "socket": summary(handoff.over_socket(n))},
        )
        if only & {"latency", "idle", "burst", "peers"}:
            tree = bench_tree(root / "inotify")
            try:
                probe("inotify", "our tree, inotify: latency", lambda: latency.inotify(tree.start(), args.samples))
                if "idle" in only:
                    probe(
                        "idle", f"our tree: idle for {args.idle:g} s", lambda: idle.idle(tree, args.idle, args.settle)
                    )
                    probe("sigterm", "our tree: SIGTERM to an idle executor", lambda: idle.sigterm_exit(tree, 3))
                if only & {"burst", "peers"}:
                    tree.wait_running()
                    probe("burst", f"our tree: burst of {args.burst}", lambda: burst.burst(OurTree(tree), args.burst))
            finally:
                tree.kill_everything()
        if "latency" in only:
            probe("redis_event", "our tree, Redis events: latency", lambda: latency.redis_event(root, args.samples))
            probe(
                "poll",
                "our tree, poll: latency",
                lambda: latency.poll(root, max(20, args.samples // 10), args.poll_interval),
            )
        if "first" in only:
            probe(
                "first_task",
                "first task after a start and a restart",
                lambda: first_task.first_task(root, args.starts, args.restarts),
            )
        if "peers" in only:
            r["peers"] = {}
            peers: list[Any] = [peer_rq.RqSimpleWorker(root / "rq"), peer_naive.NaiveWrapper(root / "naive")]
            for peer in peers:
                try:
                    probe(
                        peer.name,
                        f"peer {peer.name}: latency and burst",
                        functools.partial(_peer, peer, args.samples, args.burst),
                        r["peers"],
                    )
                finally:
                    peer.stop()
        if "api" in only:
            probe(
                "api",
                f"POST /tasks from {args.clients} clients",
                lambda: api.post_tasks(root, args.clients, args.api_requests),
            )
        if "history" in only:
            sizes = history.parse_sizes(args.history)
            probe(
                "history",
                f"history: {', '.join(history.label(s) for s in sizes)} results",
                lambda: history.history(root, sizes, args.history_window, args.settle),
            )
        if "streams" in only:
            probe(
                "streams",
                f"streams across network namespaces: latency, {args.burst} tasks to 1/2/4 replicas, reclaim",
                lambda: streams_probe.streams(
                    root / "streams", args.samples, args.burst, args.reclaims, r.get("inotify")
                ),
            )
        step("cleaning up")
    r["load"]["end"] = os.getloadavg()[0]
    return r


def _peer(peer: Any, samples: int, count: int) -> dict[str, Any]:
    peer.start()
    return {"latency": summary(latency.one_at_a_time(peer, samples, "lat")), "burst": burst.burst(peer, count)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    r = run(args)
    print()
    print(report.render(r))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(r, indent=2) + "\n")
    print(f"\n(raw figures in {(RESULTS / 'latest.json').relative_to(ROOT)})")


if __name__ == "__main__":
    main()
