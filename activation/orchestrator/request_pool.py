"""The admin API's request threads: started as requests need them, then kept for the next ones.

A thread started per connection (``ThreadingHTTPServer``) costs a fifth of a small request's
CPU here (thread start, its bookkeeping, joining); a kept thread costs nothing while it waits.
A thread that has had nothing to do for IDLE_SECONDS ends, so a burst of connections does not
leave its threads behind for good. The server reserves a slot before it hands a connection
over, so the pool never holds more threads than the server has slots.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

Serve = Callable[[Any, Any], None]  # (connection, client address): serves it and closes it
IDLE_SECONDS = 60.0


class RequestPool:
    def __init__(self, serve: Serve, *, name: str, idle_seconds: float = IDLE_SECONDS) -> None:
        self._serve = serve
        self._name = name
        self._idle_seconds = idle_seconds
        self._started = 0
        self._queue: queue.SimpleQueue[tuple[Any, Any] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._spare = 0  # threads that will take the next connection without one being started

    def submit(self, request: Any, client_address: Any) -> None:
        """Hand a connection to a spare thread, or to a new one; raises if no thread can start."""
        with self._lock:
            if self._spare:
                self._spare -= 1
            else:
                # Started before the put: if the start fails, nothing waits in the queue for it.
                # Not a daemon (the accepting thread is one, and would pass that on): close() joins it.
                thread = threading.Thread(target=self._run, name=f"{self._name}-{self._started}", daemon=False)
                thread.start()
                self._started += 1
                self._threads.append(thread)
        self._queue.put((request, client_address))

    def _run(self) -> None:
        while True:
            try:
                item = self._queue.get(timeout=self._idle_seconds)
            except queue.Empty:
                with self._lock:
                    # Spare threads outnumber the connections on their way to them: one may go.
                    # None spare: a submit counted on this thread, and its connection is coming.
                    if self._spare:
                        self._spare -= 1
                        with contextlib.suppress(ValueError):  # close() may have taken the list
                            self._threads.remove(threading.current_thread())
                        return
                continue
            if item is None:
                return
            self._serve(*item)
            with self._lock:
                self._spare += 1

    def close(self) -> None:
        """End every thread once its current connection is served, and join them."""
        with self._lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._queue.put(None)
        for thread in threads:
            thread.join()

    @property
    def size(self) -> int:
        with self._lock:
            return len(self._threads)
