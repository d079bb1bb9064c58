"""The listener in-process: wake, validate, dead-letter, queue in FIFO order, rescan, recover."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from activation.config import Settings
from activation.spool import task as tasks
from activation.spool.atomic import atomic_write_bytes, atomic_write_json, read_json
from activation.spool.layout import Spool
from activation.worker.listener import Listener
from activation.worker.queue import QueueClient, QueuedTask, load_authkey, socket_path
from activation.worker.wake.base import StubSource, WakeSource
from tests.conftest import WORKER, wait_for


@dataclass
class Running:
    listener: Listener
    client: QueueClient
    spool: Spool
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    def get(self, timeout: float = 5.0) -> QueuedTask | None:
        return self.client.get(timeout)

    def take(self, timeout: float = 5.0) -> str:
        """Get the next id and claim it, as the executor does."""
        item = self.client.get(timeout)
        assert item is not None, "nothing was queued"
        assert self.spool.claim(WORKER, item.task_id) is not None
        return item.task_id

    def alive(self) -> bool:
        return self.thread.is_alive() and all(s.alive() for s in self.listener.sources)


@pytest.fixture
def start(make_settings: Callable[..., Settings], spool: Spool) -> Iterator[Callable[..., Running]]:
    """Run a Listener the way run_program does (initialize, loop until stopped, shutdown)."""
    runs: list[Running] = []

    def run(*, sources: list[WakeSource] | None = None, **overrides: Any) -> Running:
        overrides.setdefault("rescan_interval", 0.2)
        settings = make_settings(**overrides)
        listener = Listener(settings, sources=sources)
        listener.initialize()
        errors: list[BaseException] = []

        def loop() -> None:
            try:
                while not listener.stopping.is_set():
                    listener.loop()
            except BaseException as exc:  # surfaced by the test's assertions
                errors.append(exc)

        thread = threading.Thread(target=loop, name="listener-loop")
        thread.start()
        client = QueueClient(socket_path(settings.run_dir), load_authkey(settings.run_dir))
        running = Running(listener, client, spool, thread, errors)
        runs.append(running)
        return running

    yield run
    for running in runs:
        stop(running)
        assert running.errors == []


def stop(running: Running) -> None:
    running.client.close()
    running.listener.request_stop()
    running.thread.join(5)
    running.listener.shutdown()


def task_json(task_id: str, **fields: Any) -> dict[str, Any]:
    return {"task_id": task_id, "description": f"run {task_id}", **fields}


def write_atomic(spool: Spool, task_id: str, **fields: Any) -> Path:
    path = spool.task_path(WORKER, task_id)
    atomic_write_json(path, task_json(task_id, **fields), durable=False)
    return path


def write_plain(spool: Spool, name: str, data: bytes) -> Path:
    path = spool.inbox(WORKER) / name
    with open(path, "wb") as handle:
        handle.write(data)
    return path


def dead_reasons(spool: Spool) -> dict[str, str]:
    """Dead-letter records by the file name they came from: {name: reason}."""
    found = {}
    for record_path in spool.dead_letters():
        record = read_json(record_path)
        found[Path(record["source"]).name] = record["reason"]
    return found


# -- the happy paths --------------------------------------------------------------------------


def test_atomic_and_plain_writes_are_both_queued(start: Callable[..., Running], spool: Spool) -> None:
    running = start()
    write_atomic(spool, "atomic")
    assert running.take() == "atomic"
    write_plain(spool, "plain.json", json.dumps(task_json("plain")).encode())
    assert running.take() == "plain"
    assert running.get(0.2) is None
    assert dead_reasons(spool) == {}


def test_a_slowly_written_file_is_queued_once_complete_and_never_dead_lettered(
    start: Callable[..., Running], spool: Spool
) -> None:
    running = start(rescan_interval=0.05, settle_time=5.0)
    text = json.dumps(task_json("slow")).encode()
    path = spool.task_path(WORKER, "slow")
    with open(path, "wb") as handle:
        handle.write(text[: len(text) // 2])
        handle.flush()
        rescans = running.listener.stats()["rescans"]
        wait_for(lambda: running.listener.stats()["rescans"] >= rescans + 3, timeout=5, what="rescans mid-write")
        assert running.get(0.05) is None
        assert running.listener.stats()["not_ready"] == 1
        handle.write(text[len(text) // 2 :])
    assert running.take() == "slow"
    assert dead_reasons(spool) == {}
    assert running.listener.stats()["not_ready"] == 0


def test_an_empty_file_waits_and_is_queued_once_written(start: Callable[..., Running], spool: Spool) -> None:
    running = start(settle_time=5.0)
    path = spool.task_path(WORKER, "later")
    path.touch()  # created and closed empty: a writer may be about to fill it
    assert running.get(0.3) is None
    atomic_write_json(path, task_json("later"), durable=False)
    assert running.take() == "later"
    assert dead_reasons(spool) == {}


def test_a_forgotten_empty_or_cut_file_is_dead_lettered_once_settled(
    start: Callable[..., Running], spool: Spool
) -> None:
    running = start(settle_time=0.3)
    spool.task_path(WORKER, "empty").touch()
    cut = spool.task_path(WORKER, "cut")
    cut.write_bytes(b'{"task_id": "cut", "descr')
    os.utime(cut, (time.time() - 60, time.time() - 60))  # as a rescan finds it long after the writer died
    wait_for(lambda: dead_reasons(spool).keys() >= {"empty.json", "cut.json"}, timeout=5)
    assert dead_reasons(spool) == {"empty.json": tasks.INVALID_JSON, "cut.json": tasks.INVALID_JSON}
    write_atomic(spool, "next")
    assert running.take() == "next"


# -- bad input --------------------------------------------------------------------------------


def _corrupt(spool: Spool) -> str:
    atomic_write_bytes(spool.task_path(WORKER, "corrupt"), b'{"task_id": "corrupt", ', durable=False)
    return "corrupt.json"


def _missing_field(spool: Spool) -> str:
    atomic_write_json(spool.task_path(WORKER, "nodesc"), {"task_id": "nodesc"}, durable=False)
    return "nodesc.json"


def _ill_typed(spool: Spool) -> str:
    write_atomic(spool, "typed", description=5)
    return "typed.json"


def _timeout_too_long(spool: Spool) -> str:
    write_atomic(spool, "forever", timeout=10**9)
    return "forever.json"


def _not_an_object(spool: Spool) -> str:
    atomic_write_bytes(spool.task_path(WORKER, "list"), b"[1, 2]", durable=False)
    return "list.json"


def _traversal_name(spool: Spool) -> str:
    name = "x..%2f..%2fetc%2fpasswd.json"
    atomic_write_json(spool.inbox(WORKER) / name, task_json("x..%2f..%2fetc%2fpasswd"), durable=False)
    return name


def _traversal_id(spool: Spool) -> str:
    atomic_write_json(spool.task_path(WORKER, "evil"), task_json("../../etc/x"), durable=False)
    return "evil.json"


def _id_mismatch(spool: Spool) -> str:
    atomic_write_json(spool.task_path(WORKER, "a1"), task_json("b1"), durable=False)
    return "a1.json"


def _too_large(spool: Spool) -> str:
    atomic_write_json(spool.task_path(WORKER, "huge"), task_json("huge", pad="x" * (2 * 1024 * 1024)), durable=False)
    return "huge.json"


def _not_utf8(spool: Spool) -> str:
    atomic_write_bytes(spool.task_path(WORKER, "latin"), '{"task_id": "latin", "description": "é"}'.encode("latin-1"))
    return "latin.json"


def _symlink(spool: Spool) -> str:
    target = spool.root / "elsewhere.json"
    target.write_text(json.dumps(task_json("link")))
    os.symlink(target, spool.task_path(WORKER, "link"))  # no close or move event: the rescan finds it
    return "link.json"


def _folder(spool: Spool) -> str:
    spool.task_path(WORKER, "folder").mkdir()
    return "folder.json"


def _duplicate(spool: Spool) -> str:
    atomic_write_json(spool.result_path(WORKER, "done"), {"task_id": "done", "status": "completed"}, durable=False)
    write_atomic(spool, "done")
    return "done.json"


@pytest.mark.parametrize(
    ("make_bad", "reason"),
    [
        (_corrupt, tasks.INVALID_JSON),
        (_missing_field, tasks.MISSING_FIELD),
        (_ill_typed, tasks.INVALID_FIELD),
        (_timeout_too_long, tasks.INVALID_FIELD),
        (_not_an_object, tasks.NOT_AN_OBJECT),
        (_traversal_name, tasks.INVALID_TASK_ID),
        (_traversal_id, tasks.INVALID_TASK_ID),
        (_id_mismatch, tasks.ID_MISMATCH),
        (_too_large, tasks.TOO_LARGE),
        (_not_utf8, tasks.NOT_UTF8),
        (_symlink, tasks.SYMLINK),
        (_folder, tasks.NOT_A_FILE),
        (_duplicate, tasks.DUPLICATE),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_bad_input_is_dead_lettered_and_the_listener_carries_on(
    make_bad: Callable[[Spool], str], reason: str, start: Callable[..., Running], spool: Spool
) -> None:
    running = start()
    name = make_bad(spool)
    # The record is written first, then the file moves: wait for both.
    inbox_file = spool.inbox(WORKER) / name
    wait_for(
        lambda: name in dead_reasons(spool) and not os.path.lexists(inbox_file),
        timeout=5,
        what=f"{name} in the dead letter",
    )
    assert dead_reasons(spool) == {name: reason}
    write_atomic(spool, "good")
    assert running.take() == "good"
    assert running.get(0.1) is None
    assert running.alive()
    assert running.listener.stats()["dead_lettered"] == 1


def test_the_record_keeps_a_task_that_parsed(start: Callable[..., Running], spool: Spool) -> None:
    start()
    name = _id_mismatch(spool)
    wait_for(lambda: name in dead_reasons(spool), timeout=5)
    record = read_json(spool.dead_letter_path("a1"))
    assert record["task"] == task_json("b1") and record["worker"] == WORKER and record["detail"]


def test_dot_files_and_other_names_are_left_alone(start: Callable[..., Running], spool: Spool) -> None:
    running = start()
    write_plain(spool, "..%2fetc.json", b"{}")
    write_plain(spool, ".tmp_x.json", b"{")
    write_plain(spool, "notes.txt", b"hello")
    running.listener.notify("../../etc/passwd", "redis")
    running.listener.notify("a/b.json", "redis")
    running.listener.notify("", "redis")
    running.listener.notify("\udcff.json", "redis")
    write_atomic(spool, "real")
    assert running.take() == "real"
    assert running.get(0.3) is None
    assert dead_reasons(spool) == {}
    assert sorted(os.listdir(spool.inbox(WORKER))) == sorted(
        [".processing", "..%2fetc.json", ".tmp_x.json", "notes.txt"]
    )


# -- order, bursts, restarts ------------------------------------------------------------------


def test_a_burst_of_2000_is_queued_once_each_in_fifo_order(start: Callable[..., Running], spool: Spool) -> None:
    running = start(rescan_interval=0.5)
    ids = [f"t{i:05d}" for i in range(2000)]
    for task_id in ids:
        write_atomic(spool, task_id)
    got = [running.take(timeout=10) for _ in ids]
    assert got == ids
    assert running.get(0.7) is None  # a rescan has run meanwhile and found nothing new
    stats = running.listener.stats()
    assert stats["queue_size"] == 0 and stats["overflows"] == 0


def test_files_already_in_the_inbox_are_queued_by_the_start_scan(start: Callable[..., Running], spool: Spool) -> None:
    ids = ["c", "a", "b"]  # arrival order differs from name order
    for i, task_id in enumerate(ids):
        path = write_atomic(spool, task_id)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    running = start(rescan_interval=60)
    assert [running.take() for _ in ids] == ids
    assert running.listener.stats()["rescans"] == 1


def test_a_restarted_listener_refills_the_queue_and_the_client_reconnects(
    start: Callable[..., Running], spool: Spool
) -> None:
    first = start()
    for task_id in ("a", "b", "c"):
        write_atomic(spool, task_id)
    assert first.take() == "a"  # claimed: running in the executor, no longer in the inbox
    client = first.client
    first.listener.request_stop()
    first.thread.join(5)
    first.listener.shutdown()
    second = start()
    for task_id in ("b", "c"):  # the old connection reconnects to the new listener
        assert client.get(5) == QueuedTask(task_id, "rescan")
        assert spool.claim(WORKER, task_id) is not None
    assert client.get(0.3) is None
    assert second.get(0.1) is None


def test_an_executor_that_dies_before_claiming_gets_its_task_back_first(
    start: Callable[..., Running], spool: Spool, run_dir: Path
) -> None:
    running = start(rescan_interval=60)
    write_atomic(spool, "a")
    write_atomic(spool, "b")
    wait_for(lambda: len(running.listener.work) == 2, timeout=5)
    doomed = QueueClient(socket_path(run_dir), load_authkey(run_dir))
    assert doomed.get(5) == QueuedTask("a", "inotify")
    doomed.close()  # gone without claiming a
    wait_for(lambda: running.listener.work.in_flight == 0, timeout=5)
    assert running.take() == "a"
    assert running.take() == "b"


def test_a_claimed_task_dropped_again_waits_for_its_result_then_is_a_duplicate(
    start: Callable[..., Running], spool: Spool
) -> None:
    claim = spool.claim_path(WORKER, "twice")
    atomic_write_json(claim, task_json("twice"), durable=False)  # an executor runs it already
    running = start()
    write_atomic(spool, "twice")
    assert running.get(0.5) is None
    spool.write_result(WORKER, {"task_id": "twice", "status": "completed"})
    wait_for(lambda: "twice.json" in dead_reasons(spool), timeout=5)
    assert dead_reasons(spool) == {"twice.json": tasks.DUPLICATE}


# -- modes and self-repair --------------------------------------------------------------------


def test_poll_mode_queues_tasks(start: Callable[..., Running], spool: Spool) -> None:
    running = start(mode=("poll",), poll_interval=0.05, rescan_interval=60)
    write_atomic(spool, "polled")
    item = running.get()
    assert item == QueuedTask("polled", "poll")
    stats = running.client.stats()
    assert stats["sources"] == {"poll": {"alive": True}} and stats["observer_alive"] is None


def test_stats_over_the_socket(start: Callable[..., Running], spool: Spool) -> None:
    running = start()
    write_atomic(spool, "a")
    write_atomic(spool, "b")
    wait_for(lambda: len(running.listener.work) == 2, timeout=5)
    assert running.get() is not None
    stats = running.client.stats()
    assert stats["queue_size"] == 1 and stats["in_flight"] == 1
    assert stats["sources"] == {"inotify": {"alive": True}} and stats["observer_alive"] is True
    assert stats["rescans"] >= 1 and stats["last_rescan"] and stats["overflows"] == 0
    assert stats["events"]["inotify"] >= 2 and stats["queued"] == {"inotify": 2}


def test_a_dead_source_is_restarted_and_followed_by_a_rescan(start: Callable[..., Running], spool: Spool) -> None:
    stub = StubSource()
    running = start(sources=[stub], rescan_interval=0.1)
    stub.die()
    write_atomic(spool, "missed")  # nobody notifies it: only the rescan after the restart can
    wait_for(lambda: stub.starts == 2, timeout=5, what="the stub restarted")
    assert running.take() == "missed"


def test_an_overflow_rescans_at_once(start: Callable[..., Running], spool: Spool) -> None:
    stub = StubSource()
    running = start(sources=[stub], rescan_interval=60)
    write_atomic(spool, "lost")  # its event was lost in the overflow
    assert running.get(0.2) is None
    running.listener._on_overflow()
    assert running.take() == "lost"
    assert running.listener.stats()["overflows"] == 1


def test_stub_notifications_are_validated_like_any_other(start: Callable[..., Running], spool: Spool) -> None:
    stub = StubSource("redis")
    running = start(sources=[stub], rescan_interval=60)
    path = spool.task_path(WORKER, "r1")
    path.write_text(json.dumps(task_json("r1")))
    stub.fire("r1.json")
    assert running.get() == QueuedTask("r1", "redis")
    stub.fire("r1.json")  # in flight: not queued twice
    stub.fire("nothere.json")  # already claimed or never there: ignored
    assert running.get(0.1) is None


def test_shutdown_removes_the_socket_and_joins_everything(
    make_settings: Callable[..., Settings], run_dir: Path
) -> None:
    threads_before = set(threading.enumerate())
    listener = Listener(make_settings())
    listener.initialize()
    assert socket_path(run_dir).exists()
    listener.request_stop()
    listener.loop()  # returns at once once stopping
    listener.shutdown()
    assert not socket_path(run_dir).exists()
    assert [t for t in threading.enumerate() if t not in threads_before and t.is_alive()] == []


def test_a_periodic_rescan_leaves_new_files_to_a_live_event_source(start: Callable[..., Running], spool: Spool) -> None:
    stub = StubSource()
    running = start(sources=[stub], rescan_interval=60)
    write_atomic(spool, "quiet")  # its event is lost, or merely late
    running.listener.rescan("periodic")  # first sight: the event source may still be on its way
    assert running.get(0.1) is None
    running.listener.rescan("periodic")  # still not queued a round later: the rescan takes it
    assert running.get(1) == QueuedTask("quiet", "rescan")
