"""Who runs a worker: one tree per worker name, and proof that a program of it is alive.

Each program of a worker tree (listener, executor, heartbeat) holds an exclusive ``flock`` on
``<spool>/locks/<worker>.<program>.lock`` for its whole life; the kernel drops it the moment the
process dies, however it dies. So "the lock is free" proves "that program is gone", in every
container that shares the spool on one host (one kernel). Recovery trusts nothing weaker.

A tree is named by a random id kept in its private run folder. A program starts only when no
program of another tree holds a lock of its worker: a second tree started with the same
WORKER_NAME on the same spool is refused (`WorkerOwned`), and ``check``/``status`` say so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activation.clock import iso_now
from activation.errors import ActivationError
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool

PROGRAMS = ("listener", "executor", "heartbeat")
LOCKS = "locks"
TREE_ID_NAME = "tree-id"
# How long a program waits for another tree's programs to go before it refuses. Longer than
# supervisord's startsecs (1 s in worker.conf): a refused program must count as started, so that
# its exit code (EXIT_OWNED, listed in exitcodes) ends it as EXITED instead of a retry loop.
OWNERSHIP_WAIT = 3.0
RETRY_EVERY = 0.05


class WorkerOwned(ActivationError):
    """Another tree (or another copy of this program) runs this worker."""


@dataclass(frozen=True)
class Holder:
    """What a program lock says about the process holding it (best effort: it is advisory text)."""

    program: str
    tree: str | None
    host: str | None
    pid: int | None
    since: str | None

    def describe(self) -> str:
        tree = (self.tree or "?")[:8]
        return (
            f"{self.program} pid {self.pid or '?'} on host {self.host or '?'} (tree {tree}) since {self.since or '?'}"
        )


def locks_dir(spool: Spool) -> Path:
    return spool.root / LOCKS


def lock_path(spool: Spool, worker: str, program: str) -> Path:
    return locks_dir(spool) / f"{worker}.{program}.lock"


def mutex_path(spool: Spool, worker: str) -> Path:
    return locks_dir(spool) / f"{worker}.lock"


def tree_id(run_dir: Path, *, create: bool = True) -> str | None:
    """This tree's id, from its run folder; created by whichever program asks first.

    Published with ``os.link`` so that programs starting together agree on one id.
    """
    path = Path(run_dir) / TREE_ID_NAME
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip() or None
    if not create:
        return None
    Path(run_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{TREE_ID_NAME}.{os.urandom(4).hex()}")
    tmp.write_text(os.urandom(8).hex())
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    return path.read_text().strip()


def _try_flock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def _open_lock(path: Path, *, create: bool) -> int | None:
    """An fd on the lock file (never inherited by children), or None when it does not exist.

    A probe opens it read-only (flock needs no write access); a taker creates it.
    """
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None


def _read_holder(path: Path, program: str) -> Holder:
    record: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_bytes() or b"{}")
        if isinstance(data, dict):
            record = data
    pid = record.get("pid")
    return Holder(
        program,
        record.get("tree") if isinstance(record.get("tree"), str) else None,
        record.get("host") if isinstance(record.get("host"), str) else None,
        pid if isinstance(pid, int) and not isinstance(pid, bool) else None,
        record.get("since") if isinstance(record.get("since"), str) else None,
    )


def holder(spool: Spool, worker: str, program: str) -> Holder | None:
    """Who holds ``program``'s lock of ``worker`` right now, or None when nobody does (it is gone).

    The probe takes the lock for an instant when it is free; a program starting at that instant
    retries (see `acquire`), so probing never makes a program fail.
    """
    path = lock_path(spool, worker, program)
    fd = _open_lock(path, create=False)
    if fd is None:
        return None
    try:
        if _try_flock(fd):
            return None
        return _read_holder(path, program)
    finally:
        os.close(fd)  # closing drops a lock the probe took


def holders(spool: Spool, worker: str) -> dict[str, Holder]:
    """The worker's programs that are alive, by name, with what their locks say."""
    found = {}
    for program in PROGRAMS:
        held = holder(spool, worker, program)
        if held is not None:
            found[program] = held
    return found


class ProgramLock:
    """A program's lock on its worker, held until `release` or the process's death."""

    def __init__(self, fd: int, path: Path, tree: str) -> None:
        self.fd: int | None = fd
        self.path = path
        self.tree = tree

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)


def acquire(
    spool: Spool,
    worker: str,
    program: str,
    run_dir: Path,
    *,
    wait: float = OWNERSHIP_WAIT,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> ProgramLock:
    """Take ``program``'s lock of ``worker`` for this tree; raises WorkerOwned after ``wait``.

    The decision (does another tree hold any lock of this worker?) and the taking are done under
    the worker's mutex, so two trees starting at once cannot each take half of the worker.
    """
    mine = tree_id(run_dir) or ""
    path = lock_path(spool, worker, program)
    deadline = clock() + wait
    reason = f"worker {worker}'s lock {mutex_path(spool, worker)} stayed taken"
    while True:
        outcome = _try_acquire(spool, worker, program, mine, path)
        if isinstance(outcome, ProgramLock):
            return outcome
        # A busy mutex says nothing about who owns the worker: refuse with the last real reason.
        if outcome is not MUTEX_BUSY:
            reason = outcome
        if clock() >= deadline:
            raise WorkerOwned(reason)
        sleep(RETRY_EVERY)


MUTEX_BUSY = "mutex busy"


def _try_acquire(spool: Spool, worker: str, program: str, mine: str, path: Path) -> ProgramLock | str:
    mutex = _open_lock(mutex_path(spool, worker), create=True)
    assert mutex is not None
    try:
        if not _try_flock(mutex):  # held for microseconds by whoever has it: look again soon
            return MUTEX_BUSY
        for other in PROGRAMS:
            if other == program:
                continue
            held = holder(spool, worker, other)
            if held is not None and held.tree != mine:
                return (
                    f"worker {worker} is run by another tree ({held.describe()}): refusing to start a second "
                    "tree with the same WORKER_NAME on this spool; stop the other one or choose another name"
                )
        fd = _open_lock(path, create=True)
        assert fd is not None
        if not _try_flock(fd):
            os.close(fd)
            held = _read_holder(path, program)
            same = "this tree" if held.tree == mine else "another tree"
            return f"worker {worker}'s {program} already runs in {same} ({held.describe()}); refusing a second one"
        record = {
            "tree": mine,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "program": program,
            "since": iso_now(),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        return ProgramLock(fd, path, mine)
    finally:
        os.close(mutex)


@contextlib.contextmanager
def executor_gone(spool: Spool, worker: str) -> Iterator[bool]:
    """True (while holding its lock) when the worker's executor is provably not running.

    Whoever settles another executor's claims does it inside this block: the executor cannot
    start and recover the same claims meanwhile, because it needs this lock first.
    """
    fd = _open_lock(lock_path(spool, worker, "executor"), create=True)
    assert fd is not None
    try:
        yield _try_flock(fd)
    finally:
        os.close(fd)


def refusal_path(spool: Spool, worker: str) -> Path:
    return locks_dir(spool) / f"{worker}.refused.json"


def record_refusal(spool: Spool, worker: str, program: str, run_dir: Path, message: str) -> None:
    """Leave a note in the spool that a second tree was refused, for ``status`` and the orchestrator."""
    record = {
        "worker": worker,
        "program": program,
        "tree": tree_id(run_dir, create=False),
        "host": socket.gethostname(),
        "at": iso_now(),
        "message": message,
    }
    with contextlib.suppress(OSError):
        atomic_write_json(refusal_path(spool, worker), record, durable=False)


def last_refusal(spool: Spool, worker: str) -> dict[str, Any] | None:
    """The last refusal of a second tree for ``worker``, if any (a note; never cleared on its own)."""
    try:
        record = read_json(refusal_path(spool, worker))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def foreign_owner(spool: Spool, worker: str, run_dir: Path) -> Holder | None:
    """A program of another tree that runs ``worker``, seen from the tree whose run folder is ``run_dir``.

    None when this run folder has no tree (nothing of it ever ran here) or nothing else holds the worker.
    """
    mine = tree_id(run_dir, create=False)
    if mine is None:
        return None
    for held in holders(spool, worker).values():
        if held.tree != mine:
            return held
    return None
