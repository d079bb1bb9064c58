"""Wake sources: one contract for every source, then what only inotify has to get right."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from activation.config import Settings
from activation.spool.atomic import atomic_write_json
from activation.spool.layout import Spool
from activation.worker.wake import build_sources, inotify
from activation.worker.wake.base import StubSource, WakeSource
from activation.worker.wake.inotify import InotifySource
from activation.worker.wake.messages import vet_message
from activation.worker.wake.poll import PollSource
from activation.worker.wake.redis import RedisSource
from tests.conftest import WORKER, wait_for


class Recorder:
    """A notify callback that remembers every call; optionally fails on chosen names."""

    def __init__(self, fail_on: set[str] | None = None) -> None:
        self.calls: list[tuple[str, str, bool]] = []
        self.fail_on = fail_on or set()
        self._lock = threading.Lock()

    def __call__(self, name: str, source: str, /, *, complete: bool = False) -> None:
        with self._lock:
            self.calls.append((name, source, complete))
        if name in self.fail_on:
            raise RuntimeError(f"notify failed on {name}")

    def names(self) -> list[str]:
        with self._lock:
            return [name for name, _, _ in self.calls]

    def seen(self, name: str) -> bool:
        return name in self.names()


def write_task(spool: Spool, task_id: str) -> Path:
    """An atomic write, as the orchestrator does it: temp file, then rename into the inbox."""
    path = spool.task_path(WORKER, task_id)
    atomic_write_json(path, {"task_id": task_id, "description": "do it"}, durable=False)
    return path


@pytest.fixture
def make_source(spool: Spool) -> Iterator[Callable[[str], WakeSource]]:
    made: list[WakeSource] = []

    def make(kind: str) -> WakeSource:
        source: WakeSource
        if kind == "inotify":
            source = InotifySource(spool.inbox(WORKER))
        elif kind == "poll":
            source = PollSource(spool, WORKER, interval=0.02)
        else:
            source = StubSource()
        made.append(source)
        return source

    yield make
    for source in made:
        source.stop()


@pytest.mark.parametrize("kind", ["inotify", "poll", "stub"])
def test_every_source_keeps_the_contract(kind: str, make_source: Callable[[str], WakeSource], spool: Spool) -> None:
    threads_before = set(threading.enumerate())
    source = make_source(kind)
    recorder = Recorder()
    assert not source.alive()
    source.start(recorder)
    assert source.alive()
    write_task(spool, "t1")
    if isinstance(source, StubSource):
        source.fire("t1.json")
    wait_for(lambda: recorder.seen("t1.json"), timeout=5, what=f"{kind} to notify t1.json")
    assert all(src == source.name for _, src, _ in recorder.calls)
    source.stop()
    assert not source.alive()
    assert [t for t in threading.enumerate() if t not in threads_before and t.is_alive()] == []
    # A source can be started again after a stop (the listener restarts dead ones).
    source.start(recorder)
    assert source.alive()
    write_task(spool, "t2")
    if isinstance(source, StubSource):
        source.fire("t2.json")
    wait_for(lambda: recorder.seen("t2.json"), timeout=5, what=f"{kind} to notify t2.json after a restart")
    source.stop()


def test_inotify_reports_atomic_writes_as_complete(make_source: Callable[[str], WakeSource], spool: Spool) -> None:
    source = make_source("inotify")
    recorder = Recorder()
    source.start(recorder)
    write_task(spool, "t1")
    wait_for(lambda: recorder.seen("t1.json"), timeout=5)
    assert ("t1.json", "inotify", True) in recorder.calls


def test_inotify_waits_for_the_close_of_a_plain_write(make_source: Callable[[str], WakeSource], spool: Spool) -> None:
    source = make_source("inotify")
    recorder = Recorder()
    source.start(recorder)
    path = spool.task_path(WORKER, "plain")
    with open(path, "w") as handle:  # created, empty: must not be reported
        write_task(spool, "marker1")  # a later event proves the watcher already ran past the create
        wait_for(lambda: recorder.seen("marker1.json"), timeout=5)
        assert not recorder.seen("plain.json")
        handle.write('{"task_id": "plain", ')
        handle.flush()
        write_task(spool, "marker2")
        wait_for(lambda: recorder.seen("marker2.json"), timeout=5)
        assert not recorder.seen("plain.json")  # half written, still open
        handle.write('"description": "x"}')
    wait_for(lambda: recorder.seen("plain.json"), timeout=5, what="the close after write")
    assert ("plain.json", "inotify", True) in recorder.calls


def test_inotify_sees_renames_from_other_folders(make_source: Callable[[str], WakeSource], spool: Spool) -> None:
    source = make_source("inotify")
    recorder = Recorder()
    source.start(recorder)
    claim = spool.claim_path(WORKER, "back")
    atomic_write_json(claim, {"task_id": "back", "description": "x"}, durable=False)
    spool.requeue(WORKER, "back")  # .processing/ -> inbox, as the executor puts a task back
    wait_for(lambda: recorder.seen("back.json"), timeout=5)


def test_a_claim_does_not_delay_the_next_event(make_source: Callable[[str], WakeSource], spool: Spool) -> None:
    """watchdog holds an unpaired IN_MOVED_FROM for 0.5 s and everything queued behind it."""
    source = make_source("inotify")
    recorder = Recorder()
    source.start(recorder)
    for i in range(3):
        write_task(spool, f"c{i}")
        wait_for(lambda i=i: recorder.seen(f"c{i}.json"), timeout=5)
        assert spool.claim(WORKER, f"c{i}") is not None  # renamed out into the unwatched .processing/
        started = time.monotonic()
        write_task(spool, f"n{i}")
        wait_for(lambda i=i: recorder.seen(f"n{i}.json"), timeout=5, interval=0.002)
        assert time.monotonic() - started < 0.25


def test_a_failing_notify_does_not_kill_the_reader(
    make_source: Callable[[str], WakeSource], spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    source = make_source("inotify")
    recorder = Recorder(fail_on={"bad.json"})
    source.start(recorder)
    write_task(spool, "bad")
    wait_for(lambda: recorder.seen("bad.json"), timeout=5)
    write_task(spool, "good")
    wait_for(lambda: recorder.seen("good.json"), timeout=5, what="an event after the failure")
    assert source.alive()
    assert any("handler failed" in r.getMessage() for r in caplog.records)


def test_inotify_dies_visibly_when_its_inbox_is_removed(make_source: Callable[[str], WakeSource], spool: Spool) -> None:
    source = make_source("inotify")
    source.start(Recorder())
    os.rmdir(spool.processing(WORKER))
    os.rmdir(spool.inbox(WORKER))
    wait_for(lambda: not source.alive(), timeout=5, what="alive() to flip after the inbox vanished")


def test_events_are_parsed_from_the_kernel_struct() -> None:
    def event(mask: int, name: bytes = b"", wd: int = 1) -> bytes:
        padded = name + b"\0" * (16 - len(name) % 16) if name else b""  # NUL-padded, as the kernel does
        return inotify.EVENT_HEADER.pack(wd, mask, 0, len(padded)) + padded

    buffer = (
        event(inotify.IN_MOVED_TO, b"a.json")
        + event(inotify.IN_Q_OVERFLOW, wd=-1)
        + event(inotify.IN_CLOSE_WRITE, "é.json".encode())
    )
    assert list(inotify.parse_events(buffer)) == [
        (inotify.IN_MOVED_TO, "a.json"),
        (inotify.IN_Q_OVERFLOW, ""),
        (inotify.IN_CLOSE_WRITE, "é.json"),
    ]
    assert list(inotify.parse_events(buffer[:5])) == []  # a cut header is not an event


def test_an_inbox_the_kernel_cannot_watch_is_a_one_line_error(spool: Spool, tmp_path: Path) -> None:
    source = InotifySource(tmp_path / "missing")
    with pytest.raises(inotify.InotifyError, match=r"inotify_add_watch on .*missing: No such file or directory"):
        source.start(Recorder())
    assert not source.alive()
    plain_file = tmp_path / "file"
    plain_file.write_text("")
    with pytest.raises(inotify.InotifyError, match="Not a directory"):  # IN_ONLYDIR
        InotifySource(plain_file).start(Recorder())


@pytest.mark.parametrize(
    ("code", "sysctl"),
    [(errno.ENOSPC, "fs.inotify.max_user_watches"), (errno.EMFILE, "fs.inotify.max_user_instances")],
)
def test_an_exhausted_inotify_limit_names_the_sysctl_to_raise(code: int, sysctl: str, tmp_path: Path) -> None:
    ctypes.set_errno(code)  # what libc leaves behind when the kernel refuses the watch or the instance
    error = inotify._failed("inotify_add_watch", tmp_path)
    assert error.errno == code
    assert str(error).endswith(f"{os.strerror(code)} ({sysctl} reached)")


def test_the_reader_is_one_thread_that_sleeps_between_events(spool: Spool) -> None:
    threads_before = set(threading.enumerate())
    source = InotifySource(spool.inbox(WORKER))
    recorder = Recorder()
    source.start(recorder)
    try:
        (reader,) = [t for t in threading.enumerate() if t not in threads_before]
        assert reader.name == "inotify-reader"
        write_task(spool, "w")
        wait_for(lambda: recorder.seen("w.json"), timeout=5)
        switches = _context_switches(reader)
        time.sleep(0.3)
        assert _context_switches(reader) == switches  # asleep in poll(), no timer
    finally:
        source.stop()


def _context_switches(thread: threading.Thread) -> int:
    status = Path(f"/proc/self/task/{thread.native_id}/status").read_text()
    return sum(int(line.split()[1]) for line in status.splitlines() if "ctxt_switches:" in line)


def test_a_failing_overflow_hook_does_not_kill_the_reader(spool: Spool, caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> None:
        raise RuntimeError("hook broke")

    source = InotifySource(spool.inbox(WORKER), on_overflow=broken)
    recorder = Recorder()
    overflow = inotify.EVENT_HEADER.pack(-1, inotify.IN_Q_OVERFLOW, 0, 0)
    assert source._dispatch(overflow, recorder) is True
    assert any("overflow hook failed" in r.getMessage() for r in caplog.records)


def test_a_real_inotify_overflow_is_reported(spool: Spool) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 100_000:
        pytest.skip(f"max_queued_events is {limit}: too many renames for a unit test")
    overflows = threading.Event()
    release = threading.Event()
    source = InotifySource(spool.inbox(WORKER), on_overflow=overflows.set)
    recorder = Recorder()

    def notify(name: str, source_name: str, /, *, complete: bool = False) -> None:
        recorder(name, source_name, complete=complete)
        if name == "block.json":
            release.wait(60)  # the reader thread is held here: the kernel's queue fills behind it

    source.start(notify)
    inbox = spool.inbox(WORKER)
    ping, pong = inbox / ".ping", inbox / ".pong"
    ping.write_bytes(b"")
    try:
        write_task(spool, "block")
        wait_for(lambda: recorder.seen("block.json"), timeout=10)
        # Each rename queues one event (IN_MOVED_TO; IN_MOVED_FROM is not subscribed): the queue's worth and more.
        for _ in range(limit // 2 + 200):
            os.rename(ping, pong)
            os.rename(pong, ping)
        release.set()
        assert overflows.wait(90), "the overflow was not reported"
        assert source.alive()
        write_task(spool, "after")
        wait_for(lambda: recorder.seen("after.json"), timeout=20, what="events after an overflow")
    finally:
        release.set()
        source.stop()


def test_poll_notifies_oldest_first(make_source: Callable[[str], WakeSource], spool: Spool) -> None:
    for i, task_id in enumerate(["c", "a", "b"]):
        path = write_task(spool, task_id)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    recorder = Recorder()
    source = make_source("poll")
    source.start(recorder)
    wait_for(lambda: len(recorder.calls) >= 3, timeout=5)
    assert recorder.names()[:3] == ["c.json", "a.json", "b.json"]


def test_stub_fires_synchronously_and_refuses_when_stopped() -> None:
    stub = StubSource("redis")
    recorder = Recorder()
    stub.start(recorder)
    stub.fire("x.json", complete=True)
    assert recorder.calls == [("x.json", "redis", True)]
    stub.die()
    assert not stub.alive()
    with pytest.raises(RuntimeError):
        stub.fire("y.json")


@pytest.mark.parametrize(
    ("ref", "expected"),
    [
        ("abc", "abc.json"),
        ("abc.json", "abc.json"),
        ("{inbox}/abc.json", "abc.json"),
        ("{inbox}/../w1/abc.json", None),  # no honest publisher writes ".."
        ("{inbox}/../other/abc.json", None),
        ("{inbox}/.processing/abc.json", None),
        ("/etc/passwd", None),
        ("tasks/w1/abc.json", None),
        ("../../etc/x", None),
        (".tmp_abc.json", None),
        ("a b", None),
        ("", None),
    ],
)
def test_vet_message_accepts_ids_and_paths_inside_the_inbox_only(ref: str, expected: str | None, spool: Spool) -> None:
    name, reason = vet_message(ref.format(inbox=spool.inbox(WORKER)).encode(), spool.inbox(WORKER))
    assert name == expected
    assert (reason is None) == (expected is not None)


def test_build_sources_follows_the_mode(
    make_settings: Callable[..., Settings], spool: Spool, caplog: pytest.LogCaptureFixture
) -> None:
    def kinds(*mode: str, **overrides: object) -> list[type[WakeSource]]:
        settings = make_settings(mode=mode, **overrides)
        return [type(s) for s in build_sources(settings, spool, lambda reason: None)]

    assert kinds("inotify") == [InotifySource]
    assert kinds("poll") == [PollSource]
    url = "redis://127.0.0.1:1/0"
    assert kinds("inotify", "redis", redis_url=url) == [InotifySource, RedisSource]
    assert kinds("redis", "poll", redis_url=url) == [RedisSource, PollSource]
    assert kinds("redis", redis_url=url) == [RedisSource, PollSource]  # polling is redis' safety net
    with caplog.at_level(logging.WARNING, logger="activation.listener"):
        assert kinds("inotify", "redis") == [InotifySource]
        assert kinds("redis") == [PollSource]
    assert any("REDIS_URL is not set" in r.getMessage() for r in caplog.records)
