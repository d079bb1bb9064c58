"""Probe 4: history. Spools of 1k, 10k, 100k (and, opt-in, 1M) synthetic results, grown in place;
for each size the orchestrator's idle CPU and RSS, its start, one ``GET /config`` (the ``auto``
refresh's answer), and the CLI's ``status``, ``show``, ``audit``, ``dlq list`` and ``tasks``.
Each is then given as a ratio to its 1k figure. The commands' figure is the best of CLI_RUNS;
the first of them, after the spool grew, is reported beside it (the result index is stale then).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from activation.spool.layout import Spool
from benchmarks.idle import process_usage
from tests.harness import WorkerTree, new_orchestrator, wait_until

WORKER = "w1"
DEAD_LETTERS = 10  # constant across sizes: the dead letter is not what grows
CLI_RUNS = 5  # each command's figure is the best of this many runs: the least disturbed by the load
COMMANDS: dict[str, tuple[str, ...] | None] = {
    "--version": ("--version",),  # the floor of every command: the interpreter and click starting
    "status": ("status",),
    "tasks": ("tasks",),
    "show": ("show", "hist-0000500"),
    "audit": ("audit",),
    "dlq list": ("dlq", "list"),
}


def parse_sizes(text: str) -> list[int]:
    """``1k,10k,100k,1m`` as numbers, in increasing order."""
    sizes = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        scale = {"k": 1_000, "m": 1_000_000}.get(part[-1], 1)
        sizes.append(int(float(part[:-1] if scale != 1 else part) * scale))
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"history sizes must be positive, got {text!r}")
    return sorted(set(sizes))


def label(size: int) -> str:
    if size >= 1_000_000 and size % 1_000_000 == 0:
        return f"{size // 1_000_000}M"
    if size >= 1_000 and size % 1_000 == 0:
        return f"{size // 1_000}k"
    return str(size)


def _result(task_id: str, when: dt.datetime) -> bytes:
    created = when.isoformat(timespec="microseconds")
    finished = (when + dt.timedelta(seconds=2)).isoformat(timespec="microseconds")
    record = {
        "task_id": task_id,
        "worker": WORKER,
        "status": "completed",
        "exit_code": 0,
        "signal": None,
        "stdout": "done\n",
        "stderr": "",
        "truncated": False,
        "attempts": 1,
        "created_at": created,
        "started_at": created,
        "finished_at": finished,
        "duration_s": 2.0,
        "activation_latency_ms": 1.5,
        "resources": {"cpu_seconds": 0.01, "rss_peak_bytes": 1048576},
        "metadata": {},
    }
    return (json.dumps(record) + "\n").encode()


def grow(folder: Path, have: int, want: int) -> float:
    """Write results ``have`` .. ``want``-1 as plain files (synthetic: fast, not durable); seconds taken."""
    began = time.perf_counter()
    base = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    for i in range(have, want):
        path = os.path.join(folder, f"hist-{i:07d}.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(fd, _result(f"hist-{i:07d}", base + dt.timedelta(seconds=i)))
        os.close(fd)
    return time.perf_counter() - began


def _dead_letters(tree: WorkerTree) -> None:
    for i in range(DEAD_LETTERS):
        task_id = f"dead-{i:03d}"
        record = {
            "task_id": task_id,
            "worker": WORKER,
            "reason": "invalid_field",
            "detail": "timeout must be a number",
            "dead_at": "2026-01-01T00:00:00.000000+00:00",
            "source": str(tree.spool.task_path(WORKER, task_id)),
            "task": {"task_id": task_id, "description": "x", "timeout": "soon"},
        }
        tree.spool.dead_letter_path(task_id).write_text(json.dumps(record))


def _get(url: str) -> float:
    began = time.perf_counter()
    with urllib.request.urlopen(url, timeout=30) as answer:
        answer.read()
    return (time.perf_counter() - began) * 1000


def _run(tree: WorkerTree, argv: tuple[str, ...]) -> tuple[float, float, int, int]:
    """One CLI run: wall ms, CPU ms (user + system, of the command's process), output bytes, exit code.

    The CPU time comes from the children's rusage: during these runs the command is the only
    child this process reaps.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    done = tree.cli(*argv, timeout=600)
    wall = (time.perf_counter() - began) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1000
    return wall, cpu, len(done.stdout) + len(done.stderr), done.returncode


def _cli(tree: WorkerTree, argv: tuple[str, ...]) -> dict[str, Any]:
    """Best of CLI_RUNS, in wall time and in CPU time. The CPU time is what the command did, and
    the load moves it less than the wall time; the wall time is what its user waits."""
    runs = [_run(tree, argv) for _ in range(CLI_RUNS)]
    return {
        "ms": min(r[0] for r in runs),
        "cpu_ms": min(r[1] for r in runs),
        # The first run after the spool grew: `status` and `tasks` find their result index stale
        # then and list and stat every result once, to write it back (spool/result_index.py).
        "first_cpu_ms": runs[0][1],
        "output_bytes": runs[-1][2],
        "exit_code": runs[-1][3],
    }


def measure(tree: WorkerTree, size: int, window: float, settle: float) -> dict[str, Any]:
    url = f"http://{tree.env['ACTIVATION_ADMIN_BIND']}"
    began = time.perf_counter()
    tree.start()
    wait_until(lambda: _answers(url), 600, 0.05, "the orchestrator's API")
    ready_s = time.perf_counter() - began
    time.sleep(settle)  # past the first refresh and recovery: this measures idling
    orchestrator = int(tree.ctl("pid", "orchestrator").stdout.strip())
    usage = process_usage(orchestrator, window)
    config_ms = min(_get(f"{url}/config") for _ in range(5))  # best of 5, like the CLI
    commands = {name: (_cli(tree, argv) if argv else None) for name, argv in COMMANDS.items()}
    work = in_process(tree.spool)
    return {
        "results": size,
        "ready_s": ready_s,
        "idle_cpu_percent": usage["cpu_percent"],
        "idle_rss_mb": usage["rss_mb"],
        "resolution_percent": usage["resolution_percent"],
        "get_config_ms": config_ms,
        "commands": commands,
        "in_process": work,
    }


def _cpu_ms(work: Callable[[], object], runs: int = CLI_RUNS) -> float:
    best = float("inf")
    for _ in range(runs):
        began = time.process_time()
        work()
        best = min(best, time.process_time() - began)
    return best * 1000


def in_process(spool: Spool) -> dict[str, float]:
    """What ``status``, ``tasks`` and ``audit`` do, called in this process: CPU ms, best of
    CLI_RUNS, without the interpreter's start that dominates (and, loaded, blurs) a command's
    figure. ``status_stale_ms`` is one run with the result index gone, as after any change."""
    from activation.spool.audit import audit
    from activation.spool.listing import Query, list_tasks
    from activation.spool.result_index import ResultIndex
    from activation.spool.status import live_status

    ResultIndex(spool, WORKER).path.unlink(missing_ok=True)
    stale = _cpu_ms(lambda: live_status(spool, timeout=30.0), runs=1)
    return {
        "status_stale_ms": stale,
        "status_ms": _cpu_ms(lambda: live_status(spool, timeout=30.0)),
        "tasks_ms": _cpu_ms(lambda: list_tasks(spool, Query())),
        "audit_ms": _cpu_ms(lambda: audit(spool, heartbeat_timeout=30.0, temp_age=3600.0)),
    }


def _answers(url: str) -> bool:
    try:
        _get(f"{url}/config")
    except OSError:
        return False
    return True


def history(root: Path, sizes: list[int], window: float, settle: float) -> dict[str, Any]:
    rows, have = [], 0
    base = root / "history"
    for size in sizes:
        tree = new_orchestrator(base, ORCHESTRATOR_MODE="auto")  # same spool each time: it grows
        tree.spool.init([WORKER])
        results = tree.spool.results(WORKER)
        if have == 0:
            _dead_letters(tree)
        wrote = grow(results, have, size)
        have = size
        try:
            row = measure(tree, size, window, settle)
            row["write_s"] = wrote
            rows.append(row)
        finally:
            tree.kill_everything()
    return {"window_s": window, "rows": rows}
