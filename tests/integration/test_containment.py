"""Containment in a real worker tree: what a SIGKILLed executor's agent left running dies.

The restarted executor finds it by the agent cgroups still there (cgroup v2), or, without
cgroups, among supervisord's children that are none of its programs (activation.supervise makes
supervisord a subreaper) and by the marker in the environment.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
from pathlib import Path

import psutil
import pytest

from activation.worker.containment import TaskCgroups, containment_id
from tests.conftest import ROOT, wait_for
from tests.harness import cgroup2_root, new_tree

ESCAPE_AGENT = ROOT / "tests" / "escape_agent.py"
GRACE = 1.0  # the harness's ACTIVATION_KILL_GRACE
BOUND = 30.0  # restart of the executor plus the grace, on a shared machine


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def written(pidfile: Path) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    if pidfile.exists():
        for line in pidfile.read_text().splitlines():
            kind, pid = line.split()
            found.setdefault(kind, []).append(int(pid))
    return found


def usable_cgroups(ident: str) -> TaskCgroups | None:
    try:
        return TaskCgroups.probe(ident)
    except OSError:
        return None


ESCAPES = ("env-i", "setsid", "double-fork", "fork-chain")


@pytest.mark.parametrize("containment", ["cgroup", "subreaper"])
def test_a_sigkilled_executors_agent_tree_dies_after_the_restart(tmp_path: Path, containment: str) -> None:
    escapes = ESCAPES
    pidfile = tmp_path / "pids"
    template = shlex.join([sys.executable, str(ESCAPE_AGENT), str(pidfile), *escapes]) + " -p -- {description}"
    tree = new_tree(
        tmp_path,
        "w1",
        agent=template,
        ACTIVATION_CONTAINMENT=containment,
        ACTIVATION_MAX_ATTEMPTS="1",  # recovery dead-letters the task instead of running it again
        ACTIVATION_TASK_TIMEOUT="600",
    )
    ident = containment_id("w1", tree.run_dir)
    if containment == "cgroup":
        probe = usable_cgroups(ident)
        if probe is None:
            pytest.skip("no usable cgroup v2 on this machine")
        probe.close()
    every: list[int] = []
    try:
        tree.start()
        tree.write_task("escapist", "run away")
        wait_for(lambda: set(escapes) | {"agent"} <= set(written(pidfile)), 20, what="every escape started")
        old = tree.kill("executor", signal.SIGKILL)
        tree.wait_restarted("executor", old)

        def all_gone() -> bool:
            every[:] = [pid for pids in written(pidfile).values() for pid in pids]
            return not any(alive(pid) for pid in every)

        wait_for(all_gone, BOUND, 0.1, lambda: f"every pid of {written(pidfile)} gone; log:\n{tree.log_tail()}")
        wait_for(lambda: tree.dead_letter("escapist"), 20, what="recovery to settle the interrupted task")
        # supervisord copies the executor's stderr to the log when it gets to it: the dead letter,
        # written by the executor itself, can be on disk first on a loaded machine.
        wait_for(
            lambda: "agent processes a previous executor left running" in tree.log.read_text(),
            20,
            what="the restarted executor's line naming the strays it killed",
        )
    finally:
        tree.kill_everything()
        for pid in every:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        home = cgroup2_root()
        assert home is None or not (home / f"activation-{ident}").exists(), "the agent cgroups are left behind"
