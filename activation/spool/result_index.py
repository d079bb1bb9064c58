"""One worker's results in time order, so that ``tasks`` and ``status`` need not stat every result.

The results folder stays the source of truth; this is a cache beside it, ``results/.index/<worker>``,
stamped with the folder's mtime as it was just before the listing it was built from. A reader
trusts it only while the folder's mtime is still that stamp, and the stamp was already older than
MTIME_GUARD_NS when that listing began (an entry added within the same filesystem clock tick
would not move the mtime). Otherwise the reader lists and stats the folder as it would without
an index, and writes the new index back, best effort (a read-only spool just lists each time).

So a result written by any process is seen on the next read, a lost, torn or foreign index costs
one rebuild, and an unchanged folder costs the rows a caller reads: the index is newest first,
read line by line, and the caller stops. A folder that changed costs what it cost before the
index (one listing and one lstat per result), once: the next reader finds the index valid.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from activation.spool.atomic import TEMP_PREFIX, atomic_write_bytes
from activation.spool.layout import Spool
from activation.spool.task import is_task_name

INDEX_DIR = ".index"  # under results/: a dot folder, which nothing takes for a worker
FORMAT = b"activation-result-index/1"
# A folder mtime younger than this when a listing starts may hide an entry added in the same tick.
MTIME_GUARD_NS = 2_000_000_000
STALE_TEMP_NS = 600_000_000_000  # an index temp file this old was left by a writer that died

Row = tuple[float, str, str]  # (mtime as os.stat gives it, name, path), as a reader wants it


def seconds(mtime_ns: int) -> float:
    """``st_mtime`` from ``st_mtime_ns``, computed as CPython computes it, so the two compare equal."""
    sec, nsec = divmod(mtime_ns, 1_000_000_000)
    return sec + nsec * 1e-9


class ResultIndex:
    """The results of ``worker``, newest first (by mtime, then name, as a listing sorts them)."""

    def __init__(self, spool: Spool, worker: str) -> None:
        self.folder = spool.results(worker)
        self.path = spool.results_dir / INDEX_DIR / worker
        self.rebuilt = False  # whether the last read had to list the folder (for tests and the curious)

    def newest(self, since: float | None = None) -> Iterator[Row]:
        """Every result whose mtime is at or after ``since``, newest first; lazy: stop when done."""
        folder = str(self.folder)
        last: tuple[float, str] | None = None  # the last row given, should the index prove corrupt
        valid = self._open_valid()
        if valid is not None:
            self.rebuilt = False
            with valid:
                header = _header(valid.readline())  # checked by _open_valid
                previous: tuple[int, str] | None = None
                rows = 0
                try:
                    for line in valid:
                        row = _split(line)
                        if previous is not None and row >= previous:
                            raise ValueError("rows out of order")  # not what _write wrote
                        mtime = seconds(row[0])
                        if since is not None and mtime < since:
                            return
                        previous, rows, last = row, rows + 1, (mtime, row[1])
                        yield mtime, row[1], os.path.join(folder, row[1])
                    if header is not None and rows == header[2]:
                        return
                    # fewer or more rows than its header says: torn or not ours, list the folder
                except ValueError:
                    pass  # a line that is not ours under a valid header: list the folder after all
        for mtime_ns, name in self._rebuild():
            mtime = seconds(mtime_ns)
            if since is not None and mtime < since:
                return
            if last is not None and (mtime, name) >= last:
                continue  # given before the index proved corrupt
            yield mtime, name, os.path.join(folder, name)

    def count(self) -> int:
        """How many results there are: the index's count when it is valid, else one listing, no stat."""
        valid = self._open_valid()
        if valid is not None:
            with valid:
                header = _header(valid.readline())
            if header is not None:
                return header[2]
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(self.folder) as it:
            return sum(1 for e in it if is_task_name(e.name))
        return 0

    # -- inside -----------------------------------------------------------------------------

    def _open_valid(self) -> BinaryIO | None:
        """The index file, positioned at its start, when it describes the folder as it is now."""
        try:
            mtime_ns = os.stat(self.folder).st_mtime_ns
            handle = open(self.path, "rb")  # noqa: SIM115 - handed to the caller, who closes it
        except OSError:
            return None
        stamp = _header(handle.readline())
        if stamp is None or stamp[0] != mtime_ns or stamp[0] >= stamp[1] - MTIME_GUARD_NS:
            handle.close()
            return None
        handle.seek(0)
        return handle

    def _rebuild(self) -> list[tuple[int, str]]:
        """List and stat the folder, as a listing without an index does, and write the index back (best effort).

        Every entry is stat'ed again: a name known from the old index may be a new file since
        (purged, then the same task id dispatched again), and neither its name nor its inode
        (which a freed file hands on) would tell.
        """
        self.rebuilt = True
        listed_at = time.time_ns()
        try:
            stamp = os.stat(self.folder).st_mtime_ns  # before the listing: a change during it moves the mtime
        except OSError:
            return []
        rows: list[tuple[int, str]] = []
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(self.folder) as it:
            for entry in it:
                if not is_task_name(entry.name):
                    continue
                try:
                    rows.append((entry.stat(follow_symlinks=False).st_mtime_ns, entry.name))
                except FileNotFoundError:  # moved on while we looked
                    continue
        # By mtime_ns then name: the order of (st_mtime, name) but for two times within a fraction
        # of a microsecond, which a float cannot tell apart; a plain tuple sort is the cheap one.
        rows.sort(reverse=True)
        self._write(stamp, listed_at, rows)
        return rows

    def _write(self, stamp: int, listed_at: int, rows: list[tuple[int, str]]) -> None:
        text = "".join([f"{FORMAT.decode()} {stamp} {listed_at} {len(rows)}\n", *(f"{t} {n}\n" for t, n in rows)])
        if text.count("\n") != len(rows) + 1:
            return  # a name no line can hold: no index, every read lists (correct, only slower)
        # A cache: no fsync; a crash leaves it absent, old or whole, and the stamp tells which.
        with contextlib.suppress(OSError):
            self.path.parent.mkdir(exist_ok=True)
            _remove_stale_temps(self.path.parent, listed_at)
            atomic_write_bytes(self.path, os.fsencode(text), durable=False)


def _remove_stale_temps(folder: Path, now_ns: int) -> None:
    """A writer killed mid-write leaves its temp file; one older than a write could take is that.
    (Removing a live writer's temp only makes its rename fail, which costs it nothing: a cache.)"""
    with contextlib.suppress(OSError), os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(TEMP_PREFIX):
                with contextlib.suppress(OSError):
                    if entry.stat(follow_symlinks=False).st_mtime_ns < now_ns - STALE_TEMP_NS:
                        os.unlink(entry.path)


def _header(line: bytes) -> tuple[int, int, int] | None:
    """(folder mtime_ns, listed_at_ns, count) from a header line, or None when it is not ours."""
    parts = line.split()
    if len(parts) != 4 or parts[0] != FORMAT:
        return None
    try:
        return int(parts[1]), int(parts[2]), int(parts[3])
    except ValueError:
        return None


def _split(line: bytes) -> tuple[int, str]:
    """(mtime_ns, name) from a row; ValueError when it is not one _write writes.

    The name becomes a path its caller reads: one that is no result's name (``../x.json``,
    ``/etc/x.json``) makes the index corrupt, so that a hostile index never leads a reader out
    of the folder.
    """
    mtime_ns, name = line.rstrip(b"\n").split(b" ", 1)
    text = os.fsdecode(name)
    if not is_task_name(text) or "/" in text or "\0" in text:
        raise ValueError(f"no result's name: {text[:80]!a}")
    value = int(mtime_ns)
    if not 0 <= value < 2**63:  # st_mtime_ns is an int64; a bigger one would overflow seconds()
        raise ValueError(f"no mtime: {value}")
    return value, text
