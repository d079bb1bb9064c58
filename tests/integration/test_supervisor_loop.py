"""supervisord's loop under the repo's worker.conf (activation/supervisor_loop.py): asleep while
nothing is due, and still at once for what it must do: restart a killed program, answer
supervisorctl, stop on SIGTERM.

These tests are also the contract with the pinned supervisor: the quiet poller relies on its
poller and process objects, and an upgrade that changes them fails here (or supervisord refuses
to start, naming the activation RPC interface)."""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from activation.spool.atomic import read_json
from activation.worker.supervision import STATES_FILE
from tests.conftest import wait_for
from tests.harness import WorkerTree

pytestmark = pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads /proc")


def wakes(pid: int) -> int:
    """How many times the process's main thread went to sleep and was woken (the kernel's count)."""
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def quiet_tree(make_tree: Callable[..., WorkerTree]) -> WorkerTree:
    """A running tree whose heartbeat is stopped, so that no XML-RPC call reaches supervisord."""
    tree = make_tree()
    assert "stopped" in tree.ctl("stop", "heartbeat").stdout
    return tree


def test_an_idle_supervisord_sleeps_instead_of_waking_every_second(make_tree: Callable[..., WorkerTree]) -> None:
    tree = quiet_tree(make_tree)
    assert tree.process is not None
    time.sleep(1.5)  # the loop after the stop call's connection closed
    before = wakes(tree.process.pid)
    time.sleep(3)
    assert wakes(tree.process.pid) - before <= 1  # supervisor's own loop: one a second, 3 here


def test_a_killed_program_is_restarted_at_once_not_at_the_idle_timeout(make_tree: Callable[..., WorkerTree]) -> None:
    tree = quiet_tree(make_tree)
    time.sleep(1.5)  # asleep in the long poll
    old = tree.kill("executor")

    def restarted() -> bool:
        return tree.states().get("executor") == "RUNNING" and tree.pid("executor") != old

    # The idle timeout is 30 s: only the SIGCHLD's wake-up restarts it sooner (startsecs=1).
    wait_for(restarted, 15, 0.1, "the executor restarted")


def test_supervisorctl_stop_and_start_answer_while_the_loop_is_idle(make_tree: Callable[..., WorkerTree]) -> None:
    tree = quiet_tree(make_tree)
    time.sleep(1.5)
    assert "stopped" in tree.ctl("stop", "listener").stdout
    assert "started" in tree.ctl("start", "listener").stdout
    assert tree.states() == {"listener": "RUNNING", "executor": "RUNNING", "heartbeat": "STOPPED"}


def test_sigterm_stops_an_idle_tree_at_once(make_tree: Callable[..., WorkerTree]) -> None:
    tree = quiet_tree(make_tree)
    assert tree.process is not None
    time.sleep(1.5)
    tree.process.send_signal(signal.SIGTERM)
    assert tree.process.wait(15) == 0  # listener and executor stop in well under a second each


def test_the_heartbeat_reads_the_states_file_so_supervisord_is_not_woken_by_its_beats(
    make_tree: Callable[..., WorkerTree],
) -> None:
    tree = make_tree()  # the heartbeat beats every 0.5 s here
    assert tree.process is not None
    all_running = {"heartbeat": "RUNNING", "executor": "RUNNING", "listener": "RUNNING"}

    def beat() -> dict[str, Any]:
        with contextlib.suppress(OSError, ValueError):
            record = read_json(tree.spool.heartbeat_path(tree.worker))
            return record if isinstance(record, dict) else {}
        return {}

    wait_for(lambda: beat().get("programs") == all_running, 10, 0.1, "a beat with every program RUNNING")
    time.sleep(1.5)  # supervisorctl's connections are closed
    before = wakes(tree.process.pid)
    time.sleep(3)
    assert wakes(tree.process.pid) - before <= 1  # 6 beats; over XML-RPC each one woke it

    old = tree.kill("executor")

    def told_executor() -> int:
        return int(read_json(tree.run_dir / STATES_FILE)["programs"]["executor"]["pid"])

    wait_for(lambda: told_executor() not in (0, old), 15, 0.1, "the states file to name the new executor")
    assert told_executor() == tree.pid("executor")
    wait_for(
        lambda: beat().get("programs") == all_running and beat()["executor"]["wedged"] is False,
        15,
        0.1,
        "a beat that judges the new executor alive",
    )
