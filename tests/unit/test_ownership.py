"""spool/ownership.py: one tree per worker name, and a free lock as proof that a program is gone."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from activation.spool import ownership
from activation.spool.layout import Spool
from tests.conftest import wait_for

W = "w1"


@pytest.fixture
def other_run_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="act2-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


class NoWait:
    """A clock and a sleep for `acquire`: each sleep moves time on, so its wait ends at once."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.now += seconds


def test_a_second_tree_is_refused_with_one_line_naming_the_owner(spool, run_dir, other_run_dir):
    mine = ownership.acquire(spool, W, "listener", run_dir)
    try:
        fake = NoWait()
        with pytest.raises(ownership.WorkerOwned) as refused:
            ownership.acquire(spool, W, "executor", other_run_dir, clock=fake.clock, sleep=fake.sleep)
        message = str(refused.value)
        assert "\n" not in message and "another tree" in message and "listener pid" in message
        assert fake.sleeps > 0 and fake.now >= ownership.OWNERSHIP_WAIT  # it waited for the owner to go
        assert ownership.holder(spool, W, "executor") is None  # and took nothing
    finally:
        mine.release()


def test_a_refusal_names_the_owner_even_when_the_mutex_is_busy_at_the_deadline(spool, run_dir, other_run_dir):
    # The other programs of the refused tree retry under the same mutex: the last look may find it
    # busy. The refusal still names the owner seen before, not the mutex (CI caught that line).
    mine = ownership.acquire(spool, W, "listener", run_dir)
    fake = NoWait()
    with open(ownership.mutex_path(spool, W), "rb") as mutex:

        def sleep(seconds: float) -> None:
            fake.sleep(seconds)
            if fake.now + seconds >= ownership.OWNERSHIP_WAIT:  # the last attempt comes next
                fcntl.flock(mutex, fcntl.LOCK_EX | fcntl.LOCK_NB)

        try:
            with pytest.raises(ownership.WorkerOwned) as refused:
                ownership.acquire(spool, W, "executor", other_run_dir, clock=fake.clock, sleep=sleep)
            assert "run by another tree" in str(refused.value) and "listener pid" in str(refused.value)
        finally:
            mine.release()


def test_a_busy_mutex_alone_is_named_when_nothing_else_was_seen(spool, run_dir):
    ownership.locks_dir(spool).mkdir(parents=True, exist_ok=True)
    with open(ownership.mutex_path(spool, W), "ab") as mutex:
        fcntl.flock(mutex, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fake = NoWait()
        with pytest.raises(ownership.WorkerOwned, match="stayed taken"):
            ownership.acquire(spool, W, "executor", run_dir, clock=fake.clock, sleep=fake.sleep)


def test_the_programs_of_one_tree_share_the_worker(spool, run_dir):
    locks = [ownership.acquire(spool, W, program, run_dir) for program in ownership.PROGRAMS]
    try:
        held = ownership.holders(spool, W)
        assert set(held) == set(ownership.PROGRAMS)
        assert {h.tree for h in held.values()} == {ownership.tree_id(run_dir)}
    finally:
        for lock in locks:
            lock.release()
    assert ownership.holders(spool, W) == {}


def test_a_second_copy_of_a_program_in_the_same_tree_is_refused(spool, run_dir):
    first = ownership.acquire(spool, W, "executor", run_dir)
    try:
        fake = NoWait()
        with pytest.raises(ownership.WorkerOwned, match="already runs in this tree"):
            ownership.acquire(spool, W, "executor", run_dir, clock=fake.clock, sleep=fake.sleep)
    finally:
        first.release()


def test_once_the_owner_is_gone_another_tree_takes_over(spool, run_dir, other_run_dir):
    ownership.acquire(spool, W, "listener", run_dir).release()
    lock = ownership.acquire(spool, W, "listener", other_run_dir)
    try:
        assert ownership.holders(spool, W)["listener"].tree == ownership.tree_id(other_run_dir)
    finally:
        lock.release()


HOLD = """
import sys, time
from pathlib import Path
from activation.spool import ownership
from activation.spool.layout import Spool
ownership.acquire(Spool(Path(sys.argv[1])), "w1", "executor", Path(sys.argv[2]))
print("held", flush=True)
time.sleep(60)
"""


def test_sigkill_frees_the_lock_at_once_and_a_probe_proves_the_executor_gone(spool, run_dir):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(spool.root), str(run_dir)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        held = ownership.holder(spool, W, "executor")
        assert held is not None and held.pid == holder.pid
        with ownership.executor_gone(spool, W) as gone:
            assert not gone
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        with ownership.executor_gone(spool, W) as gone:
            assert gone
            # while the settler holds it, no executor can start and settle the same claims
            fake = NoWait()
            with pytest.raises(ownership.WorkerOwned):
                ownership.acquire(spool, W, "executor", run_dir, clock=fake.clock, sleep=fake.sleep)
        assert ownership.holder(spool, W, "executor") is None
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()


def test_the_lock_is_not_inherited_by_the_agent(spool, run_dir):
    lock = ownership.acquire(spool, W, "executor", run_dir)
    try:
        assert lock.fd is not None and fcntl.fcntl(lock.fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        lock.release()


def test_a_probe_leaves_a_free_lock_free(spool, run_dir, other_run_dir):
    ownership.acquire(spool, W, "heartbeat", run_dir).release()
    for _ in range(3):
        assert ownership.holder(spool, W, "heartbeat") is None
    ownership.acquire(spool, W, "heartbeat", other_run_dir).release()  # nothing stayed locked


def test_the_tree_id_is_one_per_run_folder(run_dir, other_run_dir):
    assert ownership.tree_id(run_dir, create=False) is None
    first = ownership.tree_id(run_dir)
    assert first and ownership.tree_id(run_dir) == first
    assert ownership.tree_id(other_run_dir) != first


def test_foreign_owner_names_the_other_tree_only(spool, run_dir, other_run_dir):
    lock = ownership.acquire(spool, W, "listener", run_dir)
    try:
        assert ownership.foreign_owner(spool, W, run_dir) is None  # the owner asking about itself
        assert ownership.foreign_owner(spool, W, other_run_dir) is None  # a run folder no tree ever used
        ownership.tree_id(other_run_dir)  # a tree that tried to start there
        other = ownership.foreign_owner(spool, W, other_run_dir)
        assert other is not None and other.program == "listener"
    finally:
        lock.release()
    wait_for(lambda: ownership.foreign_owner(spool, W, other_run_dir) is None, 5)


def test_a_spool_without_a_locks_folder_has_no_live_program(tmp_path):
    spool = Spool(tmp_path / "fresh")
    spool.init([W])
    assert ownership.holders(spool, W) == {}


def _start_racing(
    spool: Spool, program: str, folder: Path, barrier: threading.Barrier, got: dict[str, ownership.ProgramLock]
) -> None:
    barrier.wait()
    with contextlib.suppress(ownership.WorkerOwned):
        got[program] = ownership.acquire(spool, W, program, folder, wait=0.1)


def test_two_trees_starting_at_once_never_split_the_worker(spool, run_dir, other_run_dir):
    for _ in range(20):
        got: dict[str, ownership.ProgramLock] = {}
        barrier = threading.Barrier(2)
        threads = [
            threading.Thread(target=_start_racing, args=(spool, "listener", run_dir, barrier, got)),
            threading.Thread(target=_start_racing, args=(spool, "executor", other_run_dir, barrier, got)),
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        assert len(got) == 1, sorted(got)  # exactly one tree owns the worker, never half of it each
        for lock in got.values():
            lock.release()
