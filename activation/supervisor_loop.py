"""supervisord's main loop, asleep while nothing in it can be due: ``[rpcinterface:activation]``.

supervisord polls its file descriptors with a one-second timeout, forever (``runforever`` in
supervisor/supervisord.py). In an idle worker tree that second is most of what supervisord
costs: 0.020 % of a core, a fifth of the whole idle tree. The second serves three things:

- timed process transitions: STARTING -> RUNNING after startsecs, BACKOFF retries, the SIGKILL
  after stopwaitsecs;
- signals: its handler only records them, and Python resumes the interrupted poll (PEP 475), so
  a SIGCHLD or a SIGTERM is acted on at the next timeout;
- the TICK events of event listeners, and the deferred answers of XML-RPC calls such as
  ``supervisorctl stop``, which the loop polls.

``QuietPoller`` keeps the second whenever any of these can be due, and otherwise waits up to
IDLE_TIMEOUT: every process has stayed RUNNING, STOPPED, EXITED or FATAL since the last poll,
supervisord's mood is RUNNING, no XML-RPC connection is open and no event listener is configured.
Signals wake it at once through ``signal.set_wakeup_fd``, so a crashed program is restarted and
a SIGTERM honoured sooner than before, not later.

The loop also tells: with ``states_file`` set, the poller writes every program's state, pid and
start to that file whenever one changes (temp file and rename, not fsynced: it describes running
processes). The heartbeat reads it instead of asking getAllProcessInfo over XML-RPC every beat,
which cost supervisord about 1 ms and the heartbeat 0.3 ms of CPU each time, and would wake this
loop for it.

It is installed through supervisor's documented extension point for RPC interfaces, whose
factory is handed the supervisord instance before its loop starts; the namespace it adds has
no methods. It relies on supervisor's poller and process objects, which are not public API, so
setup.cfg pins supervisor's exact version and tests/integration/test_supervisor_loop.py fails
loudly if an upgrade changes them.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

from supervisor.process import EventListenerPool
from supervisor.states import ProcessStates, SupervisorStates, getProcessStateDescription, getSupervisorStateDescription

IDLE_TIMEOUT = 30.0  # seconds; a bound, in case a future supervisor times something this misses
# States a process leaves only through an event this loop wakes for: an exit (SIGCHLD), an RPC.
# EXITED counts only once a whole loop has passed without a change: autorestart acts on it in
# the next loop's transition, with no timer.
SETTLED = frozenset({ProcessStates.RUNNING, ProcessStates.STOPPED, ProcessStates.EXITED, ProcessStates.FATAL})

_wake_pipe: tuple[int, int] | None = None  # one per process: a reload (SIGHUP) makes a new poller

# (supervisord's mood, then each program's name, pid, state and start): what the loop watches.
Snapshot = tuple[int, tuple[tuple[str, int, int, int], ...]]


def make_quiet(supervisord: Any, states_file: str = "", **config: str) -> object:
    """The ``supervisor.rpcinterface_factory``: install the quiet poller once, add no RPC methods."""
    options = supervisord.options
    if not isinstance(options.poller, QuietPoller):
        told = Path(states_file) if states_file else None
        options.poller = QuietPoller(options.poller, supervisord, _wakeup_fd(), told)
    return object()


def _wakeup_fd() -> int:
    """The read end of a pipe that every signal writes a byte to (set once, from the main thread)."""
    global _wake_pipe
    if _wake_pipe is None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        _wake_pipe = (read, write)
    return _wake_pipe[0]


class QuietPoller:
    """supervisor's poller, with the loop's one-second timeout stretched while nothing can be due."""

    def __init__(self, poller: Any, supervisord: Any, wake_fd: int, states_file: Path | None = None) -> None:
        self._poller = poller
        self._supervisord = supervisord
        self._wake_fd = wake_fd
        self._states_file = states_file
        self._last: Snapshot | None = None  # at the previous poll
        self._told: Snapshot | None = None  # in the states file

    def __getattr__(self, name: str) -> Any:
        return getattr(self._poller, name)  # register_readable, unregister_writable, close, ...

    def poll(self, timeout: float) -> tuple[list[int], list[int]]:
        now = self._snapshot()
        if self._states_file is not None and now != self._told:
            self._tell(now)
        if self._nothing_due(now):
            timeout = IDLE_TIMEOUT
        self._last = now
        self._poller.register_readable(self._wake_fd)
        readable, writable = self._poller.poll(timeout)
        if self._wake_fd in readable:
            readable.remove(self._wake_fd)  # not supervisord's: it would unregister it
            try:
                while os.read(self._wake_fd, 512):
                    pass
            except BlockingIOError:
                pass
        return readable, writable

    def _snapshot(self) -> Snapshot:
        supervisord = self._supervisord
        return supervisord.options.mood, tuple(
            (process.config.name, process.pid, process.get_state(), int(process.laststart))
            for group in supervisord.process_groups.values()
            for process in group.processes.values()
        )

    def _nothing_due(self, now: Snapshot) -> bool:
        supervisord = self._supervisord
        mood, processes = now
        dispatchers = supervisord.options.get_socket_map().values()
        return (
            now == self._last
            and mood == SupervisorStates.RUNNING
            and all(state in SETTLED for _, _, state, _ in processes)
            and not any(isinstance(group, EventListenerPool) for group in supervisord.process_groups.values())
            and all(getattr(dispatcher, "accepting", False) for dispatcher in dispatchers)  # servers only
        )

    def _tell(self, now: Snapshot) -> None:
        """Write the states file; if it cannot be written, remove it, so nobody reads stale states."""
        assert self._states_file is not None
        mood, processes = now
        record = {
            "supervisord_pid": os.getpid(),
            "statename": getSupervisorStateDescription(mood),
            "programs": {
                name: {"statename": getProcessStateDescription(state), "pid": pid, "start": start}
                for name, pid, state, start in processes
            },
        }
        temp = self._states_file.with_name(f".tmp_{self._states_file.name}")
        try:
            temp.write_text(json.dumps(record))
            os.replace(temp, self._states_file)
        except OSError:
            try:
                self._states_file.unlink(missing_ok=True)
            except OSError:
                return  # tried again at the next loop
        self._told = now
