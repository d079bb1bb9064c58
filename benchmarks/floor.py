"""The floors every figure is divided by, measured in the same run: what the kernel and one spawn cost.

- raw inotify delivery: rename a file in a watched folder and ``os.read`` the event from an
  inotify fd in the same thread (the listener's own inotify_init1/inotify_add_watch, no thread);
- a bare spawn: ``Popen`` of the same agent, returning (and, for the burst, reaped too);
- a durable write: write, fsync, rename, fsync the folder (what the spool's results need).
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Any

from activation.worker.wake.inotify import IN_MOVED_TO, READ_SIZE, open_watch, parse_events
from benchmarks.stats import summary


class Inotify:
    """A raw inotify fd watching one folder for IN_MOVED_TO, read blocking in the caller's thread.

    The listener's own kernel calls (activation/worker/wake/inotify.py), without its thread.
    """

    def __init__(self, folder: Path, mask: int = IN_MOVED_TO) -> None:
        self.fd = open_watch(folder, mask, blocking=True)

    def read(self) -> list[tuple[int, str]]:
        """The (mask, name) of each event of one read."""
        return list(parse_events(os.read(self.fd, READ_SIZE)))

    def close(self) -> None:
        os.close(self.fd)


def inotify_delivery(folder: Path, samples: int) -> list[float]:
    """Milliseconds from just before ``rename`` to the event read back, in the writer's own thread."""
    folder.mkdir(parents=True, exist_ok=True)
    watch = Inotify(folder)
    delays = []
    try:
        for i in range(samples):
            tmp, final = folder / f".tmp_floor-{i}.json", folder / f"floor-{i}.json"
            tmp.write_bytes(b'{"task_id": "floor"}\n')
            began = time.perf_counter()
            os.rename(tmp, final)
            events = watch.read()
            delays.append((time.perf_counter() - began) * 1000)
            if not any(name == final.name for _, name in events):
                raise RuntimeError(f"inotify floor: expected {final.name}, read {events}")
            final.unlink()
    finally:
        watch.close()
    return delays


def spawn(argv: list[str], samples: int, *, reap: bool = False) -> list[float]:
    """Milliseconds of ``Popen`` returning (as the executor starts the agent), or of Popen plus the child's exit."""
    delays = []
    for _ in range(samples):
        began = time.perf_counter()
        child = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        if reap:
            child.communicate()
            delays.append((time.perf_counter() - began) * 1000)
        else:
            delays.append((time.perf_counter() - began) * 1000)
            child.communicate()
    return delays


def durable_write(folder: Path, samples: int, size: int = 600) -> list[float]:
    """Milliseconds of one durable small file: write, fsync, rename, fsync the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    payload = b"x" * size
    delays = []
    for i in range(samples):
        tmp, final = folder / f".tmp_dw-{i}", folder / f"dw-{i}.json"
        began = time.perf_counter()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.write(fd, payload)
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, final)
        dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        os.fsync(dfd)
        os.close(dfd)
        delays.append((time.perf_counter() - began) * 1000)
    for i in range(samples):
        (folder / f"dw-{i}.json").unlink()
    return delays


def measure(folder: Path, argv: list[str], samples: int) -> dict[str, Any]:
    """Every floor, in this run, on the filesystem the trees use."""
    delivery = summary(inotify_delivery(folder / "inotify", samples))
    popen = summary(spawn(argv, samples))
    reaped = summary(spawn(argv, samples, reap=True))
    write = summary(durable_write(folder / "durable", samples))
    return {
        "inotify_delivery_ms": delivery,
        "spawn_ms": popen,
        "spawn_reap_ms": reaped,
        "durable_write_ms": write,
        "activation_floor_ms": delivery["p50"] + popen["p50"],
        "burst_floor_ms": reaped["p50"] + write["p50"],
    }
