"""LogShipper (worker/log_ship.py): what of a growing log file goes to Redis, and when."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from activation.errors import StreamsError
from activation.worker import log_ship
from activation.worker.log_ship import LIMIT_TEXT, SHIP_INTERVAL, LogShipper


class Stub:
    """The one StreamsTransport method the shipper calls; ``down`` makes it fail as Redis away does."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, int, list[str]]] = []
        self.down = False

    def append_log(self, task_id: str, attempt: int, texts: Any, *, ttl: int, cap: int) -> None:
        if self.down:
            raise StreamsError("connection refused")
        self.sent.append((task_id, attempt, list(texts)))

    def text(self) -> str:
        return "".join("".join(texts) for _t, _a, texts in self.sent)


@pytest.fixture
def clock() -> list[float]:
    return [100.0]


def shipper(path: Path, stub: Stub, clock: list[float]) -> LogShipper:
    return LogShipper(lambda: stub, path, "t-1", 2, clock=lambda: clock[0])  # type: ignore[arg-type,return-value]


def test_whole_lines_go_while_it_runs_and_the_rest_at_the_end(tmp_path, clock):
    path, stub = tmp_path / "t-1.log", Stub()
    ship = shipper(path, stub, clock)
    ship.ship()  # no log yet: nothing, no error
    path.write_bytes(b"one\ntw")
    clock[0] += SHIP_INTERVAL
    ship.ship()
    assert stub.text() == "one\n" and stub.sent[0][:2] == ("t-1", 2)
    with open(path, "ab") as f:
        f.write(b"o\n")
    ship.ship()  # within the interval: no look
    assert stub.text() == "one\n"
    clock[0] += SHIP_INTERVAL
    with open(path, "ab") as f:
        f.write(b"three")
    ship.ship()
    assert stub.text() == "one\ntwo\n"
    ship.ship(final=True)
    assert stub.text() == "one\ntwo\nthree"


def test_what_failed_to_go_goes_at_the_next_look_once(tmp_path, clock):
    path, stub = tmp_path / "t-1.log", Stub()
    ship = shipper(path, stub, clock)
    path.write_bytes(b"a\n")
    stub.down = True
    ship.ship()
    stub.down = False
    clock[0] += SHIP_INTERVAL
    ship.ship()
    ship.ship(final=True)
    assert stub.text() == "a\n"


def test_bytes_that_are_no_utf8_arrive_as_replacement_characters(tmp_path, clock):
    path, stub = tmp_path / "t-1.log", Stub()
    path.write_bytes(b"ok \xff\xfe\n")
    shipper(path, stub, clock).ship(final=True)
    assert stub.text() == "ok \ufffd\ufffd\n"


def test_a_flood_stops_at_the_limit_with_one_marker(tmp_path, clock, monkeypatch):
    monkeypatch.setattr(log_ship, "SHIP_LIMIT", 1000)
    path, stub = tmp_path / "t-1.log", Stub()
    path.write_bytes(b"x" * 99 + b"\n" + b"y" * 5000)
    ship = shipper(path, stub, clock)
    ship.ship(final=True)
    ship.ship(final=True)
    text = stub.text()
    assert text.endswith(LIMIT_TEXT % 1000) and text.count("[activation:") == 1
    assert len(text) - len(LIMIT_TEXT % 1000) == 1000
