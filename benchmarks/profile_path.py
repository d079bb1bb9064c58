"""Probe 1's profile: where the time from the rename to ``Popen`` returning goes (issue 15, target 1).

The listener and the executor of a real tree under supervisord run under cProfile, every thread
of them (a shim named ``activation`` first on the tree's PATH runs them through `run_profiled`),
while probe 1's loop hands them one task at a time. After a graceful stop each writes its stats;
this prints the per-task time of each step on the path, beside the writer's latency of the same
(profiled) run.

cProfile adds its own cost to every Python call, so the steps written in Python look heavier than
they are: read the shares, not the absolute times. Run ``python -m benchmarks.profile_path``.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from benchmarks import floor
from benchmarks.common import AGENT_ARGV, OurTree, bench_tree
from benchmarks.latency import one_at_a_time
from benchmarks.stats import summary

REPO = Path(__file__).resolve().parent.parent
SHIM = """#!/bin/sh
# benchmarks/profile_path.py: the listener and the executor run under cProfile
if [ "$1" = worker ] && { [ "$2" = listener ] || [ "$2" = executor ]; }; then
    PYTHONPATH={repo} exec {python} -m benchmarks.profile_path --run-profiled {out}/"$2".prof -- "$@"
fi
exec {real} "$@"
"""

# The steps on the path, in order: (program, label, the function whose cumulative time it is).
# A function is named as pstats names it: (file suffix, function name).
STEPS: list[tuple[str, str, tuple[str, str]]] = [
    ("listener", "wake-up handled (notify: read, validate, hand off)", ("worker/listener.py", "notify")),
    ("listener", "  read and validate the task file", ("spool/task.py", "parse_task")),
    ("listener", "  hand-off to the work queue (put)", ("worker/queue.py", "put")),
    ("executor", "process: claim to agent started and run", ("worker/executor.py", "process")),
    ("executor", "  claim (rename into .processing/)", ("worker/executor.py", "_claim")),
    ("executor", "  visibility stamp (lstat)", ("worker/executor.py", "_visible_ns")),
    ("executor", "  load the claimed task", ("spool/task.py", "load_task")),
    ("executor", "  open the task's log", ("spool/tasklog.py", "open_log")),
    ("executor", "  plan the launch (argv, template)", ("worker/spawn.py", "plan_launch")),
    ("executor", "  Popen (fork/exec until it returns)", ("subprocess.py", "__init__")),
    ("executor", "  run_agent (spawn, supervise, reap)", ("worker/agent.py", "run_agent")),
    ("executor", "  after the run: result written, durable", ("worker/finishing.py", "finish")),
]


def write_shim(folder: Path, out: Path) -> None:
    real = Path(sys.executable).with_name("activation")
    text = SHIM.replace("{python}", sys.executable).replace("{out}", str(out)).replace("{real}", str(real))
    text = text.replace("{repo}", str(REPO))
    shim = folder / "activation"
    shim.write_text(text)
    shim.chmod(shim.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)


def run_profiled(out: str, args: list[str]) -> int:
    """Run ``activation ARGS`` with a profile per thread (cProfile sees only the thread that enables
    it: the listener's wake-ups run on watchdog's), merged into ``out`` when it ends."""
    profiles = [cProfile.Profile()]

    def start_profile(*_event: object) -> None:  # a new thread's first profiling event: its own profile
        profile = cProfile.Profile()
        profiles.append(profile)
        profile.enable()  # replaces this hook for the rest of the thread

    threading.setprofile(start_profile)
    from activation.cli import main as cli_main

    sys.argv = ["activation", *args]
    profiles[0].enable()
    try:
        cli_main()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0
    finally:
        profiles[0].disable()
        pstats.Stats(*profiles).dump_stats(out)
    return 0


def cumulative_ms(stats: pstats.Stats, where: tuple[str, str]) -> tuple[float, int]:
    """Total cumulative milliseconds and calls of the function ``where`` names (summed over matches)."""
    suffix, name = where
    total, calls = 0.0, 0
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, function), (_cc, primitive, _tt, cumulative, _callers) in raw.items():
        if function == name and filename.endswith(suffix):
            total += cumulative * 1000
            calls += primitive
    return total, calls


def profile(root: Path, samples: int) -> dict[str, Any]:
    profiles = root / "profiles"
    shims = root / "bin"
    profiles.mkdir(parents=True)
    shims.mkdir()
    write_shim(shims, profiles)
    tree = bench_tree(root / "tree")
    tree.env["PATH"] = f"{shims}{os.pathsep}{tree.env['PATH']}"
    try:
        tree.start()
        delays = one_at_a_time(OurTree(tree), samples, "prof")
        tree.stop()  # SIGTERM: each program ends its loop, and cProfile writes its stats
    finally:
        tree.kill_everything()
    rows: list[dict[str, Any]] = []
    for program, label, where in STEPS:
        path = profiles / f"{program}.prof"
        if not path.exists():
            rows.append({"program": program, "step": label, "ms_per_task": None, "calls": 0})
            continue
        total, calls = cumulative_ms(pstats.Stats(str(path)), where)
        rows.append({"program": program, "step": label, "ms_per_task": total / samples, "calls": calls})
    # The same spawn from this small process, in the same run: what Popen costs without our executor.
    bare = summary(floor.spawn(AGENT_ARGV, samples))
    return {"samples": samples, "writer": summary(delays), "bare_spawn": bare, "steps": rows}


def print_report(figures: dict[str, Any]) -> None:
    writer = figures["writer"]
    print(
        f"profiled run, {figures['samples']} tasks one at a time: writer -> agent "
        f"p50 {writer['p50']:.2f} ms, mean {writer['mean']:.2f} ms"
    )
    bare = figures["bare_spawn"]
    print(f"a bare Popen of the same agent from the bench: mean {bare['mean']:.3f} ms, p50 {bare['p50']:.3f} ms")
    print("(each step below is a mean per task: cumulative time over the run / tasks)")
    print(f"{'program':<9} {'step':<52} {'ms/task':>8} {'calls':>7}")
    for row in figures["steps"]:
        ms = "-" if row["ms_per_task"] is None else f"{row['ms_per_task']:.3f}"
        print(f"{row['program']:<9} {row['step']:<52} {ms:>8} {row['calls']:>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_path", description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=300, help="tasks, one at a time (default 300)")
    parser.add_argument("--run-profiled", metavar="OUT", help=argparse.SUPPRESS)  # the shim's entry
    parser.add_argument("program", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_profiled:
        return run_profiled(args.run_profiled, args.program)
    with tempfile.TemporaryDirectory(prefix="act-profile-") as folder:
        print_report(profile(Path(folder), args.samples))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
