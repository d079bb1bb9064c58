"""Running one agent process tree: its output, its deadline, its end.

It knows nothing of the spool. `run_agent` starts the agent in a new session with stdin from
/dev/null, keeps the first ``output_limit`` bytes of each stream, and makes sure that when it
returns no process of the agent's tree is left alive: at the timeout (or when the caller aborts)
every descendant gets SIGINT, then SIGKILL after the grace; descendants left behind by an agent
that exited by itself get the same treatment. The tree is the agent's cgroup when there is one
(containment.py); otherwise it is what psutil finds below this process, which for descendants
whose parent already exited needs this process to be a child subreaper (`become_subreaper`).

What the agent gets, besides its argv and environment (agent_inputs.py):
- stdin: /dev/null (``claude -p`` waits 3 s for an open stdin), or the description itself when it
  is too long for argv (spawn.py decides); stdout and stderr: pipes.
- its own session (setsid), so a terminal's Ctrl-C or supervisord's group signals never reach it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import selectors
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import psutil

from activation.procctl import PR_SET_CHILD_SUBREAPER, prctl
from activation.process_start import start_ticks, ticks_now
from activation.worker.containment import TaskCgroups

log = logging.getLogger("activation.agent")

READ_CHUNK = 64 * 1024  # a Linux pipe holds 64 KiB: one read empties it
ABORT_CHECK_INTERVAL = 0.25
RSS_SAMPLE_INTERVAL = 0.5
GONE_CHECK_INTERVAL = 0.05  # during the grace: how often to look whether the tree is already gone
PIPE_DRAIN_BOUND = 0.5  # after the tree is gone: how long a pipe may still stay open
KILL_BOUND = 5.0  # SIGKILL rounds stop after this; only a process stuck in the kernel survives them
# Past output_limit, stdout's last bytes are still kept: a stream-json run ends with its envelope.
STDOUT_TAIL = 1024 * 1024

_subreaper = False  # whether this process adopts orphans (and so may reap any zombie child)


def become_subreaper(enable: bool = True) -> bool:
    """Adopt every orphaned descendant (PR_SET_CHILD_SUBREAPER); False, logged, when not possible.

    Without it, a grandchild whose parent exited is re-parented to PID 1, out of psutil's reach
    from here, and an agent's setsid tool children could outlive their task.
    """
    global _subreaper
    try:
        prctl(PR_SET_CHILD_SUBREAPER, int(enable))
    except OSError as exc:
        log.warning("cannot become a child subreaper (%s): orphaned agent descendants may survive", exc)
        return False
    _subreaper = enable
    return True


@dataclass
class AgentRun:
    """What happened to one agent run. ``exit_code`` follows Popen: negative means killed by signal."""

    exit_code: int
    signal: str | None
    timed_out: bool
    aborted: bool
    stdout: str
    stderr: str
    stdout_bytes: int  # everything the stream carried, also past the limit
    stderr_bytes: int
    truncated: bool
    started_at_wall: float  # time.time() right after the agent was started
    started_mono: float
    duration_s: float
    cpu_seconds: float  # user + system time of the whole reaped tree
    rss_peak_bytes: int
    killed_pids: list[int] = field(default_factory=list)
    pid: int | None = None  # None when the agent could not be started
    stdout_tail: str = ""  # stdout's last STDOUT_TAIL bytes, only when stdout went past the limit
    signals_sent: list[str] = field(default_factory=list)  # e.g. ["SIGINT", "SIGKILL"], in order


def signal_name(exit_code: int) -> str | None:
    if exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"SIG{-exit_code}"


def run_agent(
    argv: list[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    kill_grace: float,
    output_limit: int,
    should_abort: Callable[[], bool] | None = None,
    cwd: str | None = None,
    cgroups: TaskCgroups | None = None,
    stdin_data: bytes | None = None,
    on_tick: Callable[[], None] | None = None,
    on_output: Callable[[int, bytes], None] | None = None,
) -> AgentRun:
    """Run the agent to its end and leave nothing of its tree behind.

    With ``cgroups`` (entered: this process waits in a cgroup of its own) the agent is born in
    that cgroup, and whatever else is in it is the agent's tree, however it forked, whatever it
    did to its session or its environment.

    ``stdin_data`` becomes the agent's stdin, read to its end (a memory file, so a large one never
    blocks us on a pipe); without it stdin is /dev/null. An agent that cannot be started at all
    raises `activation.worker.spawn.CannotStart`, which says whether it is this task's fault.
    ``on_tick`` is called on every turn of the supervision loop (at least every 0.25 s while the
    agent runs, every 50 ms while its tree is being killed): the caller's proof of progress.
    ``on_output(stream, chunk)`` gets every chunk read, past the limit too (0 stdout, 1 stderr):
    the per-task log (spool.tasklog). An exception from it is logged once and the sink dropped.
    """
    usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    born_after = ticks_now()  # the agent, and all it forks, start at this tick or later
    stdin: int = subprocess.DEVNULL
    if stdin_data is not None:
        stdin = _memory_file(stdin_data)
    try:
        # Born in this process's cgroup, which is the agent's when there are cgroups.
        popen = subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        from activation.worker.spawn import classify

        raise classify(exc, argv, cwd) from None
    finally:
        if stdin_data is not None:
            os.close(stdin)
    started_at_wall = time.time()
    started_mono = time.monotonic()
    tree = _Tree(popen, born_after, kill_grace, output_limit, cgroups, on_output)
    try:
        tree.supervise(started_mono + timeout, should_abort, on_tick)
    finally:
        tree.close()
    usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (usage_after.ru_utime + usage_after.ru_stime) - (usage_before.ru_utime + usage_before.ru_stime)
    exit_code = tree.exit_code if tree.exit_code is not None else -signal.SIGKILL
    out, err = tree.buffers
    return AgentRun(
        exit_code=exit_code,
        signal=signal_name(exit_code),
        timed_out=tree.timed_out,
        aborted=tree.aborted,
        stdout=bytes(out).decode("utf-8", errors="replace"),
        stderr=bytes(err).decode("utf-8", errors="replace"),
        stdout_bytes=tree.totals[0],
        stderr_bytes=tree.totals[1],
        truncated=tree.totals[0] > len(out) or tree.totals[1] > len(err),
        started_at_wall=started_at_wall,
        started_mono=started_mono,
        duration_s=time.monotonic() - started_mono,
        cpu_seconds=round(max(cpu, 0.0), 6),
        rss_peak_bytes=max(tree.agent_maxrss, tree.sampled_rss_peak),
        killed_pids=list(tree.killed),
        pid=popen.pid,
        stdout_tail=bytes(tree.tail).decode("utf-8", errors="replace") if tree.totals[0] > len(out) else "",
        signals_sent=list(tree.signals_sent),
    )


def _memory_file(data: bytes) -> int:
    """An fd that reads ``data`` from its start: a memfd, or an unlinked temp file without one."""
    try:
        fd = os.memfd_create("activation-stdin", os.MFD_CLOEXEC)
    except (OSError, AttributeError):
        import tempfile

        with tempfile.TemporaryFile() as handle:
            fd = os.dup(handle.fileno())
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


# Phases of one run: RUNNING until the agent exits or its time is up; GRACE while the tree has
# had SIGINT and may clean up; DRAIN once nothing of the tree is alive and only the pipes remain.
RUNNING, GRACE, DRAIN = "running", "grace", "drain"


class _Tree:
    """One agent and everything it spawns, watched from a single thread with one selector."""

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        born_after: int,
        kill_grace: float,
        limit: int,
        cgroups: TaskCgroups | None,
        on_output: Callable[[int, bytes], None] | None = None,
    ) -> None:
        self.popen = popen
        self.cgroups = cgroups if cgroups is not None and cgroups.current is not None else None
        self.pid = popen.pid
        self.kill_grace = kill_grace
        self.limit = limit
        self.exit_code: int | None = None
        self.timed_out = False
        self.aborted = False
        self.agent_maxrss = 0
        self.sampled_rss_peak = 0
        self.killed: dict[int, psutil.Process] = {}  # every process signalled, in order
        self.buffers = (bytearray(), bytearray())
        self.totals = [0, 0]
        self.tail = bytearray()  # stdout's last bytes, once past the limit
        self.on_output = on_output
        self.signals_sent: list[str] = []
        self.my_pid = os.getpid()
        self._me: psutil.Process | None = None
        # The tick before the agent's spawn tells its re-parented descendants apart from older
        # children of this process (relevant when the caller is not the executor, e.g. a test
        # run). Not the agent's own start time: reading /proc/<pid>/stat while the new process
        # is still in exec takes longer than the whole rest of the spawn's bookkeeping.
        self.born_after = born_after
        self._agent: psutil.Process | None = None  # made when first needed: the RSS sample
        assert popen.stdout is not None and popen.stderr is not None
        self.selector = selectors.DefaultSelector()
        self.open_pipes: dict[int, int] = {}  # fd -> stream index
        for index, stream in enumerate((popen.stdout, popen.stderr)):
            fd = stream.fileno()
            os.set_blocking(fd, False)
            self.selector.register(fd, selectors.EVENT_READ, index)
            self.open_pipes[fd] = index
        self.pidfd: int | None
        try:
            self.pidfd = os.pidfd_open(self.pid)
            self.selector.register(self.pidfd, selectors.EVENT_READ, -1)
        except (OSError, AttributeError):  # kernel before 5.3: poll with WNOHANG instead
            self.pidfd = None

    # -- the loop ---------------------------------------------------------------------------

    def supervise(
        self, deadline: float, should_abort: Callable[[], bool] | None, on_tick: Callable[[], None] | None = None
    ) -> None:
        phase = RUNNING
        now = time.monotonic()
        grace_end = drain_end = next_gone_check = 0.0
        next_abort = now + ABORT_CHECK_INTERVAL
        next_sample = now + RSS_SAMPLE_INTERVAL
        while True:
            if on_tick is not None:
                on_tick()
            if self.pidfd is None and self.exit_code is None:
                self._reap_agent(block=False)
            now = time.monotonic()
            if phase == RUNNING:
                if self.exit_code is not None:
                    leftovers = self._alive_tree()
                    if leftovers:
                        log.warning(
                            "agent %d exited and left %d process(es) behind: killing them", self.pid, len(leftovers)
                        )
                        self._signal(leftovers, signal.SIGINT)
                        phase, grace_end, next_gone_check = GRACE, now + self.kill_grace, now + GONE_CHECK_INTERVAL
                    else:
                        phase, drain_end = DRAIN, now + PIPE_DRAIN_BOUND
                elif now >= deadline:
                    self.timed_out = True
                    phase, grace_end, next_gone_check = GRACE, now + self.kill_grace, now + GONE_CHECK_INTERVAL
                    self._signal(self._alive_tree(), signal.SIGINT)
                elif should_abort is not None and now >= next_abort:
                    next_abort = now + ABORT_CHECK_INTERVAL
                    if should_abort():
                        self.aborted = True
                        phase, grace_end, next_gone_check = GRACE, now + self.kill_grace, now + GONE_CHECK_INTERVAL
                        self._signal(self._alive_tree(), signal.SIGINT)
                elif now >= next_sample:
                    next_sample = now + RSS_SAMPLE_INTERVAL
                    self._sample_rss()
            if phase == GRACE:
                gone = False
                if now >= next_gone_check:
                    next_gone_check = now + GONE_CHECK_INTERVAL
                    gone = self.exit_code is not None and not self._alive_tree()
                if gone or now >= grace_end:
                    self._kill_all()
                    phase, drain_end = DRAIN, time.monotonic() + PIPE_DRAIN_BOUND
            if phase == DRAIN and (not self.open_pipes or time.monotonic() >= drain_end):
                if self.open_pipes:
                    log.warning("agent %d: output pipes still open after its tree ended; not waiting", self.pid)
                break
            if phase == RUNNING:
                wake = [deadline, next_sample] + ([next_abort] if should_abort is not None else [])
            elif phase == GRACE:
                wake = [grace_end, next_gone_check]
            else:
                wake = [drain_end]
            wait = min(wake) - now
            if self.pidfd is None and self.exit_code is None:
                wait = min(wait, 0.02)
            self._pump(max(wait, 0.0))
        if self.exit_code is None:  # stuck past KILL_BOUND: its exit status is still owed to us
            self._reap_agent(block=True)
        self._reap_orphans()

    def _pump(self, wait: float) -> None:
        """Wait up to ``wait`` seconds for output or the agent's exit, and take what came."""
        for key, _ in self.selector.select(wait):
            index = key.data
            if index == -1:
                self.selector.unregister(key.fd)
                self._reap_agent(block=True)
                continue
            fd = int(key.fd)
            try:
                chunk = os.read(fd, READ_CHUNK)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            if not chunk:
                self.selector.unregister(fd)
                del self.open_pipes[fd]
                continue
            self.totals[index] += len(chunk)
            buffer = self.buffers[index]
            room = self.limit - len(buffer)
            if room > 0:
                buffer += chunk[:room]
            if index == 0 and self.totals[0] > self.limit:
                if not self.tail:  # just past the limit: the tail starts with what the buffer ends with
                    self.tail += buffer[-STDOUT_TAIL:]
                self.tail += chunk[max(room, 0) :]
                if len(self.tail) > 2 * STDOUT_TAIL:  # trimmed rarely: amortised, not per chunk
                    del self.tail[:-STDOUT_TAIL]
            if self.on_output is not None:
                self._feed(index, chunk)

    def _feed(self, index: int, chunk: bytes) -> None:
        assert self.on_output is not None
        try:
            self.on_output(index, chunk)
        except Exception:  # the log is a convenience: the run goes on without it
            log.exception("agent %d: its output sink failed; the output is still captured", self.pid)
            self.on_output = None

    def close(self) -> None:
        self.selector.close()
        if self.pidfd is not None:
            os.close(self.pidfd)
        for stream in (self.popen.stdout, self.popen.stderr):
            if stream is not None:
                stream.close()

    # -- the agent and its tree -------------------------------------------------------------

    def _reap_agent(self, *, block: bool) -> None:
        """Collect the agent's exit status and rusage ourselves; Popen and psutil never reap it."""
        if self.exit_code is not None:
            return
        try:
            pid, status, usage = os.wait4(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # someone else reaped it: its status is lost
            log.error("agent %d was reaped by someone else; its exit status is unknown", self.pid)
            self.exit_code = self.popen.returncode = -signal.SIGKILL
            return
        if pid == 0:
            return
        self.exit_code = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.exit_code  # so Popen never waits for (or warns about) it
        self.agent_maxrss = usage.ru_maxrss * 1024  # KiB on Linux

    def _own_children(self) -> list[psutil.Process]:
        if self._me is None:
            self._me = psutil.Process(self.my_pid)
        try:
            return self._me.children(recursive=True)
        except psutil.Error:
            return []

    def _snapshot(self) -> list[psutil.Process]:
        """Every live process of the agent's tree, reaping the dead ones that are our children.

        One walk from this process finds the agent's descendants and the orphans that were
        re-parented to us (we are a subreaper); a process belongs to the tree when its topmost
        ancestor below us is the agent or was created after it.
        """
        procs = self._own_children()
        parents: dict[int, int] = {}
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                parents[proc.pid] = proc.ppid()
        by_pid = {proc.pid: proc for proc in procs}
        alive = []
        for proc in procs:
            if proc.pid not in parents or not self._belongs(proc.pid, parents, by_pid):
                continue
            try:
                zombie = proc.status() == psutil.STATUS_ZOMBIE
            except psutil.Error:
                continue
            if not zombie:
                alive.append(proc)
            elif parents[proc.pid] == self.my_pid:
                self._reap(proc.pid)
        return alive

    def _belongs(self, pid: int, parents: dict[int, int], by_pid: dict[int, psutil.Process]) -> bool:
        top = pid
        for _ in range(len(parents) + 1):
            parent = parents.get(top)
            if parent is None:
                return False  # its ancestry changed under us; the next snapshot sees it again
            if parent == self.my_pid:
                break
            top = parent
        if top == self.pid:
            return True
        started = start_ticks(top) if top in by_pid else None
        return started is not None and int(started) >= self.born_after

    def _alive_tree(self) -> list[psutil.Process]:
        """The tree's live processes: a fresh snapshot, plus any signalled one still running.

        The signalled ones matter when we are not a subreaper: a descendant whose parent died
        during the grace went to PID 1, out of the snapshot's reach, but we still know it.
        """
        alive: dict[int, psutil.Process] = {}
        try:
            # No child at all (the executor's usual case once the agent is reaped): nothing to walk.
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            pass
        else:
            alive = {proc.pid: proc for proc in self._snapshot()}
        if self.cgroups is not None:  # the cgroup holds every process of the tree, wherever it went
            for pid in self.cgroups.agent_pids():
                if pid in alive:
                    continue
                with contextlib.suppress(psutil.Error):
                    proc = psutil.Process(pid)
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        alive[pid] = proc
        for pid, proc in self.killed.items():
            if pid in alive:
                continue
            with contextlib.suppress(psutil.Error):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    alive[pid] = proc
        return list(alive.values())

    def _reap(self, pid: int) -> None:
        if pid == self.pid:
            self._reap_agent(block=False)
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)

    def _signal(self, procs: list[psutil.Process], sig: signal.Signals) -> None:
        if procs and sig.name not in self.signals_sent:
            self.signals_sent.append(sig.name)
        for proc in procs:
            try:
                if proc.pid == self.pid and self.pidfd is not None and self.exit_code is None:
                    signal.pidfd_send_signal(self.pidfd, sig)  # immune to pid reuse
                else:
                    proc.send_signal(sig)  # psutil checks the process identity first
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
            except (psutil.AccessDenied, PermissionError):
                log.warning("agent %d: no permission to signal its descendant %d", self.pid, proc.pid)
                continue
            self.killed.setdefault(proc.pid, proc)

    def _kill_all(self) -> None:
        """SIGKILL the tree until a fresh snapshot finds nothing alive: late spawns die too."""
        give_up = time.monotonic() + KILL_BOUND
        if self.cgroups is not None and self.cgroups.agent_pids():
            if "SIGKILL" not in self.signals_sent:
                self.signals_sent.append("SIGKILL")
            self.cgroups.kill_agents()  # all at once: a fork racing the kill is born dead
        while True:
            alive = self._alive_tree()
            if not alive:
                return
            self._signal(alive, signal.SIGKILL)
            if time.monotonic() >= give_up:
                pids = ", ".join(str(p.pid) for p in alive)
                log.error("agent %d: processes %s survive SIGKILL (stuck in the kernel?)", self.pid, pids)
                return
            self._pump(0.005)

    def _reap_orphans(self) -> None:
        """Collect the zombies of killed descendants that were re-parented to us."""
        for pid in self.killed:
            if pid != self.pid:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
        if not _subreaper:
            return
        # Descendants that exited on their own after being re-parented to us are zombies among
        # our children. Reap those by pid, never with waitpid(-1): that could take the exit
        # status of a child some other part of this process started and is still waiting for.
        # First ask the kernel, without reaping, whether there is any zombie child at all: the
        # usual answer is no, and then no walk of /proc (psutil's children() reads every process's
        # stat: on a busy host that was most of the executor's time per task).
        try:
            if os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
                return  # children, none exited
        except ChildProcessError:
            return  # no child at all
        try:
            children = psutil.Process().children()
        except psutil.Error:
            return
        for child in children:
            if child.pid == self.pid:
                continue
            with contextlib.suppress(psutil.Error, ChildProcessError):
                if child.status() == psutil.STATUS_ZOMBIE:
                    os.waitpid(child.pid, os.WNOHANG)

    def _sample_rss(self) -> None:
        if self.exit_code is not None:
            return  # reaped: the pid may be another process's by now
        total = 0
        try:
            if self._agent is None:
                self._agent = psutil.Process(self.pid)
            procs = [self._agent, *self._agent.children(recursive=True)]
        except psutil.Error:
            return
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        self.sampled_rss_peak = max(self.sampled_rss_peak, total)
