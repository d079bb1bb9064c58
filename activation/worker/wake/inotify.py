"""The inotify wake source: one thread reads the kernel's events on the inbox and notifies.

It subscribes to renames into the inbox and closes after writing only, reports a queue overflow
so the listener rescans, and dies visibly (alive() turns False, the listener restarts it) when
the inbox itself is removed, moved or unmounted.

The kernel interface is libc's inotify_init1/inotify_add_watch through ctypes, read on one
thread asleep in poll() on the inotify fd and a stop pipe. watchdog's observer put two threads
between the kernel and the handler (its fd reader, then its emitter): one thread wake-up more on
every task's path, and it took private attributes to get its overflow and to stop its move
pairing. A handful of flags and one struct are all this source needs of inotify.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import select
import struct
import threading
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

from activation.worker.wake.base import JOIN_TIMEOUT, Notify, WakeSource

log = logging.getLogger("activation.listener")

# <sys/inotify.h>
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000

# Only what proves a file complete: a rename into the inbox (atomic write, requeue) and a close
# after writing (plain write). No IN_CREATE: a plain write's create fires on an empty file. No
# IN_MOVED_FROM: every claim is a rename out of the inbox, and nothing here needs to hear it.
INBOX_MASK = IN_MOVED_TO | IN_CLOSE_WRITE | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
ARRIVED = IN_MOVED_TO | IN_CLOSE_WRITE
# The watch is gone (the inbox removed, renamed away or unmounted): the kernel sends IN_IGNORED last.
WATCH_GONE = IN_DELETE_SELF | IN_MOVE_SELF | IN_UNMOUNT | IN_IGNORED

EVENT_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len; then len bytes of name
READ_SIZE = 64 * 1024  # bytes per read: about 2,000 events of task-sized names, far above one event's maximum


class InotifyError(OSError):
    """The kernel would not give this inbox a watch (limits reached, no such folder)."""


def parse_events(buffer: bytes) -> Iterator[tuple[int, str]]:
    """Each (mask, file name) in what one read() returned; the name is "" for events on the watch itself."""
    offset = 0
    while offset + EVENT_HEADER.size <= len(buffer):
        _wd, mask, _cookie, length = EVENT_HEADER.unpack_from(buffer, offset)
        offset += EVENT_HEADER.size
        raw = buffer[offset : offset + length]
        offset += length
        yield mask, os.fsdecode(raw.split(b"\0", 1)[0])


@cache
def _libc() -> ctypes.CDLL:
    # The symbols of the running process, libc's among them: no library search (find_library forks).
    return ctypes.CDLL(None, use_errno=True)


def _failed(call: str, folder: Path) -> InotifyError:
    code = ctypes.get_errno()
    hint = {
        errno.EMFILE: " (fs.inotify.max_user_instances reached)",
        errno.ENOSPC: " (fs.inotify.max_user_watches reached)",
    }.get(code, "")
    return InotifyError(code, f"{call} on {folder}: {os.strerror(code)}{hint}")


def open_watch(folder: Path, mask: int = INBOX_MASK, *, blocking: bool = False) -> int:
    """An inotify fd with one watch on ``folder`` (the bench's floor reads one blocking); InotifyError when refused."""
    libc = _libc()
    fd = int(libc.inotify_init1(os.O_CLOEXEC if blocking else os.O_NONBLOCK | os.O_CLOEXEC))
    if fd < 0:
        raise _failed("inotify_init1", folder)
    # The real path: a symlinked inbox would otherwise be watched through a link that can change.
    if int(libc.inotify_add_watch(fd, os.fsencode(os.path.realpath(folder)), mask)) < 0:
        error = _failed("inotify_add_watch", folder)
        os.close(fd)
        raise error
    return fd


class InotifySource(WakeSource):
    """The inbox's inotify watch (not recursive: .processing/ is not watched), read on one thread."""

    name = "inotify"

    def __init__(self, inbox: Path, on_overflow: Callable[[], None] | None = None) -> None:
        self.inbox = Path(inbox)
        self._on_overflow = on_overflow or (lambda: None)
        self._thread: threading.Thread | None = None
        self._stop_write: int | None = None

    def start(self, notify: Notify) -> None:
        self.stop()
        fd = open_watch(self.inbox)
        try:
            stop_read, stop_write = os.pipe2(os.O_CLOEXEC)
        except BaseException:  # out of fds: the watch goes with it
            os.close(fd)
            raise
        thread = threading.Thread(target=self._read, args=(fd, stop_read, notify), name="inotify-reader", daemon=True)
        try:
            thread.start()
        except BaseException:
            for end in (fd, stop_read, stop_write):
                os.close(end)
            raise
        self._thread, self._stop_write = thread, stop_write

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        stop_write, self._stop_write = self._stop_write, None
        if stop_write is not None:
            with contextlib.suppress(OSError):
                os.write(stop_write, b"x")
        if thread is not None:
            thread.join(JOIN_TIMEOUT)
            if thread.is_alive():  # stuck in a notify; it closes its own fds when it comes back
                log.warning("inotify thread %s did not stop in time", thread.name, extra={"event": "source_stop"})
        if stop_write is not None:
            os.close(stop_write)

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _read(self, fd: int, stop_read: int, notify: Notify) -> None:
        """The reader thread: asleep until the kernel has events or stop() writes to the pipe."""
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        poller.register(stop_read, select.POLLIN)
        try:
            while True:
                ready = poller.poll()
                if any(ready_fd == stop_read for ready_fd, _ in ready):
                    return
                try:
                    buffer = os.read(fd, READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    continue
                if not self._dispatch(buffer, notify):
                    return
        except Exception:  # its death is seen by alive(); the listener restarts it and says so
            log.exception("inotify reader failed on %s", self.inbox, extra={"event": "source_error"})
        finally:
            os.close(fd)
            os.close(stop_read)

    def _dispatch(self, buffer: bytes, notify: Notify) -> bool:
        """Hand each event on; False once the watch itself is gone."""
        for mask, name in parse_events(buffer):
            if mask & IN_Q_OVERFLOW:
                try:
                    self._on_overflow()
                except Exception:
                    log.exception("inotify overflow hook failed", extra={"event": "overflow"})
            elif mask & WATCH_GONE and not name:
                return False
            elif mask & ARRIVED and name:
                try:
                    notify(name, self.name, complete=True)
                except Exception:  # a handler's error must not make the listener deaf
                    log.exception("inotify handler failed on %s", name, extra={"event": "handler_error"})
        return True
