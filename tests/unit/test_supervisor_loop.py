"""QuietPoller's decision (when supervisord's loop may wait past its one-second timeout) and its
states file (written on each change, read by the heartbeat instead of an XML-RPC call).

Real supervisor objects would need a running supervisord (tests/integration/test_supervisor_loop.py
runs one); here the decision is checked against each state that must keep the second."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from supervisor.process import EventListenerPool
from supervisor.states import ProcessStates, SupervisorStates

from activation.supervisor_loop import IDLE_TIMEOUT, QuietPoller, make_quiet
from activation.worker.supervision import STATES_FILE, told_program_infos


class Poller:
    """Records the timeout it is asked to wait; answers with what ``ready`` holds."""

    def __init__(self) -> None:
        self.timeouts: list[float] = []
        self.readable: set[int] = set()
        self.ready: list[int] = []

    def register_readable(self, fd: int) -> None:
        self.readable.add(fd)

    def poll(self, timeout: float) -> tuple[list[int], list[int]]:
        self.timeouts.append(timeout)
        return list(self.ready), []


def process(name: str, state: int, pid: int = 100) -> Any:
    return SimpleNamespace(config=SimpleNamespace(name=name), pid=pid, laststart=0.0, get_state=lambda: state)


def supervisord(*processes: Any, mood: int = SupervisorStates.RUNNING, channels: int = 0) -> Any:
    sockets = {3: SimpleNamespace(accepting=True)} | {10 + i: SimpleNamespace(accepting=False) for i in range(channels)}
    group = SimpleNamespace(processes={p.config.name: p for p in processes})
    options = SimpleNamespace(mood=mood, get_socket_map=lambda: sockets)
    return SimpleNamespace(process_groups={"g": group}, options=options)


def timeouts(sup: Any, polls: int = 2) -> list[float]:
    poller = Poller()
    quiet = QuietPoller(poller, sup, wake_fd=99)
    for _ in range(polls):
        quiet.poll(1)
    return poller.timeouts


def test_settled_and_unchanged_waits_long_after_one_ordinary_poll() -> None:
    sup = supervisord(process("a", ProcessStates.RUNNING), process("b", ProcessStates.STOPPED))
    assert timeouts(sup, 3) == [1, IDLE_TIMEOUT, IDLE_TIMEOUT]


@pytest.mark.parametrize("state", [ProcessStates.STARTING, ProcessStates.BACKOFF, ProcessStates.STOPPING])
def test_a_timed_state_keeps_the_second(state: int) -> None:
    assert timeouts(supervisord(process("a", ProcessStates.RUNNING), process("b", state))) == [1, 1]


def test_a_change_keeps_the_second_for_the_next_loop() -> None:
    states = iter([ProcessStates.RUNNING, ProcessStates.RUNNING, ProcessStates.EXITED, ProcessStates.EXITED])
    current = {"state": ProcessStates.RUNNING}
    proc = SimpleNamespace(config=SimpleNamespace(name="a"), pid=1, laststart=0.0, get_state=lambda: current["state"])
    poller = Poller()
    quiet = QuietPoller(poller, supervisord(proc), wake_fd=99)
    for state in states:
        current["state"] = state
        quiet.poll(1)
    assert poller.timeouts == [1, IDLE_TIMEOUT, 1, IDLE_TIMEOUT]  # EXITED: autorestart acts next loop


def test_stopping_supervisord_an_open_connection_or_an_event_listener_keep_the_second() -> None:
    running = process("a", ProcessStates.RUNNING)
    assert timeouts(supervisord(running, mood=SupervisorStates.SHUTDOWN)) == [1, 1]
    assert timeouts(supervisord(running, channels=1)) == [1, 1]
    sup = supervisord(running)
    sup.process_groups["pool"] = EventListenerPool.__new__(EventListenerPool)
    sup.process_groups["pool"].processes = {}
    assert timeouts(sup) == [1, 1]


def test_the_wake_pipe_is_drained_and_never_handed_to_supervisord() -> None:
    read, write = os.pipe()
    os.set_blocking(read, False)
    try:
        os.write(write, b"\x11" * 3)
        poller = Poller()
        poller.ready = [read, 7]
        quiet = QuietPoller(poller, supervisord(process("a", ProcessStates.RUNNING)), wake_fd=read)
        assert quiet.poll(1) == ([7], [])
        assert read in poller.readable
        with pytest.raises(BlockingIOError):
            os.read(read, 1)
    finally:
        os.close(read)
        os.close(write)


def test_make_quiet_installs_once_and_signals_write_to_the_pipe() -> None:
    sup = supervisord(process("a", ProcessStates.RUNNING))
    sup.options.poller = Poller()
    previous = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(previous)
    try:
        make_quiet(sup)
        installed = sup.options.poller
        make_quiet(sup)
        assert isinstance(installed, QuietPoller) and sup.options.poller is installed
        assert signal.set_wakeup_fd(-1) != -1  # the pipe's write end is the wakeup fd
    finally:
        signal.set_wakeup_fd(previous)


# -- the states file: written by the poller, read by the heartbeat --------------------------------


def test_the_states_file_is_written_on_each_change_and_read_back_as_rpc_would_answer(tmp_path: Path) -> None:
    states = tmp_path / STATES_FILE
    current = {"state": ProcessStates.STARTING, "pid": 41}
    proc = SimpleNamespace(
        config=SimpleNamespace(name="executor"),
        pid=0,
        laststart=1796000000.7,
        get_state=lambda: current["state"],
    )
    sup = supervisord(proc)
    quiet = QuietPoller(Poller(), sup, wake_fd=99, states_file=states)
    quiet.poll(1)
    proc.pid = 41
    quiet.poll(1)
    record = json.loads(states.read_text())
    assert record == {
        "supervisord_pid": os.getpid(),
        "statename": "RUNNING",
        "programs": {"executor": {"statename": "STARTING", "pid": 41, "start": 1796000000}},
    }
    current["state"] = ProcessStates.RUNNING
    quiet.poll(1)
    assert json.loads(states.read_text())["programs"]["executor"]["statename"] == "RUNNING"
    os.utime(states, (0, 0))
    quiet.poll(1)
    assert states.stat().st_mtime == 0  # unchanged states: no write


def write_states(folder: Path, **record: Any) -> None:
    full = {"supervisord_pid": os.getppid(), "statename": "RUNNING", "programs": {}, **record}
    (folder / STATES_FILE).write_text(json.dumps(full))


def test_told_states_are_the_parents_and_read_like_getallprocessinfo(tmp_path: Path) -> None:
    write_states(tmp_path, programs={"executor": {"statename": "RUNNING", "pid": 7, "start": 5}})
    assert told_program_infos(tmp_path) == {
        "executor": {"name": "executor", "statename": "RUNNING", "pid": 7, "start": 5}
    }


@pytest.mark.parametrize(
    "content",
    [None, "", "{", "[]", '{"supervisord_pid": 1}', '{"supervisord_pid": "x", "statename": "RUNNING", "programs": {}}'],
)
def test_no_file_or_a_broken_one_means_ask_over_rpc(tmp_path: Path, content: str | None) -> None:
    if content is not None:
        (tmp_path / STATES_FILE).write_text(content)
    assert told_program_infos(tmp_path) is None


def test_a_file_another_supervisord_wrote_is_not_believed(tmp_path: Path) -> None:
    write_states(tmp_path, supervisord_pid=os.getppid() + 1)  # restarted, gone, or not our parent
    assert told_program_infos(tmp_path) is None
    write_states(tmp_path, programs=["not", "a", "map"])
    assert told_program_infos(tmp_path) is None


def test_a_stopping_supervisord_is_an_error_as_its_rpc_answers(tmp_path: Path) -> None:
    write_states(tmp_path, statename="SHUTDOWN")
    with pytest.raises(OSError, match="SHUTDOWN_STATE"):
        told_program_infos(tmp_path)


def test_a_states_file_that_cannot_be_written_is_removed_rather_than_left_stale(tmp_path: Path) -> None:
    states = tmp_path / STATES_FILE
    states.write_text("old")
    proc = process("a", ProcessStates.RUNNING)
    blocker = tmp_path / f".tmp_{STATES_FILE}"
    blocker.mkdir()  # the temp file's name is taken by a folder: the write fails
    QuietPoller(Poller(), supervisord(proc), wake_fd=99, states_file=states).poll(1)
    assert not states.exists()
