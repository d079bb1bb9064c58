"""The admin API's accepting thread (orchestrator/http.py): asleep while idle, awake to cut a
connection past its deadline, and stopped at once from wherever it waits."""

from __future__ import annotations

import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from activation.orchestrator.http import AdminApi

pytestmark = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="reads /proc/self/task")


class Service:
    """The routes' service, answering /config only."""

    def get_config(self) -> dict[str, Any]:
        return {"mode": "files"}

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(name)


def switches(thread: threading.Thread) -> int:
    """How many times ``thread`` went to sleep and was woken (the kernel's count)."""
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return int(status.split("voluntary_ctxt_switches:")[1].split()[0])


def accepting_thread() -> threading.Thread:
    return next(t for t in threading.enumerate() if t.name == "admin-api")


@pytest.fixture
def api() -> Any:
    server = AdminApi(Service(), host="127.0.0.1", port=0, token=None, request_timeout=0.5)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.stop()


def get_config(api: AdminApi) -> int:
    with urllib.request.urlopen(f"{api.url}/config", timeout=5) as answer:
        return int(answer.status)


def test_an_idle_api_never_wakes_its_accepting_thread(api: AdminApi) -> None:
    assert get_config(api) == 200  # one request served; its connection is closed after it
    thread = accepting_thread()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the last wake-ups after that request: it settles
        before = switches(thread)
        time.sleep(1.0)
        if switches(thread) == before:
            break
    else:
        pytest.fail("the accepting thread of an idle API kept waking up")
    assert get_config(api) == 200, "asleep, it still accepts at once"


def test_while_a_connection_is_open_it_wakes_to_cut_it_at_its_deadline(api: AdminApi) -> None:
    host, port = api.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as conn:
        conn.sendall(b"GET /config HTTP/1.1\r\n")  # headers never end: a slow client
        conn.settimeout(10)
        assert conn.recv(4096) == b"", "cut at the 0.5 s deadline, with no other connection to wake it"


def test_stop_ends_the_accepting_thread_from_its_sleep() -> None:
    server = AdminApi(Service(), host="127.0.0.1", port=0, token=None)  # type: ignore[arg-type]
    server.start()
    thread = accepting_thread()
    server.stop()
    assert not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", server.port), timeout=2).close()
