"""Recovery never touches a live or restarting worker, and one worker name is one tree.

Real worker trees under supervisord (the repo's worker.conf) and the real orchestrator, recovering
every 0.1 s with an orphan age of 1 s, so that any mistake shows within the test:
- class 6: a restart by SIGTERM then start, the heartbeat program restarted alone, a taken metrics
  port, an orchestrator clock 60 s ahead: nothing is dead-lettered, no running claim is requeued;
- class 11: a second tree with the same WORKER_NAME is refused, says so, and takes over only once
  the first is gone, recovering the claim the killed one left.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from activation.clock import SYSTEM_CLOCK, Clock
from activation.orchestrator.service import Orchestrator
from activation.spool.atomic import read_json
from activation.spool.layout import Spool
from tests.conftest import wait_for
from tests.harness import BIN, PROGRAMS, WorkerTree, tree_environment
from tests.integration.test_orchestrator import OrchestratorThread

W = "w1"
ORPHAN_AGE = 1.0
OLD = "1970-01-01T00:00:00+00:00"  # what the old rules took as "pending far longer than the orphan age"


@pytest.fixture
def orchestrator(make_settings: Callable[..., Any]) -> Iterator[Callable[..., OrchestratorThread]]:
    started: list[OrchestratorThread] = []

    def run(clock: Clock = SYSTEM_CLOCK, **overrides: Any) -> OrchestratorThread:
        values = {"orphan_age": ORPHAN_AGE, "recovery_interval": 0.1, **overrides}
        settings = make_settings(worker_name=None, **values)
        running = OrchestratorThread(Orchestrator(settings, bind=("127.0.0.1", 0), refresh_interval=0.05, clock=clock))
        started.append(running)
        return running.start()

    yield run
    for running in started:
        if running.thread.is_alive():
            running.stop()


def passes_after(orch: OrchestratorThread, count: int = 3) -> None:
    target = orch.program.recovery_passes + count
    wait_for(lambda: orch.program.recovery_passes >= target, 20, 0.02, f"{count} recovery passes")


def past_the_orphan_age(orch: OrchestratorThread, since: float) -> None:
    """Wait (bounded) until the orphan age has passed on the orchestrator's clock, then some passes."""
    clock = orch.program.clock
    wait_for(lambda: clock.monotonic() - since > 1.5 * ORPHAN_AGE, 20, 0.05, "the orphan age to pass")
    passes_after(orch)


def nothing_dead(spool: Spool) -> None:
    letters = [read_json(p) for p in spool.dead_letters()]
    assert letters == [], [(d.get("task_id"), d.get("reason"), d.get("detail")) for d in letters]


def backlog(tree: WorkerTree, count: int, *, first: str = "sleep=8") -> list[str]:
    """One task that keeps the executor busy, then ``count`` that wait behind it, all "old"."""
    ids = ["busy"] + [f"queued-{i}" for i in range(count)]
    tree.write_task(ids[0], first, created_at=OLD)
    wait_for(lambda: tree.spool.claimed_ids(W) == ["busy"], 20, what="the busy task claimed")
    for task_id in ids[1:]:
        tree.write_task(task_id, "quick", created_at=OLD)
    return ids


def heartbeat_state(spool: Spool) -> str | None:
    try:
        return str(read_json(spool.heartbeat_path(W)).get("state"))
    except (OSError, ValueError):
        return None


# -- class 6 ------------------------------------------------------------------------------------


def test_restart_by_sigterm_then_start_loses_nothing_to_recovery(make_tree, orchestrator, spool):
    tree: WorkerTree = make_tree(W)
    orch = orchestrator()
    ids = backlog(tree, 4, first="sleep=1")
    assert tree.stop() == 0  # docker stop: listener, executor (drains "busy"), heartbeat
    assert heartbeat_state(spool) == "stopped"
    assert spool.count_inbox(W) >= 1  # the backlog waits in the inbox while the tree is down
    past_the_orphan_age(orch, orch.program.clock.monotonic())
    nothing_dead(spool)  # stopped, not dead: ACTIVATION_STOPPED_GRACE (default 1 h)
    tree.start()
    for task_id in ids:
        assert tree.wait_result(task_id)["attempts"] == 1
    nothing_dead(spool)


def test_the_heartbeat_program_restarted_alone_is_no_death(make_tree, orchestrator, spool):
    tree: WorkerTree = make_tree(W)
    orch = orchestrator()
    ids = backlog(tree, 3)
    stopped = tree.ctl("stop", "heartbeat")
    assert "stopped" in stopped.stdout, stopped.stdout + stopped.stderr
    assert heartbeat_state(spool) == "restarting"  # not "stopped": the rest of the tree runs on
    watch = orch.program.watch
    wait_for(lambda: (watch.heartbeat_age(W) or 0) > 1.5 * ORPHAN_AGE, 20, 0.05, "the heartbeat to go quiet")
    passes_after(orch)
    nothing_dead(spool)
    assert spool.count_inbox(W) == 3, "the backlog must still be pending here, or this test proves nothing"
    tree.ctl("start", "heartbeat")
    for task_id in ids:
        assert tree.wait_result(task_id)["attempts"] == 1
    nothing_dead(spool)


def test_a_taken_metrics_port_kills_the_heartbeat_but_not_the_backlog(make_tree, orchestrator, spool):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        tree: WorkerTree = make_tree(W, start=False, ACTIVATION_METRICS_PORT=str(taken.getsockname()[1]))
        tree.launch()

        def working() -> bool:
            states = tree.states()
            return states.get("listener") == "RUNNING" and states.get("executor") == "RUNNING"

        # The heartbeat cannot bind its port: it crash-loops (or, if it learns to live without its
        # metrics, runs on unhealthy); either way the listener and executor work, and must keep their tasks.
        wait_for(working, 30, 0.1, lambda: f"listener and executor RUNNING; log:\n{tree.log_tail()}")
        orch = orchestrator()
        ids = backlog(tree, 3)
        past_the_orphan_age(orch, orch.program.clock.monotonic())
        nothing_dead(spool)
        assert spool.count_inbox(W) == 3, "the backlog must still be pending here, or this test proves nothing"
        for task_id in ids:
            assert tree.wait_result(task_id, timeout=60)["attempts"] == 1
        nothing_dead(spool)


def test_an_orchestrator_clock_60s_ahead_requeues_no_running_claim(make_tree, orchestrator, spool):
    tree: WorkerTree = make_tree(W)
    orch = orchestrator(clock=Clock(offset=60.0))  # ACTIVATION_HEARTBEAT_TIMEOUT is 30 s
    tree.write_task("long", "sleep=4")
    wait_for(lambda: spool.claimed_ids(W) == ["long"], 20, what="the task claimed")
    before = spool.claim_path(W, "long").read_bytes()
    passes_after(orch, 5)
    assert spool.claim_path(W, "long").read_bytes() == before
    watch = orch.program.watch
    wait_for(lambda: watch.heartbeat_age(W) is not None, 20, 0.05, "the heartbeat seen beating")
    status, body = orch.call("GET", "/status")
    health = {w["worker"]: w for w in body["workers"]}[W]
    assert status == 200 and not [p for p in health["problems"] if "stale" in p], health
    result = tree.wait_result("long")
    assert result["attempts"] == 1 and result["status"] == "completed"
    nothing_dead(spool)


# -- class 11 -----------------------------------------------------------------------------------


def twin(tree: WorkerTree, tmp_path: Path) -> WorkerTree:
    """A second tree for the same worker name on the same spool: its own run folder and ports."""
    run_dir = Path(tempfile.mkdtemp(prefix="actw2-"))
    env = tree_environment(tree.spool, run_dir, W)
    return WorkerTree(tree.spool, run_dir, W, env, tmp_path / "supervisord-twin.log")


def test_a_second_tree_with_the_same_name_is_refused_then_takes_over_when_the_first_dies(
    make_tree, orchestrator, tmp_path, spool, caplog
):
    first: WorkerTree = make_tree(W)
    orchestrator(orphan_age=600)
    second = twin(first, tmp_path)
    try:
        second.launch()
        # Each program waits a few seconds for the owner to go, refuses, and stays EXITED: no retry loop.
        wait_for(lambda: second.states() == {p: "EXITED" for p in PROGRAMS}, 30, 0.2, second.log_tail)
        log = second.log.read_text()
        refusals = [line for line in log.splitlines() if "is run by another tree" in line]
        assert len(refusals) == len(PROGRAMS), log
        check = second.cli("check", W)
        assert check.returncode == 1 and "another tree owns this worker" in check.stderr, check.stderr
        assert len(check.stderr.strip().splitlines()) == 1
        assert "another tree owns this worker" in second.cli("status").stdout
        assert "refused a second tree" in first.cli("status").stdout  # the owner's side hears of it too

        def warned() -> bool:
            return any("a second tree for worker w1 was refused" in r.getMessage() for r in caplog.records)

        wait_for(warned, 10, 0.05, "the orchestrator's warning")
        assert first.cli("check", W).returncode == 0
        assert first.states() == {p: "RUNNING" for p in PROGRAMS}
        for i in range(5):
            first.write_task(f"once-{i}", "record=" + str(tmp_path / "runs.log"))
        for i in range(5):
            first.wait_result(f"once-{i}")
        assert len((tmp_path / "runs.log").read_text().splitlines()) == 5  # each ran exactly once

        # The first tree dies by SIGKILL mid-task; the second is started again and takes over.
        first.write_task("stuck", "sleep=2")
        wait_for(lambda: spool.claimed_ids(W) == ["stuck"], 20, what="the task claimed")
        first.kill_everything()
        started = second.ctl("start", "all")
        assert "ERROR" not in started.stdout, started.stdout
        second.wait_running()
        result = second.wait_result("stuck")
        assert result["attempts"] == 2 and result["status"] == "completed"  # the claim was recovered
        assert second.cli("check", W).returncode == 0
    finally:
        second.kill_everything()


def test_a_second_program_is_refused_with_one_line_and_exit_3(make_tree):
    tree: WorkerTree = make_tree(W)
    run_dir = Path(tempfile.mkdtemp(prefix="actw3-"))
    env = {**tree.env, "ACTIVATION_RUN_DIR": str(run_dir)}
    try:
        done = subprocess.run(
            [str(BIN / "activation"), "worker", "executor"], env=env, capture_output=True, text=True, timeout=60
        )
    finally:
        shutil.rmtree(run_dir, ignore_errors=True)
    assert done.returncode == 3, done.stderr
    assert done.stderr.strip().count("\n") == 0 and "is run by another tree" in done.stderr, done.stderr
    assert tree.states() == {p: "RUNNING" for p in PROGRAMS}
    assert json.loads(tree.cli("status", "--json").stdout)[0]["healthy"]


def test_only_exit_3_ends_a_program_every_other_exit_restarts_it(make_tree):
    tree: WorkerTree = make_tree(W)
    for program, sig in (("listener", "TERM"), ("executor", "KILL")):
        old = tree.pid(program)
        tree.ctl("signal", sig, program)  # exit 0 (a SIGTERM from outside supervisord) or -9
        tree.wait_restarted(program, old)
    assert tree.states() == {p: "RUNNING" for p in PROGRAMS}
