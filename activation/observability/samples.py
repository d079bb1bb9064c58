"""One program's metric samples: kept in memory, mirrored to one small file the heartbeat serves.

The listener and the executor record here and never import prometheus_client (about 12 MB of
each idle process). A program's values go to ``<run_dir>/metrics/<program>.json`` a moment after
they change (temp file and rename, not fsynced: metrics need not outlive the host); a restarted
program continues from its file, so counters never go back. The file names its writer (pid,
start time, boot), so a dead program's counters are still served and its gauges are not.
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import json
import logging
import math
import os
import re
import threading
from functools import lru_cache
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar

from activation.observability.catalog import CATALOG, Spec
from activation.process_start import boot_id, start_ticks
from activation.spool.atomic import TEMP_PREFIX, atomic_write_bytes, remove_temp_files

log = logging.getLogger("activation.metrics")

FORMAT = 1
FOLDER = "metrics"
SUFFIX = ".json"
FLUSH_DELAY = 0.25  # seconds a change waits to share its write with the next ones: <= 4 writes/s
MAX_FILE = 1 << 20  # bytes; a program's file is a few KB, a bigger one is not ours
PROGRAM_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")

Key = tuple[str, ...]
Series = dict[Key, Any]  # labels -> float (counter, gauge) or [count per bucket..., count of +Inf, sum]
Values = dict[str, Series]  # metric name -> its series
Child = TypeVar("Child")


def metrics_folder(run_dir: Path) -> Path:
    """Where a worker's programs keep their samples (the run folder is private to the worker)."""
    return run_dir / FOLDER


# -- who wrote a file ----------------------------------------------------------------------------


BOOT_ID = boot_id()


class Owner(NamedTuple):
    """A process start: a pid alone is reused (a container's pids start again from 1), this is not."""

    pid: int
    start: str  # "" where procfs is missing: then the pid alone is trusted
    boot: str

    @classmethod
    def me(cls) -> Owner:
        pid = os.getpid()
        return cls(pid, start_ticks(pid) or "", BOOT_ID)

    def alive(self) -> bool:
        if self.pid <= 0 or (self.boot and BOOT_ID and self.boot != BOOT_ID):
            return False
        start = start_ticks(self.pid)
        if start is not None:
            return not self.start or start == self.start
        if os.path.isdir("/proc/self"):
            return False  # procfs works and has no such pid
        try:
            os.kill(self.pid, 0)
        except PermissionError:
            return True
        except OSError:
            return False
        return True


# -- recording -----------------------------------------------------------------------------------


def _empty() -> Values:
    return {name: {} for name in CATALOG}


class Store:
    """One process's samples; with a ``path``, written there by a thread that sleeps until a change."""

    def __init__(self, path: Path | None = None, *, owner: Owner | None = None, delay: float = FLUSH_DELAY) -> None:
        self.path = path
        self.owner = owner or Owner.me()
        self.delay = delay
        self.values = _empty()
        self.lock = threading.Lock()
        self._dirty = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._writer: threading.Thread | None = None
        self._write_lock = threading.Lock()  # the writer thread and close() never write at once
        self._write_error: str | None = None
        if path is not None:
            self.load()

    @property
    def program(self) -> str:
        return self.path.name.removesuffix(SUFFIX) if self.path is not None else ""

    def changed(self) -> None:
        """Called with ``lock`` held, after a value changed: schedule one write for this burst."""
        if self._dirty or self.path is None:
            return
        self._dirty = True
        if self._stop.is_set():
            return  # closed, the process exits: flush() writes it, no thread starts now
        self.start_writer()
        self._wake.set()

    def start_writer(self) -> None:
        """Start the writer thread (asleep until a change) unless it runs: at a program's start,
        so that starting a thread is not on its first task's path (a start waits for the new
        thread to run: a wake-up of the other vCPU, 0.1-0.5 ms here)."""
        if self._writer is None and self.path is not None and not self._stop.is_set():
            self._writer = threading.Thread(target=self._write_loop, name="metrics-writer", daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()  # no timeout: an idle program never wakes for its metrics
            self._stop.wait(self.delay)
            self._wake.clear()
            self.flush()

    def flush(self) -> None:
        """Write the file now, if anything changed; a failure is logged once, never raised."""
        if self.path is None:
            return
        with self._write_lock:
            with self.lock:
                if not self._dirty:
                    return
                self._dirty = False
                data = json.dumps(self._snapshot(), separators=(",", ":")).encode()
            try:
                atomic_write_bytes(self.path, data, durable=False, mode=0o600)
            except OSError as exc:
                with self.lock:
                    self._dirty = True  # the next change tries again
                error = f"cannot write metrics file {self.path}: {exc.strerror or exc}"
                if error != self._write_error:
                    log.warning("%s; the program runs on, its metrics go stale", error, extra={"event": "metrics_file"})
                self._write_error = error
                return
            self._write_error = None

    def close(self) -> None:
        """Stop the writer and write what is left (at exit)."""
        self._stop.set()
        self._wake.set()
        writer, self._writer = self._writer, None
        if writer is not None and writer is not threading.current_thread():
            writer.join(timeout=5)
        self.flush()

    def _snapshot(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "program": self.program,
            "pid": self.owner.pid,
            "start": self.owner.start,
            "boot": self.owner.boot,
            "metrics": {
                name: [[list(key), list(value) if isinstance(value, list) else value] for key, value in series.items()]
                for name, series in self.values.items()
                if series
            },
        }

    def copy(self) -> Values:
        with self.lock:
            return {
                name: {k: list(v) if isinstance(v, list) else v for k, v in s.items()}
                for name, s in self.values.items()
            }

    def load(self) -> None:
        """Continue from this program's last file: its counters and histograms (its gauges were the
        predecessor's). A file that is not ours to trust means starting from zero, with one line."""
        assert self.path is not None
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            remove_temp_files(folder, f"{TEMP_PREFIX}{self.path.name}.")  # left by a SIGKILLed writer
            recorded = read_file(self.path)
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.warning(
                "metrics file %s is unusable (%s); this program's counters start from zero",
                self.path,
                exc,
                extra={"event": "metrics_file"},
            )
            return
        with self.lock:
            for name, series in recorded.values.items():
                if CATALOG[name].kind != "gauge":
                    for key, value in series.items():
                        _add(self.values[name], key, value)


def _add(series: Series, key: Key, value: Any) -> None:
    mine = series.get(key)
    if mine is None:
        series[key] = list(value) if isinstance(value, list) else value
    elif isinstance(mine, list):
        series[key] = [a + b for a, b in zip(mine, value, strict=True)]
    else:
        series[key] = mine + value


class _Family(Generic[Child]):
    """A metric family: its children, one per label values, are what the call sites keep and use."""

    def __init__(self, store: Store, spec: Spec) -> None:
        self.store = store
        self.spec = spec
        self.series = store.values[spec.name]
        self._children: dict[Key, Child] = {}

    def labels(self, *values: object, **named: object) -> Child:
        if named:
            if values or set(named) != set(self.spec.labels):
                raise ValueError(f"{self.spec.name} takes the labels {self.spec.labels}, got {sorted(named)}")
            values = tuple(named[label] for label in self.spec.labels)
        key = tuple(map(str, values))
        child = self._children.get(key)
        if child is None:
            if len(key) != len(self.spec.labels):
                raise ValueError(f"{self.spec.name} takes the labels {self.spec.labels}, got {len(key)} values")
            child = self._children[key] = self._make(key)
        return child

    def _make(self, key: Key) -> Child:
        raise NotImplementedError


class CounterChild:
    __slots__ = ("key", "series", "store")

    def __init__(self, store: Store, series: Series, key: Key) -> None:
        self.store, self.series, self.key = store, series, key

    def inc(self, amount: float = 1.0) -> None:
        if not amount >= 0 or math.isinf(amount):
            raise ValueError(f"a counter only goes up by a finite amount, not {amount}")
        with self.store.lock:
            self.series[self.key] += amount
            self.store.changed()


class GaugeChild:
    __slots__ = ("key", "series", "store")

    def __init__(self, store: Store, series: Series, key: Key) -> None:
        self.store, self.series, self.key = store, series, key

    def set(self, value: float) -> None:
        if not math.isfinite(value):
            return  # never stored: a file holds finite numbers only
        with self.store.lock:
            if self.series.get(self.key) != value:
                self.series[self.key] = float(value)
                self.store.changed()


class HistogramChild:
    __slots__ = ("buckets", "key", "series", "store")

    def __init__(self, store: Store, series: Series, key: Key, buckets: tuple[float, ...]) -> None:
        self.store, self.series, self.key, self.buckets = store, series, key, buckets

    def observe(self, value: float) -> None:
        if not math.isfinite(value):
            return  # one NaN would spoil the sum for good
        with self.store.lock:
            row = self.series[self.key]
            row[bisect.bisect_left(self.buckets, value)] += 1  # the first bound >= value: Prometheus' le
            row[-1] += value
            self.store.changed()


class Counter(_Family[CounterChild]):
    def _make(self, key: Key) -> CounterChild:
        with self.store.lock:
            self.series.setdefault(key, 0.0)  # a counter's series exists, at 0, once it has labels
        return CounterChild(self.store, self.series, key)

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)


class Gauge(_Family[GaugeChild]):
    # A gauge's series exists once it is set: redis_connected must not say 0 before anyone asked.
    def _make(self, key: Key) -> GaugeChild:
        return GaugeChild(self.store, self.series, key)

    def set(self, value: float) -> None:
        self.labels().set(value)


class Histogram(_Family[HistogramChild]):
    def _make(self, key: Key) -> HistogramChild:
        with self.store.lock:
            self.series.setdefault(key, [0.0] * (len(self.spec.buckets) + 2))
        return HistogramChild(self.store, self.series, key, self.spec.buckets)

    def observe(self, value: float) -> None:
        self.labels().observe(value)


class WorkerMetrics:
    """The families a worker's programs record (catalog.py says what each one means)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.task_queue_size = Gauge(store, CATALOG["task_queue_size"])
        self.tasks_completed = Counter(store, CATALOG["tasks_completed"])
        self.task_processing_seconds = Histogram(store, CATALOG["task_processing_seconds"])
        self.activation_latency_seconds = Histogram(store, CATALOG["activation_latency_seconds"])
        self.tasks_dead_lettered = Counter(store, CATALOG["tasks_dead_lettered"])
        self.agent_timeouts = Counter(store, CATALOG["agent_timeouts"])
        self.listener_events = Counter(store, CATALOG["listener_events"])
        self.listener_refused = Counter(store, CATALOG["listener_refused"])
        self.inotify_overflows = Counter(store, CATALOG["inotify_overflows"])
        self.worker_up = Gauge(store, CATALOG["worker_up"])
        self.redis_connected = Gauge(store, CATALOG["redis_connected"])


_store = Store()  # in memory until record_to() gives it a file (tests build programs without one)


@lru_cache(maxsize=1)
def worker_metrics() -> WorkerMetrics:
    """This process's metrics."""
    return WorkerMetrics(_store)


def record_to(run_dir: Path, program: str) -> Store:
    """Give this process's samples their file, and continue from it (a program's start)."""
    if not PROGRAM_NAME.match(program):
        raise ValueError(f"not a program name: {program!r}")
    if _store.path is None:
        _store.path = metrics_folder(run_dir) / f"{program}{SUFFIX}"
        _store.load()
        atexit.register(_store.close)
        _store.start_writer()
    return _store


# -- reading -------------------------------------------------------------------------------------


class Recorded(NamedTuple):
    owner: Owner
    values: Values


def read_file(path: Path) -> Recorded:
    """A program's file, checked field by field; raises OSError or ValueError, whatever it holds."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as file:
        data = file.read(MAX_FILE + 1)
    if len(data) > MAX_FILE:
        raise ValueError(f"over {MAX_FILE} bytes")
    try:
        record = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError("not a metrics file of this version")
    pid, start, boot, metrics = (record.get(field) for field in ("pid", "start", "boot", "metrics"))
    if type(pid) is not int or not isinstance(start, str) or not isinstance(boot, str) or not isinstance(metrics, dict):
        raise ValueError("no pid, start, boot or metrics")
    values = _empty()
    for name, rows in metrics.items():
        spec = CATALOG.get(name)
        if spec is None:
            continue  # a metric of another version: not ours to serve
        if not isinstance(rows, list):
            raise ValueError(f"{name}: not a list")
        for row in rows:
            key, value = _check_row(spec, row)
            if key in values[name]:
                raise ValueError(f"{name}{list(key)}: twice")
            values[name][key] = value
    return Recorded(Owner(pid, start, boot), values)


def _number(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _check_row(spec: Spec, row: Any) -> tuple[Key, Any]:
    if not (isinstance(row, list) and len(row) == 2 and isinstance(row[0], list)):
        raise ValueError(f"{spec.name}: a row is not [labels, value]")
    labels, value = row
    if len(labels) != len(spec.labels) or not all(isinstance(label, str) for label in labels):
        raise ValueError(f"{spec.name}: labels are not {spec.labels}")
    if spec.kind == "histogram":
        if not (isinstance(value, list) and len(value) == len(spec.buckets) + 2 and all(map(_number, value))):
            raise ValueError(f"{spec.name}: not {len(spec.buckets) + 2} numbers")
        if min(value[:-1]) < 0:
            raise ValueError(f"{spec.name}: a negative count")
        return tuple(labels), [float(v) for v in value]
    if not _number(value) or (spec.kind == "counter" and value < 0):
        raise ValueError(f"{spec.name}: not a {'non-negative ' if spec.kind == 'counter' else ''}number")
    return tuple(labels), float(value)


_complaints: set[str] = set()  # each unusable file is logged once per distinct trouble


def merged(folder: Path, *, own: Store | None = None) -> Values:
    """Every program's samples in ``folder``, combined as served: counters and histograms summed
    over all programs, dead or alive; gauges over the live ones only (catalog.Spec.combine).
    ``own`` is the reader's store, taken from memory rather than from its (older) file."""
    sources: list[tuple[bool, Values]] = []
    skip = own.path.name if own is not None and own.path is not None else None
    names: list[str] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(folder) as entries:
        names = sorted(e.name for e in entries if e.name.endswith(SUFFIX) and not e.name.startswith("."))
    for name in names:
        if name == skip:
            continue
        try:
            recorded = read_file(folder / name)
        except FileNotFoundError:
            continue
        except (OSError, ValueError) as exc:
            complaint = f"{folder / name}: {exc}"
            if complaint not in _complaints:
                _complaints.add(complaint)
                log.warning(
                    "metrics file %s is unusable; left out of /metrics", complaint, extra={"event": "metrics_file"}
                )
            continue
        sources.append((recorded.owner.alive(), recorded.values))
    if own is not None:
        sources.append((True, own.copy()))
    total = _empty()
    for alive, values in sources:
        for name, series in values.items():
            spec = CATALOG[name]
            if spec.kind != "gauge":
                for key, value in series.items():
                    _add(total[name], key, value)
            elif alive:
                pick = min if spec.combine == "min" else max
                for key, value in series.items():
                    total[name][key] = pick(total[name].get(key, value), value)
    return total
