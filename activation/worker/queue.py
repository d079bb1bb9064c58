"""The work queue between the listener and the executor, and the IPC that serves it.

The listener owns an in-memory, de-duplicating FIFO (`WorkQueue`) and serves it over an
authenticated Unix socket with `multiprocessing.connection` (`QueueServer`); the executor and the
heartbeat talk to it with `QueueClient`. The queue is only a fast path: the spool is the truth.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from pathlib import Path
from typing import Any, Protocol

from activation.errors import QueueError
from activation.hashes import compare_digest, hmac_md5

log = logging.getLogger("activation.listener")

SOCKET_NAME = "queue.sock"
AUTHKEY_NAME = "queue.key"
AUTHKEY_BYTES = 32
# A Unix socket path must fit in sun_path (108 bytes on Linux, including the NUL).
MAX_SOCKET_PATH = 107
# The longest a server thread waits inside one get(); the client asks again after that.
MAX_GET_TIMEOUT = 300.0
# How much longer than its own timeout a client waits for a reply before it calls the server hung.
REPLY_GRACE = 5.0
JOIN_TIMEOUT = 2.0
# How long a client waits to connect and for the server's challenge.
HANDSHAKE_TIMEOUT = 5.0


# -- the handshake: multiprocessing.connection's, byte for byte, without hmac ---------------------
# The stdlib's pair imports hmac, which loads OpenSSL's libcrypto (about 3.5 MB of every idle program)
# for one MD5 per connection; activation.hashes computes the same HMAC. A peer on the stdlib's
# deliver_challenge/answer_challenge speaks with this one (tests/unit/test_hashes.py).
CHALLENGE, WELCOME, FAILURE = b"#CHALLENGE#", b"#WELCOME#", b"#FAILURE#"
MESSAGE_LENGTH = 20  # bytes of the challenge's random part


def deliver_challenge(connection: Connection, authkey: bytes) -> None:
    message = os.urandom(MESSAGE_LENGTH)
    connection.send_bytes(CHALLENGE + message)
    response = connection.recv_bytes(256)  # reject a large message
    if compare_digest(response, hmac_md5(authkey, message)):
        connection.send_bytes(WELCOME)
    else:
        connection.send_bytes(FAILURE)
        raise AuthenticationError("digest received was wrong")


def answer_challenge(connection: Connection, authkey: bytes) -> None:
    message = connection.recv_bytes(256)  # reject a large message
    if not message.startswith(CHALLENGE):
        raise AuthenticationError("not a challenge")
    connection.send_bytes(hmac_md5(authkey, message[len(CHALLENGE) :]))
    if connection.recv_bytes(256) != WELCOME:
        raise AuthenticationError("digest sent was rejected")


def socket_path(run_dir: Path) -> Path:
    return Path(run_dir) / SOCKET_NAME


def load_authkey(run_dir: Path, key: bytes | None = None) -> bytes:
    """The worker's queue authkey: ``key`` (ACTIVATION_QUEUE_KEY) when given, else the key file.

    ``activation supervisord`` puts a fresh key in the environment of the programs it runs, where
    a same-uid agent cannot read it (they are not dumpable); then there is no file at all. A file
    in the run folder is readable by any process of the worker's uid, the agent included.

    The file is created on first use by whichever program comes first.

    The key is written to a private temp file and published with ``os.link``, which fails if the
    key already exists: two programs starting together agree on one key and nobody ever reads a
    half-written one.
    """
    if key is not None:
        return key
    run_dir = Path(run_dir)
    path = run_dir / AUTHKEY_NAME
    try:
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            tmp = run_dir / f".{AUTHKEY_NAME}.{os.urandom(4).hex()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, os.urandom(AUTHKEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # the other program won the race; use its key
            finally:
                os.unlink(tmp)
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            info = os.fstat(fd)
            if info.st_mode & 0o077:  # the key guards a pickle socket: keep it private
                os.fchmod(fd, 0o600)
            key = os.read(fd, AUTHKEY_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        raise QueueError(f"cannot read or create the queue key {path}: {exc.strerror or exc}") from None
    if len(key) != AUTHKEY_BYTES:
        raise QueueError(f"the queue key {path} is corrupt ({len(key)} bytes); delete it and restart the worker")
    return key


@dataclass(frozen=True)
class QueuedTask:
    task_id: str
    source: str  # the wake source that queued it: inotify | poll | rescan | redis
    seen_at: float = field(default=0.0, compare=False)  # time.time() of the wake-up (0: unknown)


# -- the wire: one typed message per request and reply, pickled over the private socket ---------


@dataclass(frozen=True)
class Get:
    """Ack my previous item and give me the next one, waiting up to ``timeout`` seconds."""

    timeout: float


@dataclass(frozen=True)
class Stats:
    """What the listener reports (the heartbeat asks)."""


@dataclass(frozen=True)
class Task:
    item: QueuedTask


@dataclass(frozen=True)
class Empty:
    """Nothing came within the timeout."""


@dataclass(frozen=True)
class StatsReply:
    info: dict[str, Any]


@dataclass(frozen=True)
class Refused:
    reason: str


Request = Get | Stats
Reply = Task | Empty | StatsReply | Refused


class WorkQueue:
    """A thread-safe FIFO of task ids that never holds an id twice, queued or in flight.

    An item handed to a consumer stays "in flight" until that consumer asks for its next item
    (the ack) or goes away. When a consumer goes away, its item is put back at the front if
    ``still_pending(task_id)`` says the task file is still in the inbox; otherwise the consumer
    had already claimed it and executor recovery owns it.
    """

    def __init__(self, still_pending: Callable[[str], bool] | None = None) -> None:
        self._still_pending = still_pending or (lambda task_id: True)
        self._lock = threading.Lock()
        # One condition, woken once per put: the handoff to a blocked consumer is a futex wake.
        self._ready = threading.Condition(self._lock)
        self._queue: deque[QueuedTask] = deque()
        self._queued: set[str] = set()
        self._in_flight: dict[object, QueuedTask] = {}
        self._in_flight_ids: set[str] = set()
        self._epoch = 0  # bumped by wake_all() so that waiters re-check their stop condition

    def put(self, task_id: str, source: str, seen_at: float = 0.0) -> bool:
        """Append ``task_id``; False if it is already queued or in flight."""
        with self._lock:
            if task_id in self._queued or task_id in self._in_flight_ids:
                return False
            self._queue.append(QueuedTask(task_id, source, seen_at))
            self._queued.add(task_id)
            self._ready.notify()
            return True

    def __contains__(self, task_id: object) -> bool:
        # Set membership under the GIL is atomic; no lock keeps the listener's hot path cheap.
        return task_id in self._queued or task_id in self._in_flight_ids

    def __len__(self) -> int:
        """How many ids wait to be handed out (in-flight ones are not counted)."""
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def take(
        self, consumer: object, timeout: float, should_stop: Callable[[], bool] = lambda: False
    ) -> QueuedTask | None:
        """Ack ``consumer``'s previous item, then hand it the next one, waiting up to ``timeout``."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._lock:
            self._ack_locked(consumer)
            epoch = self._epoch
            while not self._queue:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or should_stop():
                    return None
                self._ready.wait(remaining)
                if self._epoch != epoch:
                    epoch = self._epoch
                    if should_stop():
                        return None
            item = self._queue.popleft()
            # In flight before no longer queued: the lock-free __contains__ never misses it.
            self._in_flight[consumer] = item
            self._in_flight_ids.add(item.task_id)
            self._queued.discard(item.task_id)
            return item

    def ack(self, consumer: object) -> None:
        with self._lock:
            self._ack_locked(consumer)

    def release(self, consumer: object) -> QueuedTask | None:
        """``consumer`` went away: put its in-flight item back at the front if it is still pending."""
        with self._lock:
            item = self._in_flight.pop(consumer, None)
            if item is None:
                return None
            self._in_flight_ids.discard(item.task_id)
        # still_pending touches the filesystem: call it outside the lock.
        if not self._still_pending(item.task_id):
            return None
        with self._lock:
            if item.task_id in self._queued or item.task_id in self._in_flight_ids:
                return None
            self._queue.appendleft(item)
            self._queued.add(item.task_id)
            self._ready.notify()
        return item

    def wake_all(self) -> None:
        """Wake every waiting consumer so that it re-checks its ``should_stop``."""
        with self._lock:
            self._epoch += 1
            self._ready.notify_all()

    def snapshot(self) -> list[QueuedTask]:
        with self._lock:
            return list(self._queue)

    def _ack_locked(self, consumer: object) -> None:
        item = self._in_flight.pop(consumer, None)
        if item is not None:
            self._in_flight_ids.discard(item.task_id)


class QueueServer:
    """Serves a `WorkQueue` on a Unix socket: one daemon thread accepts, one thread per connection.

    We bind our own socket instead of using ``multiprocessing.connection.Listener`` so that the
    authkey handshake runs in the connection's thread (a silent or hostile client cannot stall
    ``accept``) and so that ``stop()`` can wake a blocked ``accept``/``recv`` with ``shutdown``.
    """

    def __init__(self, path: Path, authkey: bytes, work: WorkQueue, stats: Callable[[], dict[str, Any]]) -> None:
        self.path = Path(path)
        self._authkey = authkey
        self._work = work
        self._stats = stats
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._accepter: threading.Thread | None = None
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._stopping = threading.Event()

    def start(self) -> None:
        if len(os.fsencode(self.path)) > MAX_SOCKET_PATH:
            raise QueueError(
                f"queue socket path {self.path} is longer than {MAX_SOCKET_PATH} bytes; "
                "set ACTIVATION_RUN_DIR to a shorter folder"
            )
        self._refuse_live_server()
        # Bind under a temp name, make it private, then rename over the final name: there is
        # never a moment where the socket is reachable with the umask's mode, and a stale socket
        # left by SIGKILL is replaced atomically.
        tmp = self.path.parent / f".qs-{os.urandom(4).hex()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            sock.listen(16)
            os.rename(tmp, self.path)
            self._inode = os.stat(self.path).st_ino
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise QueueError(f"cannot serve the work queue at {self.path}: {exc.strerror or exc}") from None
        self._sock = sock
        self._stopping.clear()
        self._accepter = threading.Thread(target=self._accept_loop, name="queue-accept", daemon=True)
        self._accepter.start()
        log.info("work queue serving at %s", self.path, extra={"event": "queue_start"})

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._work.wake_all()  # wakes connection threads waiting inside take()
        with self._lock:
            connections = list(self._connections.items())
        for _, sock in connections:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wakes a blocked recv() with EOF
        deadline = time.monotonic() + JOIN_TIMEOUT
        threads = [t for t, _ in connections]
        if self._accepter is not None:
            threads.append(self._accepter)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                log.warning("queue thread %s did not stop in time", thread.name, extra={"event": "queue_stop"})
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        # Unlink only our own socket: a newer listener may already have replaced it.
        with contextlib.suppress(OSError):
            if self._inode is not None and os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        self._inode = None

    def _refuse_live_server(self) -> None:
        """Fail when another listener still serves this socket; a dead one's file is just stale."""
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.settimeout(1.0)
            probe.connect(str(self.path))
        except OSError:
            return  # absent, refused or not a socket: safe to replace
        finally:
            probe.close()
        raise QueueError(f"another listener is already serving {self.path}")

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                sock, _ = self._sock.accept()
            except OSError:
                if self._stopping.is_set():
                    return
                time.sleep(0.05)  # e.g. EMFILE: do not spin
                continue
            thread = threading.Thread(target=self._serve, args=(sock,), name="queue-conn", daemon=True)
            # Registered and started under the lock: stop() only ever sees started threads, and
            # nothing is registered once it has begun.
            with self._lock:
                if self._stopping.is_set():
                    sock.close()
                    return
                for finished in [t for t in self._connections if not t.is_alive()]:
                    del self._connections[finished]
                self._connections[thread] = sock
                thread.start()

    def _serve(self, sock: socket.socket) -> None:
        # The Connection gets its own fd so that shutdown() on ``sock`` can wake it safely.
        conn = Connection(os.dup(sock.fileno()))
        consumer = object()
        try:
            try:
                deliver_challenge(conn, self._authkey)
                answer_challenge(conn, self._authkey)
            except (AuthenticationError, EOFError, OSError) as exc:
                if not self._stopping.is_set():
                    log.warning(
                        "refused a queue connection: %s", exc or "handshake failed", extra={"event": "queue_auth"}
                    )
                return
            while not self._stopping.is_set():
                try:
                    request = conn.recv()
                except (EOFError, OSError):
                    return
                except Exception as exc:  # an unpicklable request: answer and keep the connection
                    conn.send(Refused(f"bad request: {exc}"))
                    continue
                conn.send(self._answer(request, consumer))
        except (EOFError, OSError):
            pass  # the client went away mid-reply; release() below requeues its item
        finally:
            item = self._work.release(consumer)
            if item is not None:
                log.info(
                    "consumer went away; %s is back at the front of the queue",
                    item.task_id,
                    extra={"task_id": item.task_id, "event": "requeue"},
                )
            conn.close()
            sock.close()
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

    def _answer(self, request: object, consumer: object) -> Reply:
        if isinstance(request, Get):
            timeout = request.timeout if isinstance(request.timeout, (int, float)) else 0.0
            item = self._work.take(consumer, min(max(float(timeout), 0.0), MAX_GET_TIMEOUT), self._stopping.is_set)
            return Task(item) if item is not None else Empty()
        if isinstance(request, Stats):
            info: dict[str, Any] = {"queue_size": len(self._work), "in_flight": self._work.in_flight}
            try:
                info.update(self._stats())
            except Exception as exc:
                return Refused(f"stats failed: {exc}")
            return StatsReply(info)
        return Refused(f"unknown request {type(request).__name__[:40]}")


class Interrupt(Protocol):
    """What ends a client's wait early: the program's stop flag (activation.lifecycle.StopFlag)."""

    def is_set(self) -> bool: ...
    def fileno(self) -> int: ...


class QueueClient:
    """The executor's and the heartbeat's end of the work queue. Reconnects on the next call."""

    def __init__(self, path: Path, authkey: bytes) -> None:
        self.path = Path(path)
        self._authkey = authkey
        self._conn: Connection | None = None
        self._lock = threading.Lock()

    def get(self, timeout: float, interrupt: Interrupt | None = None) -> QueuedTask | None:
        """The next task id, or None after ``timeout``. Acknowledges the item from the previous call.

        ``interrupt`` (the program's stop flag) ends the wait at once when it is set: the
        connection is dropped, and the listener puts back an item it may have sent meanwhile.
        """
        reply = self._request(Get(float(timeout)), float(timeout) + REPLY_GRACE, interrupt)
        if isinstance(reply, Task):
            return reply.item
        if isinstance(reply, Empty):
            return None
        raise QueueError(f"unexpected reply from the work queue at {self.path}: {str(reply)[:100]}")

    def stats(self) -> dict[str, Any]:
        reply = self._request(Stats(), REPLY_GRACE)
        if isinstance(reply, StatsReply) and isinstance(reply.info, dict):
            return reply.info
        raise QueueError(f"unexpected reply from the work queue at {self.path}: {str(reply)[:100]}")

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _request(self, request: Request, wait: float, interrupt: Interrupt | None = None) -> Reply:
        with self._lock:
            # A reused connection may have died with a listener restart since the last call:
            # retry once on a fresh one. That is safe: a dead server handed nothing out, and a
            # live one requeues an item whose consumer vanished.
            for attempt in (0, 1):
                fresh = self._conn is None
                conn = self._connect()
                waits: list[Any] = [conn] if interrupt is None else [conn, interrupt.fileno()]
                if interrupt is not None and interrupt.is_set():
                    return Empty()
                try:
                    conn.send(request)
                    if conn not in wait_for(waits, wait):
                        self._drop()
                        if interrupt is not None and interrupt.is_set():
                            return Empty()  # stopping: whatever was sent meanwhile goes back
                        raise QueueError(f"the work queue at {self.path} did not answer within {wait:g}s")
                    reply = conn.recv()
                except (EOFError, OSError) as exc:
                    self._drop()
                    if fresh or attempt:
                        raise QueueError(f"lost the work queue at {self.path}: {_describe(exc)}") from None
                    continue
                if not isinstance(reply, (Task, Empty, StatsReply, Refused)):
                    raise QueueError(f"malformed reply from the work queue at {self.path}")
                if isinstance(reply, Refused):
                    raise QueueError(f"the work queue at {self.path} refused the request: {reply.reason}")
                return reply
        raise AssertionError("unreachable")

    def _connect(self) -> Connection:
        """What ``multiprocessing.connection.Client`` does, with bounded waits: a listener that
        is stopped or wedged must not hang the executor (and its SIGTERM handling) forever."""
        if self._conn is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(HANDSHAKE_TIMEOUT)
                sock.connect(str(self.path))
                sock.setblocking(True)
                conn = Connection(sock.detach())
            except OSError as exc:
                sock.close()
                raise QueueError(f"cannot reach the work queue at {self.path}: {_describe(exc)}") from None
            try:
                if not conn.poll(HANDSHAKE_TIMEOUT):  # the server speaks first
                    raise QueueError(f"the work queue at {self.path} did not answer within {HANDSHAKE_TIMEOUT:g}s")
                answer_challenge(conn, self._authkey)
                deliver_challenge(conn, self._authkey)
            except AuthenticationError:
                conn.close()
                raise QueueError(f"the work queue at {self.path} rejected our key (queue.key differs)") from None
            except (EOFError, OSError) as exc:
                conn.close()
                raise QueueError(f"cannot reach the work queue at {self.path}: {_describe(exc)}") from None
            except QueueError:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, EOFError):
        return "connection closed"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
