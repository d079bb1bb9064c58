"""Where an agent's process tree lives, so that all of it can be found and killed.

With a writable cgroup v2 (a delegated subtree, or root on the host) the executor waits in a
cgroup of its own, where its agent is born; the agent's tree is everything else in it, and its
end is ``cgroup.kill``. No ``env -i``, setsid, double fork or fork chain leaves it, and a
restarted executor finds what a SIGKILLed one left running by the cgroups still there. Without
one, the subreaper sweep in agent.py is all there is while the executor lives, and the sweeps
here (the environment marker, supervisord's orphans) after it died.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil

from activation.errors import ActivationError, ConfigError
from activation.hashes import sha256_hex
from activation.worker.supervision import program_infos, supervisor_socket, supervisord_pid

log = logging.getLogger("activation.executor")

CONTAINMENTS = ("auto", "cgroup", "subreaper")
EMPTY_POLL = 0.01  # how often to look whether a killed cgroup has emptied
EMPTY_BOUND = 5.0  # after cgroup.kill: how long its processes may take to go (only D state is slower)


class ContainmentError(ActivationError):
    """This process cannot enter or make a cgroup of its subtree."""


def containment_id(worker: str, run_dir: Path) -> str:
    """A name for one executor's agents that says neither the run folder nor anything secret.

    Stable across restarts of the executor (a restarted one must find what its predecessor left)
    and distinct between trees that share a cgroup or a machine (their run folders differ).
    """
    digest = sha256_hex(str(Path(run_dir).absolute()).encode())[:12]
    return f"{worker}-{digest}"


def cgroup2_mount(mountinfo: str) -> Path | None:
    """The cgroup v2 mount point in a /proc/self/mountinfo text (hybrid hosts have it beside v1)."""
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if sep and right.split(" ", 1)[0] == "cgroup2":
            fields = left.split()
            if len(fields) >= 5:
                return Path(fields[4].replace("\\040", " "))
    return None


def own_cgroup(proc_cgroup: str) -> str | None:
    """This process's cgroup v2 path (``0::/path``) in a /proc/self/cgroup text."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    return None


class AgentCgroup:
    """One cgroup of the subtree: list what runs in it, kill all of it, remove it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def pids(self) -> list[int]:
        try:
            text = (self.path / "cgroup.procs").read_text()
        except OSError:
            return []
        return [int(word) for word in text.split()]

    def populated(self) -> bool:
        try:
            text = (self.path / "cgroup.events").read_text()
        except OSError:
            return False
        return "populated 1" in text

    def signal(self, sig: signal.Signals) -> list[int]:
        sent = []
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
                sent.append(pid)
        return sent

    def kill(self) -> None:
        """SIGKILL every process in the cgroup at once; forks racing it are born dead."""
        with contextlib.suppress(FileNotFoundError):
            _write(self.path / "cgroup.kill", "1")

    def wait_empty(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.populated():
            if time.monotonic() >= deadline:
                return False
            time.sleep(EMPTY_POLL)
        return True

    def remove(self) -> bool:
        """Remove the cgroup once empty; False (and it stays, for the next sweep) while it is not."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            log.warning("cannot remove the agent cgroup %s: %s", self.path, exc.strerror)
            return False
        return True


class TaskCgroups:
    """One executor's cgroup subtree, ``<its own cgroup>/activation-<id>/``.

    The executor waits in a cgroup of that subtree, and its agent is born there with no extra
    cost to the spawn (no preexec_fn, no move per task): the agent's tree is everything in that
    cgroup but the executor itself. To kill the tree the executor steps out into a fresh cgroup
    and ``cgroup.kill``s the old one, so only a run that must be killed pays for the move.
    """

    def __init__(self, root: Path, home: Path) -> None:
        self.root = root
        self.home = home
        self._count = 0
        self.current: AgentCgroup | None = None  # where this process waits, and its agent is born

    @classmethod
    def probe(cls, ident: str, *, mount: Path | None = None, own: str | None = None) -> TaskCgroups:
        """Set up the subtree, or raise OSError saying why this process cannot use cgroups."""
        if mount is None:
            mount = cgroup2_mount(Path("/proc/self/mountinfo").read_text())
            if mount is None:
                raise OSError(errno.ENOENT, "no cgroup v2 is mounted")
        if own is None:
            own = own_cgroup(Path("/proc/self/cgroup").read_text())
            if own is None:
                raise OSError(errno.ENOENT, "this process is in no cgroup v2")
        home = mount / own.lstrip("/")
        if not (home / "cgroup.procs").exists():
            raise OSError(errno.ENOENT, f"its cgroup {home} is not visible (cgroup namespace?)")
        root = home / f"activation-{ident}"
        with contextlib.suppress(FileExistsError):
            os.mkdir(root)
        groups = cls(root, home)
        try:
            if not (root / "cgroup.kill").exists():
                raise OSError(errno.ENOSYS, "the kernel has no cgroup.kill (Linux 5.14 or later has)")
            trial = groups._stage()  # stepping in and out again must be allowed
            if not groups._go_home():
                raise OSError(errno.EACCES, f"cannot leave the cgroup {trial.path} again")
            trial.remove()
        except ContainmentError as exc:
            raise OSError(errno.EACCES, str(exc)) from None
        return groups

    def enter(self) -> None:
        """Move this process into a fresh cgroup of the subtree: its agents are born there."""
        self.current = self._stage()

    def agent_pids(self) -> list[int]:
        """Every process in this process's cgroup but itself: the running agent's whole tree."""
        if self.current is None:
            return []
        me = os.getpid()
        return [pid for pid in self.current.pids() if pid != me]

    def kill_agents(self) -> bool:
        """Step out into a fresh cgroup, then ``cgroup.kill`` the old one: the agent's tree at once.

        False (logged) when this process cannot move: the caller then kills pid by pid.
        """
        old = self.current
        if old is None:
            return False
        try:
            self.current = self._stage()
        except ContainmentError as exc:
            log.error("%s; killing the agent's processes one by one", exc)
            return False
        old.kill()
        if old.wait_empty(EMPTY_BOUND):
            old.remove()
        else:
            log.error("agent cgroup %s still holds %s after cgroup.kill", old.path, old.pids())
        return True

    def _stage(self) -> AgentCgroup:
        try:
            group = self.new_group()
        except OSError as exc:
            raise ContainmentError(f"cannot make an agent cgroup in {self.root}: {exc.strerror or exc}") from None
        try:
            _write(group.path / "cgroup.procs", "0")  # "0" is the writing process
        except OSError as exc:
            group.remove()
            raise ContainmentError(f"cannot enter the agent cgroup {group.path}: {exc.strerror or exc}") from None
        return group

    def _go_home(self) -> bool:
        try:
            _write(self.home / "cgroup.procs", "0")
        except OSError as exc:
            log.error("cannot go back to the cgroup %s: %s", self.home, exc.strerror or exc)
            return False
        return True

    def new_group(self, name: str | None = None) -> AgentCgroup:
        if name is None:
            self._count += 1
            name = f"agent-{os.getpid()}-{self._count}"
        path = self.root / name
        with contextlib.suppress(FileExistsError):
            os.mkdir(path)
        return AgentCgroup(path)

    def leftovers(self) -> Iterator[AgentCgroup]:
        """Every cgroup in the subtree but the one this process is in."""
        current = self.current.path if self.current is not None else None
        with contextlib.suppress(FileNotFoundError):
            for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
                if entry.is_dir(follow_symlinks=False) and Path(entry.path) != current:
                    yield AgentCgroup(Path(entry.path))

    def sweep(self, grace: float) -> list[int]:
        """End every agent a previous executor left in the subtree: SIGINT, the grace, cgroup.kill."""
        groups = list(self.leftovers())
        signalled: list[int] = []
        for group in groups:
            signalled += group.signal(signal.SIGINT)  # claude stops its own tools on SIGINT
        deadline = time.monotonic() + grace
        for group in groups:
            group.wait_empty(max(deadline - time.monotonic(), 0.0))
        for group in groups:
            signalled += [pid for pid in group.pids() if pid not in signalled]
            group.kill()
            if not group.wait_empty(EMPTY_BOUND):
                log.error("agent cgroup %s still holds %s after cgroup.kill", group.path, group.pids())
            group.remove()
        return signalled

    def close(self) -> None:
        """Go home, and remove the subtree if nothing is left in it (a stuck agent's cgroup keeps it)."""
        current, self.current = self.current, None
        if current is not None and self._go_home():
            current.remove()
        for group in self.leftovers():
            if not group.populated():
                group.remove()
        with contextlib.suppress(OSError):
            os.rmdir(self.root)


STRAY_MARKER = "ACTIVATION_AGENT_OF"  # in every agent's environment: the id of the executor that ran it


def kill_strays(marker: str, *, grace: float) -> list[int]:
    """Kill agent processes that a previous executor with this ``marker`` left behind.

    A SIGKILLed executor cannot stop its agent; the agent's tree is re-parented and runs on
    while recovery starts the task again. This is a fallback for executors without cgroups:
    every process of the tree inherited the marker variable, setsid or not, so a scan of the
    environments finds them, except those that dropped their environment (``env -i``).
    """
    me = os.getpid()

    def marked() -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            if proc.pid == me:
                continue
            with contextlib.suppress(psutil.Error):
                if proc.environ().get(STRAY_MARKER) == marker:
                    found.append(proc)
        return found

    return end_processes(marked, grace=grace)


def kill_supervisor_orphans(run_dir: Path, *, grace: float) -> list[int]:
    """End what a SIGKILLed executor left with supervisord: its children that are none of its programs.

    The fallback without cgroups, for what the environment marker misses (``env -i``). The tree
    of an agent whose executor died is re-parented to the nearest subreaper: supervisord, which
    activation.supervise makes one (and which is PID 1 in a container). Whatever supervisord did
    not start itself is such an orphan. Does nothing unless this process's parent is the
    supervisord of ``run_dir``.
    """
    me, parent_pid = os.getpid(), os.getppid()
    sock = supervisor_socket(run_dir)
    try:
        parent = psutil.Process(parent_pid)
        if supervisord_pid(sock) != parent_pid:
            return []
    except (OSError, psutil.Error, ValueError) as exc:
        log.debug("no orphan sweep: %s", exc)
        return []

    def orphans() -> list[psutil.Process]:
        try:
            children = parent.children()  # before asking: a program spawned later is not in this list
            programs = {int(info.get("pid") or 0) for info in program_infos(sock).values()}
        except (OSError, psutil.Error, ValueError) as exc:
            log.warning("orphan sweep stopped: %s", exc)
            return []
        found: dict[int, psutil.Process] = {}
        for child in children:
            if child.pid == me or child.pid in programs:
                continue
            with contextlib.suppress(psutil.Error):
                for proc in [child, *child.children(recursive=True)]:
                    found[proc.pid] = proc
        return list(found.values())

    return end_processes(orphans, grace=grace)


def end_processes(find: Callable[[], list[psutil.Process]], *, grace: float) -> list[int]:
    """SIGINT what ``find`` finds, give it the grace, then SIGKILL whatever it finds, round after
    round until a round finds nothing: a chain that forks while it is being killed dies too."""
    first = find()
    if not first:
        return []
    ended = {proc.pid: proc for proc in first}
    for proc in first:
        with contextlib.suppress(psutil.Error):
            proc.send_signal(signal.SIGINT)  # claude stops its own tools on SIGINT
    deadline = time.monotonic() + grace
    alive = first
    while alive and time.monotonic() < deadline:
        _, alive = psutil.wait_procs(alive, timeout=min(0.1, max(deadline - time.monotonic(), 0.0)))
    give_up = time.monotonic() + EMPTY_BOUND
    while True:
        alive = [proc for proc in find() if _running(proc)]
        if not alive:
            break
        if time.monotonic() >= give_up:
            log.error("processes %s survive SIGKILL (stuck in the kernel?)", " ".join(str(p.pid) for p in alive))
            break
        for proc in alive:
            ended.setdefault(proc.pid, proc)
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(alive, timeout=EMPTY_POLL)
    return list(ended)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def choose_containment(choice: str, ident: str) -> tuple[TaskCgroups | None, str]:
    """The cgroups to run agents in (None: the subreaper sweep alone), and a line saying which.

    ``choice`` is ACTIVATION_CONTAINMENT: ``cgroup`` insists (a ConfigError when it cannot be),
    ``subreaper`` never tries, ``auto`` takes a cgroup when this process may make one.
    """
    if choice == "subreaper":
        return None, "subreaper sweep (ACTIVATION_CONTAINMENT=subreaper)"
    try:
        groups = TaskCgroups.probe(ident)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if choice == "cgroup":
            raise ConfigError(f"ACTIVATION_CONTAINMENT: cgroup v2 containment is not available: {reason}") from None
        return None, f"subreaper sweep (no usable cgroup v2: {reason})"
    return groups, f"cgroup v2 {groups.root}"


def contain_agents(
    choice: str, ident: str, run_dir: Path, *, grace: float
) -> tuple[TaskCgroups | None, str, list[int]]:
    """An executor's start: choose the mechanism, end what a killed predecessor left, get ready.

    Returns the cgroups its agents are born in (None: the subreaper sweep alone), a line saying
    which, and the pids of the strays it ended: those in the predecessor's cgroups, those still
    carrying the marker, and supervisord's children that are none of its programs.
    """
    groups, how = choose_containment(choice, ident)
    killed = groups.sweep(grace) if groups is not None else []
    if groups is not None:
        try:
            groups.enter()
        except ContainmentError as exc:
            if choice == "cgroup":
                raise ConfigError(f"ACTIVATION_CONTAINMENT: {exc}") from None
            groups, how = None, f"subreaper sweep ({exc})"
    killed += [pid for pid in kill_strays(ident, grace=grace) if pid not in killed]
    killed += [pid for pid in kill_supervisor_orphans(run_dir, grace=grace) if pid not in killed]
    return groups, how, killed


def _write(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
