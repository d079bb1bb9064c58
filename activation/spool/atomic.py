"""Atomic files: a reader sees a path absent, old or complete, never half-written.

Temp file in the same folder (its name starts with a dot, so no reader takes it for a task),
fsync, rename, fsync the folder. Every write anywhere in the spool goes through here.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from activation.spool import codec

TEMP_PREFIX = ".tmp_"


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o644) -> None:
    """Write ``data`` so that ``path`` is either absent, old, or complete; never half-written.

    The temp file lives in the same folder (a rename never crosses filesystems) and starts
    with a dot, so no reader ever takes it for a task.
    """
    tmp = path.parent / f"{TEMP_PREFIX}{path.name}.{os.urandom(4).hex()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def remove_temp_files(folder: Path, prefix: str = TEMP_PREFIX) -> int:
    """Delete the temp files a killed writer left in ``folder``; only call it as their sole writer."""
    removed = 0
    # No folder (or a file in its place, which health reports): no temp files to remove.
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.startswith(prefix):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed += 1
    return removed


def atomic_write_json(path: Path, obj: Any, *, durable: bool = True) -> None:
    atomic_write_bytes(path, json_bytes(obj), durable=durable)


def json_bytes(obj: Any) -> bytes:
    """UTF-8 JSON; never raises on what codec.loads returned, at worst ValueError (see codec.encode)."""
    return codec.encode(obj)


def read_json(path: Path) -> Any:
    """Parse a JSON file the spool wrote; raises only OSError or ValueError, whatever it holds."""
    return codec.read(path)
