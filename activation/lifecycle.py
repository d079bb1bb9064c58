"""One lifecycle for every long-running program: initialize, loop (one bounded step), shutdown.

`run_program` owns signals, the stop flag and the only place where an unexpected exception is
logged. Signal handlers only set flags; `loop()` must return often enough to notice them.
"""

from __future__ import annotations

import logging
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


class Program:
    """Base class of listener, executor, heartbeat and orchestrator."""

    name = "program"

    def __init__(self) -> None:
        self.stopping = threading.Event()
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
    log.info("%s stopped", program.name)
    return code
