"""The admin API's request pool: threads kept for the next connection, never more than needed,
all joined on close, and a failed thread start leaves nothing queued."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from activation.orchestrator.request_pool import RequestPool
from tests.conftest import wait_for


def test_sequential_connections_are_served_by_one_kept_thread() -> None:
    served: list[tuple[str, str]] = []
    done = threading.Semaphore(0)

    def serve(request: Any, address: Any) -> None:
        served.append((request, threading.current_thread().name))
        done.release()

    pool = RequestPool(serve, name="t")
    for n in range(20):
        pool.submit(f"r{n}", None)
        assert done.acquire(timeout=10)
        wait_for(lambda: pool._spare == 1, 5, 0.001, "the thread back to waiting")
    pool.close()
    assert [r for r, _ in served] == [f"r{n}" for n in range(20)]
    assert {name for _, name in served} == {"t-0"}


def test_concurrent_connections_get_a_thread_each_and_close_joins_them() -> None:
    release = threading.Event()
    started = threading.Semaphore(0)

    def serve(request: Any, address: Any) -> None:
        started.release()
        release.wait(10)

    pool = RequestPool(serve, name="t")
    before = threading.active_count()
    for n in range(5):
        pool.submit(n, None)
    for _ in range(5):
        assert started.acquire(timeout=10)  # all five at once: none waits behind another
    assert pool.size == 5
    release.set()
    pool.close()
    assert threading.active_count() == before  # none of the five is left
    assert pool.size == 0


def test_a_thread_that_cannot_start_queues_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[Any] = []
    pool = RequestPool(lambda request, address: served.append(request), name="t")

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    with monkeypatch.context() as patch:
        patch.setattr(threading.Thread, "start", refuse)
        with pytest.raises(RuntimeError):
            pool.submit("lost?", None)
    pool.submit("next", None)
    wait_for(lambda: served, 5, 0.01, "the next connection served")
    pool.close()
    assert served == ["next"]  # the refused one was not left in the queue for a later thread


def test_threads_idle_past_their_time_end_and_a_later_connection_starts_one() -> None:
    served: list[Any] = []
    pool = RequestPool(lambda request, address: served.append(request), name="t", idle_seconds=0.2)
    before = threading.active_count()
    pool.submit("first", None)
    wait_for(lambda: pool.size == 0, 10, 0.02, "the idle thread to end")
    assert threading.active_count() == before
    pool.submit("second", None)
    wait_for(lambda: served == ["first", "second"], 10, 0.01, "the second connection served")
    pool.close()
    assert threading.active_count() == before


def test_request_threads_are_not_daemons_even_when_a_daemon_accepts() -> None:
    # The admin API's accepting thread is a daemon; a daemon request thread would be cut off at
    # exit mid-answer instead of being joined by close().
    daemons: list[bool] = []
    pool = RequestPool(lambda request, address: daemons.append(threading.current_thread().daemon), name="t")
    accepting = threading.Thread(target=pool.submit, args=("r", None), daemon=True)
    accepting.start()
    accepting.join(10)
    wait_for(lambda: daemons, 5, 0.01, "the connection served")
    pool.close()
    assert daemons == [False]
