"""The work queue and its socket: FIFO, de-duplication, in-flight tracking, restarts, security."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from activation.errors import QueueError
from activation.worker.queue import (
    AUTHKEY_BYTES,
    QueueClient,
    QueuedTask,
    QueueServer,
    WorkQueue,
    load_authkey,
    socket_path,
)
from tests.conftest import wait_for


@pytest.fixture
def serve(run_dir: Path) -> Iterator[Callable[..., tuple[WorkQueue, QueueServer]]]:
    """Start a QueueServer on the run folder's socket; every server started is stopped after."""
    servers: list[QueueServer] = []

    def start(
        work: WorkQueue | None = None, stats: Callable[[], dict[str, Any]] | None = None
    ) -> tuple[WorkQueue, QueueServer]:
        work = work if work is not None else WorkQueue()
        server = QueueServer(socket_path(run_dir), load_authkey(run_dir), work, stats or (lambda: {}))
        server.start()
        servers.append(server)
        return work, server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def client(run_dir: Path) -> Iterator[QueueClient]:
    client = QueueClient(socket_path(run_dir), load_authkey(run_dir))
    yield client
    client.close()


# -- WorkQueue --------------------------------------------------------------------------------


def test_fifo_and_no_id_twice() -> None:
    work = WorkQueue()
    assert [work.put(t, "inotify") for t in ("a", "b", "c")] == [True, True, True]
    assert work.put("a", "rescan") is False  # already queued
    assert len(work) == 3 and "a" in work and "z" not in work
    consumer = object()
    assert work.take(consumer, 0) == QueuedTask("a", "inotify")
    assert "a" in work and len(work) == 2 and work.in_flight == 1
    assert work.put("a", "rescan") is False  # in flight
    assert work.take(consumer, 0) == QueuedTask("b", "inotify")  # acks a
    assert "a" not in work
    assert work.put("a", "rescan") is True
    assert [work.take(consumer, 0), work.take(consumer, 0)] == [QueuedTask("c", "inotify"), QueuedTask("a", "rescan")]


def test_release_requeues_at_the_front_only_when_still_pending() -> None:
    pending = {"a"}
    work = WorkQueue(still_pending=lambda task_id: task_id in pending)
    gone, stays = object(), object()
    for task_id in ("a", "b", "c"):
        work.put(task_id, "inotify")
    assert work.take(stays, 0).task_id == "a"  # type: ignore[union-attr]
    assert work.take(gone, 0).task_id == "b"  # type: ignore[union-attr]
    assert work.release(gone) is None  # b was claimed: not pending, not requeued
    assert "b" not in work
    assert work.release(stays) == QueuedTask("a", "inotify")
    assert [t.task_id for t in work.snapshot()] == ["a", "c"]


def test_take_times_out_and_wake_all_stops_waiters() -> None:
    work = WorkQueue()
    started = time.monotonic()
    assert work.take(object(), 0.05) is None
    assert 0.04 <= time.monotonic() - started < 2
    stop = threading.Event()
    result: list[QueuedTask | None] = []
    waiter = threading.Thread(target=lambda: result.append(work.take(object(), 30, stop.is_set)))
    waiter.start()
    time.sleep(0.05)
    stop.set()
    work.wake_all()
    waiter.join(2)
    assert not waiter.is_alive() and result == [None]


def test_a_blocked_taker_gets_each_put_in_order() -> None:
    """The hand-off's speed is measured in benchmarks/handoff.py; here, that each blocked take wakes with its id."""
    work = WorkQueue()
    for i in range(20):
        taken: list[object] = []
        taker = threading.Thread(target=lambda out=taken: out.append(work.take("consumer", 5)))
        taker.start()
        time.sleep(0.002)  # most often it is blocked by now; either way it must get the id
        work.put(f"t{i}", "inotify")
        taker.join(5)
        assert not taker.is_alive()
        assert [getattr(item, "task_id", None) for item in taken] == [f"t{i}"]
        work.ack("consumer")


# -- authkey ----------------------------------------------------------------------------------


def test_authkey_is_created_once_private_and_shared(run_dir: Path) -> None:
    folder = run_dir / "fresh"
    keys: list[bytes] = []
    threads = [threading.Thread(target=lambda: keys.append(load_authkey(folder))) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(5)
    assert len(keys) == 8 and len(set(keys)) == 1 and len(keys[0]) == AUTHKEY_BYTES
    assert stat.S_IMODE(os.stat(folder / "queue.key").st_mode) == 0o600
    assert sorted(p.name for p in folder.iterdir()) == ["queue.key"]  # no temp files left


def test_corrupt_authkey_is_a_one_line_error(run_dir: Path) -> None:
    (run_dir / "queue.key").write_bytes(b"short")
    with pytest.raises(QueueError, match="corrupt") as caught:
        load_authkey(run_dir)
    assert "\n" not in str(caught.value)


# -- server and client ------------------------------------------------------------------------


def test_get_over_the_socket_is_fifo_with_sources(serve: Callable[..., Any], client: QueueClient) -> None:
    work, _ = serve()
    work.put("a", "inotify")
    work.put("b", "rescan")
    assert client.get(1) == QueuedTask("a", "inotify")
    assert client.get(1) == QueuedTask("b", "rescan")
    started = time.monotonic()
    assert client.get(0.1) is None
    assert 0.08 <= time.monotonic() - started < 3


def test_next_get_acknowledges_the_previous_item(serve: Callable[..., Any], client: QueueClient) -> None:
    work, _ = serve()
    work.put("a", "inotify")
    assert client.get(1) == QueuedTask("a", "inotify")
    assert "a" in work and work.in_flight == 1
    assert client.get(0.01) is None
    assert "a" not in work and work.in_flight == 0


def test_a_consumer_that_goes_away_gives_its_item_back_at_the_front(
    serve: Callable[..., Any], run_dir: Path, client: QueueClient
) -> None:
    work, _ = serve(WorkQueue(still_pending=lambda task_id: True))
    work.put("a", "inotify")
    work.put("b", "inotify")
    first = QueueClient(socket_path(run_dir), load_authkey(run_dir))
    assert first.get(1) == QueuedTask("a", "inotify")
    first.close()
    wait_for(lambda: work.in_flight == 0 and len(work) == 2, timeout=5, what="requeue after disconnect")
    assert client.get(1) == QueuedTask("a", "inotify")


def test_a_blocked_get_over_the_socket_wakes_on_each_put(serve: Callable[..., Any], client: QueueClient) -> None:
    work, _ = serve()
    assert client.get(0) is None  # connect first
    for i in range(10):
        got: list[object] = []
        getter = threading.Thread(target=lambda out=got: out.append(client.get(5)))
        getter.start()
        time.sleep(0.003)  # most often it is blocked by now; either way it must get the id
        work.put(f"t{i}", "inotify")
        getter.join(6)
        assert not getter.is_alive()
        assert got == [QueuedTask(f"t{i}", "inotify")]


def test_the_stop_flag_ends_a_blocked_get_at_once_and_loses_nothing(
    serve: Callable[..., Any], client: QueueClient
) -> None:
    from activation.lifecycle import StopFlag

    work, _ = serve(WorkQueue(still_pending=lambda task_id: True))
    stop = StopFlag()
    got: list[object] = []
    getter = threading.Thread(target=lambda: got.append(client.get(60, interrupt=stop)))
    getter.start()
    wait_for(lambda: work._ready._waiters, timeout=5, what="the get blocked in the listener")  # type: ignore[attr-defined]
    stop.set()  # what SIGTERM's handler does
    getter.join(30)  # far below the get's 60 s: it was the flag that ended it
    assert not getter.is_alive() and got == [None]
    # Whatever the listener hands the dropped get (its server thread may still be waiting) goes
    # back at once: the next consumer gets it.
    work.put("a", "inotify")
    second = QueueClient(client.path, client._authkey)
    try:
        assert wait_for(lambda: second.get(1), timeout=10, what="the id, for the next consumer") == QueuedTask(
            "a", "inotify"
        )
    finally:
        second.close()
        stop.close()
    # Set before the call, it does not even ask.
    stop = StopFlag()
    stop.set()
    work.put("b", "inotify")
    assert client.get(60, interrupt=stop) is None and "b" in work
    stop.close()


def test_client_reconnects_to_a_restarted_server(serve: Callable[..., Any], client: QueueClient) -> None:
    work, server = serve()
    work.put("a", "inotify")
    assert client.get(1) == QueuedTask("a", "inotify")
    server.stop()
    with pytest.raises(QueueError):
        client.get(0.1)
    work2, _ = serve()
    work2.put("b", "rescan")
    assert client.get(1) == QueuedTask("b", "rescan")


def test_a_kept_connection_survives_a_server_restart_between_calls(
    serve: Callable[..., Any], client: QueueClient
) -> None:
    _, server = serve()
    assert client.get(0) is None
    server.stop()
    work2, _ = serve()
    work2.put("b", "inotify")
    assert client.get(1) == QueuedTask("b", "inotify")  # the stale connection is retried once


def test_no_server_is_a_one_line_queue_error(client: QueueClient) -> None:
    with pytest.raises(QueueError, match="cannot reach") as caught:
        client.get(0.1)
    assert "\n" not in str(caught.value)
    with pytest.raises(QueueError):
        client.stats()


def test_stale_socket_file_is_replaced(serve: Callable[..., Any], run_dir: Path, client: QueueClient) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(socket_path(run_dir)))
    stale.close()  # what SIGKILL leaves behind: a socket file nobody listens on
    assert socket_path(run_dir).exists()
    work, _ = serve()
    work.put("a", "inotify")
    assert client.get(1) == QueuedTask("a", "inotify")


def test_a_live_server_is_not_replaced(serve: Callable[..., Any], run_dir: Path) -> None:
    serve()
    second = QueueServer(socket_path(run_dir), load_authkey(run_dir), WorkQueue(), lambda: {})
    with pytest.raises(QueueError, match="already serving"):
        second.start()


def test_socket_is_private_and_removed_on_stop(serve: Callable[..., Any], run_dir: Path) -> None:
    _, server = serve()
    info = os.lstat(socket_path(run_dir))
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    server.stop()
    assert not socket_path(run_dir).exists()
    assert [p.name for p in run_dir.iterdir()] == ["queue.key"]


def test_wrong_authkey_is_rejected_and_the_server_keeps_serving(
    serve: Callable[..., Any], run_dir: Path, client: QueueClient
) -> None:
    work, _ = serve()
    work.put("a", "inotify")
    intruder = QueueClient(socket_path(run_dir), b"x" * AUTHKEY_BYTES)
    with pytest.raises(QueueError, match="rejected") as caught:
        intruder.get(0.1)
    assert "\n" not in str(caught.value)
    intruder.close()
    assert client.get(1) == QueuedTask("a", "inotify")


def test_garbage_and_silent_connections_do_not_stop_the_server(
    serve: Callable[..., Any], run_dir: Path, client: QueueClient
) -> None:
    work, server = serve()
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(str(socket_path(run_dir)))  # never answers the challenge
    junk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    junk.connect(str(socket_path(run_dir)))
    junk.sendall(b"\x00\x00\x00\x05hello")
    junk.close()
    work.put("a", "inotify")
    assert client.get(1) == QueuedTask("a", "inotify")
    server.stop()  # must not hang on the silent connection's handshake
    silent.close()


def test_stats_include_the_queue_and_the_callers_fields(serve: Callable[..., Any], client: QueueClient) -> None:
    work, _ = serve(stats=lambda: {"observer_alive": True, "rescans": 3})
    work.put("a", "inotify")
    work.put("b", "inotify")
    assert client.get(1) is not None
    stats = client.stats()
    assert stats["queue_size"] == 1 and stats["in_flight"] == 1
    assert stats["observer_alive"] is True and stats["rescans"] == 3


def test_failing_stats_are_an_error_not_a_dead_server(serve: Callable[..., Any], client: QueueClient) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")

    work, _ = serve(stats=broken)
    with pytest.raises(QueueError, match="boom"):
        client.stats()
    work.put("a", "inotify")
    assert client.get(1) == QueuedTask("a", "inotify")


def test_socket_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    deep.mkdir()
    server = QueueServer(socket_path(deep), b"k" * AUTHKEY_BYTES, WorkQueue(), lambda: {})
    with pytest.raises(QueueError, match="ACTIVATION_RUN_DIR"):
        server.start()


def test_a_server_that_never_answers_is_a_queue_error_not_a_hang(
    run_dir: Path, client: QueueClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("activation.worker.queue.HANDSHAKE_TIMEOUT", 0.2)
    wedged = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    wedged.bind(str(socket_path(run_dir)))
    wedged.listen(1)  # connections queue up, nobody accepts: a stopped or wedged listener
    try:
        started = time.monotonic()
        with pytest.raises(QueueError, match="did not answer"):
            client.get(0.1)
        assert time.monotonic() - started < 3
    finally:
        wedged.close()


def test_the_wire_answers_a_request_it_does_not_know_with_a_refusal(serve: Callable[..., Any], run_dir: Path) -> None:
    """Only the typed messages are understood; anything else (an old client's tuple) is refused, not fatal."""
    from multiprocessing.connection import Client

    from activation.worker.queue import Empty, Get, Refused

    work, _ = serve()
    conn = Client(str(socket_path(run_dir)), family="AF_UNIX", authkey=load_authkey(run_dir))
    try:
        for request in (("get", 0.1), "stats", 42, None):
            conn.send(request)
            reply = conn.recv()
            assert isinstance(reply, Refused) and reply.reason.startswith("unknown request"), reply
        conn.send(Get(0.0))  # the connection survived every refusal
        assert isinstance(conn.recv(), Empty)
    finally:
        conn.close()
    assert len(work) == 0
