"""The admin API under abuse, over real sockets against the real orchestrator under supervisord.

Slow clients (slowloris: headers or a body dribbled byte by byte) are cut at the request
deadline; the connection threads are bounded; the API stops within its stopwaitsecs while slow
clients hold every slot.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from tests.conftest import wait_for
from tests.harness import WorkerTree, new_orchestrator

REQUEST_TIMEOUT = 2.0
MAX_CONNECTIONS = 4
BOUND = 20.0  # how long a test waits for the cut: the deadline plus a shared machine's slack


@pytest.fixture
def orchestrator(tmp_path: Path) -> Iterator[WorkerTree]:
    tree = new_orchestrator(
        tmp_path,
        ACTIVATION_ADMIN_REQUEST_TIMEOUT=str(REQUEST_TIMEOUT),
        ACTIVATION_ADMIN_MAX_CONNECTIONS=str(MAX_CONNECTIONS),
    )
    try:
        tree.start()
        wait_for(lambda: get_config(tree) == 200, 20, 0.1, "the admin API to answer")
        yield tree
    finally:
        tree.kill_everything()


def address(tree: WorkerTree) -> tuple[str, int]:
    host, _, port = tree.env["ACTIVATION_ADMIN_BIND"].rpartition(":")
    return host, int(port)


def get_config(tree: WorkerTree) -> int:
    host, port = address(tree)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/config", timeout=5) as answer:
            json.load(answer)
            return int(answer.status)
    except OSError:
        return 0


def turned_away(tree: WorkerTree) -> bool:
    """Whether a new connection gets the 503 at once: every slot is taken (slots are taken in
    accept order, so the connections made before this one hold them)."""
    conn = connect(tree)
    try:
        conn.settimeout(1)
        return conn.recv(4096).startswith(b"HTTP/1.0 503 ")
    except TimeoutError:
        return False  # it got a slot; closing it frees the slot again
    finally:
        conn.close()


def connect(tree: WorkerTree) -> socket.socket:
    conn = socket.create_connection(address(tree), timeout=5)
    conn.settimeout(0.05)
    return conn


def closed_by_server(conn: socket.socket) -> bool:
    """Whether the server has closed ``conn``: EOF, a reset, or an answer followed by EOF."""
    try:
        while True:
            data = conn.recv(65536)
            if not data:
                return True
    except TimeoutError:
        return False
    except OSError:
        return True


def dribble(conn: socket.socket, data: bytes, *, bound: float, stop: threading.Event | None = None) -> bool:
    """Send ``data`` one byte at a time, 0.1 s apart (no recv ever times out on the server),
    until the server closes the connection; False if it still has not after ``bound`` seconds."""
    deadline = time.monotonic() + bound
    index = 0
    while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
        try:
            conn.send(data[index % len(data) : index % len(data) + 1])
        except OSError:
            return True
        index += 1
        if closed_by_server(conn):
            return True
        time.sleep(0.05)
    return False


def test_slowloris_headers_are_cut_at_the_request_deadline(orchestrator: WorkerTree) -> None:
    conn = connect(orchestrator)
    try:
        conn.sendall(b"GET /config HTTP/1.1\r\nHost: x\r\n")
        assert dribble(conn, b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n", bound=BOUND)
    finally:
        conn.close()
    assert get_config(orchestrator) == 200


def test_a_body_dribbled_byte_by_byte_is_cut_at_the_request_deadline(orchestrator: WorkerTree) -> None:
    conn = connect(orchestrator)
    try:
        conn.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
        assert dribble(conn, b"{", bound=BOUND)
    finally:
        conn.close()
    assert get_config(orchestrator) == 200


def test_connection_threads_are_bounded_and_the_rest_get_503(orchestrator: WorkerTree) -> None:
    process = psutil.Process(orchestrator.pid("orchestrator"))
    idle_threads = process.num_threads()
    held = [connect(orchestrator) for _ in range(MAX_CONNECTIONS)]
    extra = []
    try:
        for conn in held:
            conn.sendall(b"GET /config HTTP/1.1\r\n")  # and nothing more: each holds a slot
        wait_for(lambda: turned_away(orchestrator), 10, what="every slot taken")
        answers = []
        for _ in range(3 * MAX_CONNECTIONS):
            conn = connect(orchestrator)
            extra.append(conn)
            conn.settimeout(5)
            answers.append(conn.recv(4096))
        assert all(answer.startswith(b"HTTP/1.0 503 ") for answer in answers), answers
        assert process.num_threads() <= idle_threads + MAX_CONNECTIONS
        # The held ones are cut at their deadline; then the API serves again, from the threads it kept.
        wait_for(lambda: all(closed_by_server(conn) for conn in held), BOUND, 0.1, "the held connections cut")
        wait_for(lambda: get_config(orchestrator) == 200, BOUND, 0.1, "the API to serve again")
        assert [get_config(orchestrator) for _ in range(3 * MAX_CONNECTIONS)] == [200] * (3 * MAX_CONNECTIONS)
        assert process.num_threads() <= idle_threads + MAX_CONNECTIONS
    finally:
        for conn in held + extra:
            conn.close()


def test_it_stops_within_stopwaitsecs_while_slow_clients_hold_every_slot(tmp_path: Path) -> None:
    # The clients dribble, so no single recv ever times out, and the request deadline is far
    # longer than stopwaitsecs (15 s): only the stop itself may end them.
    tree = new_orchestrator(
        tmp_path, ACTIVATION_ADMIN_REQUEST_TIMEOUT="600", ACTIVATION_ADMIN_MAX_CONNECTIONS=str(MAX_CONNECTIONS)
    )
    held: list[socket.socket] = []
    done = threading.Event()
    cut: list[bool] = []

    def slow_client(conn: socket.socket) -> None:
        cut.append(dribble(conn, b"{", bound=120, stop=done))

    dribblers = []
    try:
        tree.start()
        wait_for(lambda: get_config(tree) == 200, 20, 0.1, "the admin API to answer")
        for _ in range(MAX_CONNECTIONS):
            conn = connect(tree)
            conn.sendall(b"POST /tasks HTTP/1.1\r\nContent-Length: 100000\r\n\r\n")
            held.append(conn)
            dribblers.append(threading.Thread(target=slow_client, args=(conn,)))
            dribblers[-1].start()
        wait_for(lambda: turned_away(tree), 10, what="every slot taken")
        assert tree.stop(timeout=60) == 0
        log = tree.log.read_text(errors="replace")
        assert "stopped: orchestrator (exit status 0)" in log, log[-2000:]
        for thread in dribblers:
            thread.join(10)
        assert cut == [True] * MAX_CONNECTIONS
    finally:
        done.set()
        for thread in dribblers:
            thread.join(10)
        for conn in held:
            conn.close()
        tree.kill_everything()
