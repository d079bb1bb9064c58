"""The result writer thread (worker/result_writer.py): order, room, failure, close."""

from __future__ import annotations

import errno
import logging
import threading
import time
from typing import Any

import pytest

from activation.worker import result_writer
from activation.worker.result_writer import ResultWriter

log = logging.getLogger("test")


def result(task_id: str) -> Any:
    return {"task_id": task_id, "status": "completed"}


class Disk:
    """A write that records, and that a test can hold at a gate or make fail."""

    def __init__(self) -> None:
        self.written: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.refuse: set[str] = set()
        self.bug: set[str] = set()

    def write(self, record: Any) -> None:
        self.entered.set()
        assert self.gate.wait(10), "a test left the gate shut"
        task_id = record["task_id"]
        if task_id in self.refuse:
            raise OSError(errno.ENOSPC, "No space left on device")
        if task_id in self.bug:
            raise KeyError("a bug")
        self.written.append(task_id)


def test_results_are_written_in_the_order_they_were_handed_over() -> None:
    disk = Disk()
    writer = ResultWriter(disk.write, log)
    ids = [f"t{i}" for i in range(50)]
    for task_id in ids:
        assert writer.submit(result(task_id))
    assert writer.wait_idle(time.monotonic() + 10)
    assert disk.written == ids
    assert writer.close() == []


def test_a_result_is_pending_until_its_write_returns() -> None:
    disk = Disk()
    disk.gate.clear()
    writer = ResultWriter(disk.write, log)
    writer.submit(result("slow"))
    assert disk.entered.wait(10)
    assert writer.pending("slow") and not writer.pending("other")
    assert not writer.wait_idle(time.monotonic() + 0.05), "idle while a write is under way"
    disk.gate.set()
    assert writer.wait_idle(time.monotonic() + 10)
    assert not writer.pending("slow") and disk.written == ["slow"]
    writer.close()


def test_the_executor_waits_for_room_instead_of_piling_up_unwritten_results() -> None:
    disk = Disk()
    disk.gate.clear()
    writer = ResultWriter(disk.write, log)
    for i in range(result_writer.MAX_PENDING):
        assert writer.submit(result(f"t{i}"))
    blocked = threading.Thread(target=writer.submit, args=(result("one-more"),))
    blocked.start()
    blocked.join(0.2)
    assert blocked.is_alive(), "a full writer takes no more"
    disk.gate.set()
    blocked.join(10)
    assert not blocked.is_alive()
    assert writer.wait_idle(time.monotonic() + 10)
    assert disk.written[-1] == "one-more" and len(disk.written) == result_writer.MAX_PENDING + 1
    writer.close()


@pytest.mark.parametrize("how", ["refuse", "bug"])
def test_a_failed_write_stops_the_writer_and_gives_back_every_result_behind_it(how: str) -> None:
    disk = Disk()
    getattr(disk, how).add("t1")
    disk.gate.clear()
    writer = ResultWriter(disk.write, log)
    for task_id in ("t0", "t1", "t2", "t3"):
        writer.submit(result(task_id))
    disk.gate.set()
    assert writer.wait_idle(time.monotonic() + 10)
    assert writer.failed and disk.written == ["t0"], "nothing is written past a failure"
    assert not writer.submit(result("t4")), "a stopped writer takes nothing new"
    back = writer.take_back()
    assert [r["task_id"] for r, _ in back] == ["t1", "t2", "t3"]
    assert all(isinstance(exc, OSError) for _, exc in back)
    if how == "refuse":
        assert back[0][1].errno == errno.ENOSPC
    assert not writer.failed and writer.take_back() == []
    assert writer.submit(result("t5")), "once given back, the writer goes on"
    assert writer.wait_idle(time.monotonic() + 10) and disk.written == ["t0", "t5"]
    assert writer.close() == []


def test_close_returns_what_the_deadline_left_unwritten_but_not_the_write_under_way() -> None:
    disk = Disk()
    disk.gate.clear()
    writer = ResultWriter(disk.write, log)
    for task_id in ("t0", "t1", "t2"):
        writer.submit(result(task_id))
    assert disk.entered.wait(10)
    left = writer.close(time.monotonic() + 0.1)
    assert [r["task_id"] for r, _ in left] == ["t1", "t2"]
    assert not writer.submit(result("late")), "a closed writer takes nothing"
    disk.gate.set()
    deadline = time.monotonic() + 10
    while disk.written != ["t0"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert disk.written == ["t0"], "the write under way at close lands"
    assert writer.close() == []
