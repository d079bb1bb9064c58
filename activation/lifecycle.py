"""One lifecycle for every long-running program: initialize, loop (one bounded step), shutdown.

`run_program` owns signals, the stop flag and the only place where an unexpected exception is
logged. Signal handlers only set flags; `loop()` must return often enough to notice them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from types import FrameType

from activation.errors import ActivationError, ConfigError

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
# Another tree runs this worker: supervisord's exitcodes list it, so a refused program ends as
# EXITED (expected) instead of being restarted again and again.
EXIT_OWNED = 3


class StopFlag(threading.Event):
    """The stop flag, which a blocking wait on a socket can select on too (``fileno``): setting
    it makes that fd readable, so a program idle in a socket wait notices SIGTERM at once.

    The pipe is made on the first ``fileno()``; a waiter checks ``is_set()`` after that call.
    """

    def __init__(self) -> None:
        super().__init__()
        self._pipe: tuple[int, int] | None = None

    def fileno(self) -> int:
        if self._pipe is None:
            self._pipe = os.pipe()
            os.set_blocking(self._pipe[1], False)
            if self.is_set():
                self._ring()
        return self._pipe[0]

    def set(self) -> None:
        super().set()
        self._ring()

    def _ring(self) -> None:
        if self._pipe is not None:
            with contextlib.suppress(OSError):  # full (rung already) or closed
                os.write(self._pipe[1], b"\0")

    def close(self) -> None:
        pipe, self._pipe = self._pipe, None
        for fd in pipe or ():
            with contextlib.suppress(OSError):
                os.close(fd)


class Program:
    """Base class of listener, executor, heartbeat and orchestrator."""

    name = "program"

    def __init__(self) -> None:
        self.stopping = StopFlag()
        self.log = logging.getLogger(f"activation.{self.name}")

    def initialize(self) -> None:
        """Acquire resources. Raising here ends the program with an error."""

    def loop(self) -> None:
        """Do one bounded step of work. Called until `stopping` is set."""
        raise NotImplementedError

    def shutdown(self) -> None:
        """Release resources. Always called, also after a failed initialize."""

    def request_stop(self, signum: int | None = None) -> None:
        self.stopping.set()


def run_program(program: Program) -> int:
    """Run ``program`` until SIGTERM or SIGINT, and return its exit code."""

    def on_signal(signum: int, frame: FrameType | None) -> None:
        program.request_stop(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    log = program.log
    code = EXIT_OK
    try:
        program.initialize()
        log.info("%s started", program.name)
        while not program.stopping.is_set():
            program.loop()
    except ActivationError as exc:  # a refusal we raised on purpose: one line, no traceback
        log.error("%s cannot run: %s", program.name, exc)
        code = EXIT_CONFIG if isinstance(exc, ConfigError) else EXIT_ERROR
    except Exception:
        log.exception("%s failed", program.name)
        code = EXIT_ERROR
    finally:
        try:
            program.shutdown()
        except Exception:
            log.exception("%s failed to shut down cleanly", program.name)
            code = EXIT_ERROR
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        program.stopping.close()
    log.info("%s stopped", program.name)
    return code
