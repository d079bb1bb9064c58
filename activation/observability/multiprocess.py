"""Which folder a program's Prometheus samples go to: prometheus_client's multiprocess mode, set up
its documented way (PROMETHEUS_MULTIPROC_DIR before the library is imported), never by patching it.

This module imports nothing of prometheus_client, so the programs' entry point can call
`enable_multiprocess` before anything that defines a metric is imported.
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_folder: Path | None = None  # the multiprocess folder this process adopted


def enable_multiprocess(folder: Path) -> None:
    """Point prometheus_client at ``folder``: it picks its value class when it is first imported,
    from PROMETHEUS_MULTIPROC_DIR. Called after that import (for another folder), it refuses
    rather than patch the library.
    """
    if "prometheus_client.values" in sys.modules and os.environ.get(MULTIPROC_ENV) != str(folder):
        raise RuntimeError(f"prometheus_client was imported before {MULTIPROC_ENV} was set: metrics would be lost")
    os.environ[MULTIPROC_ENV] = str(folder)  # prometheus_client's own interface
    adopt_folder(folder)


def adopt_folder(folder: Path) -> None:
    """Make ``folder`` this process's multiprocess folder, clean of what an earlier owner of its pid left.

    Live gauge files already named after this pid were left by an earlier owner of the pid (a
    restarted container counts pids from 1 again). prometheus_client would adopt their values
    as its own, so they go before the first metric is created. Counter and histogram files stay:
    adopting those keeps every sum, and so every counter, monotonic.
    """
    global _folder
    folder.mkdir(parents=True, exist_ok=True)
    for path in folder.glob(f"gauge_live*_{os.getpid()}.db"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    _folder = folder


def multiprocess_folder() -> Path | None:
    """The folder this process adopted, or None outside multiprocess mode."""
    return _folder
