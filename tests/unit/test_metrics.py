"""The worker's metrics: names and types, and the multiprocess folder's bookkeeping when programs die.

Programs are simulated in this one process: prometheus_client's value class takes the pid to write
under as a function, so a "dead" program is a pid that cannot exist (above the kernel's maximum).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest, values
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from activation.observability import metrics, multiprocess
from activation.observability.metrics import (
    WorkerMetrics,
    adopt_folder,
    forget_dead_processes,
    multiprocess_registry,
)

NEVER_A_PID = 4_194_305  # above the largest pid_max Linux allows: no process has it, ever

# The table: name, type, labels (the exported name; counters get _total).
TABLE = {
    "task_queue_size": ("gauge", {"worker"}),
    "tasks_completed_total": ("counter", {"worker", "status"}),
    "task_processing_seconds": ("histogram", {"worker", "status"}),
    "activation_latency_seconds": ("histogram", {"worker", "source"}),
    "tasks_dead_lettered_total": ("counter", {"worker", "reason"}),
    "agent_timeouts_total": ("counter", set()),
    "listener_events_total": ("counter", {"source"}),
    "listener_refused_total": ("counter", {"reason"}),
    "inotify_overflows_total": ("counter", set()),
    "redis_connected": ("gauge", set()),
    "worker_up": ("gauge", set()),
}

Served = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A multiprocess folder; prometheus_client's global value class and env are restored after."""
    path = tmp_path / "metrics"
    path.mkdir()
    monkeypatch.setattr(values, "ValueClass", values.ValueClass)
    monkeypatch.setenv(metrics.MULTIPROC_ENV, str(path))
    return path


def program(pid: int) -> WorkerMetrics:
    """The metrics of a program running as ``pid`` (in this process, writing ``<type>_<pid>.db``)."""
    values.ValueClass = values.MultiProcessValue(lambda: pid)  # type: ignore[no-untyped-call]
    return WorkerMetrics(registry=None)


def served(folder: Path) -> Served:
    """What the heartbeat's /metrics would say now, as {(sample name, labels): value}."""
    text = generate_latest(multiprocess_registry(folder)).decode()
    samples: Served = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in samples, f"{key} served twice"
            samples[key] = sample.value
    return samples


def value(samples: Served, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def live_gauge_pids(folder: Path) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[1]) for p in folder.glob("gauge_live*_*.db")}


def test_names_types_and_labels_follow_the_table() -> None:
    worker_metrics = WorkerMetrics(registry=CollectorRegistry())
    every = [m for m in vars(worker_metrics).values() if isinstance(m, MetricWrapperBase)]
    every.append(worker_metrics.redis_connected)
    found = {}
    for metric in every:
        kind = metric._type  # type: ignore[attr-defined]
        name = metric._name + ("_total" if kind == "counter" else "")  # type: ignore[attr-defined]
        found[name] = (kind, set(metric._labelnames))  # type: ignore[attr-defined]
    assert found == TABLE


def test_every_histogram_is_in_seconds_with_sorted_buckets() -> None:
    for buckets in (metrics.LATENCY_BUCKETS, metrics.DURATION_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
    # The latency targets (p50 1.5 ms, p99 5 ms) and the poll interval (1 s) are bucket edges.
    assert {0.0015, 0.005, 1.0} <= set(metrics.LATENCY_BUCKETS)
    assert metrics.DURATION_BUCKETS[-1] >= 3600


def test_redis_connected_is_exported_only_once_a_program_uses_it(folder: Path) -> None:
    program(os.getpid())
    assert value(served(folder), "redis_connected") is None  # a worker without Redis: no false alert
    program(os.getpid()).redis_connected.set(1)
    assert value(served(folder), "redis_connected") == 1


def test_redis_connected_is_zero_when_any_live_program_lost_redis(folder: Path) -> None:
    program(os.getpid()).redis_connected.set(1)
    program(os.getppid()).redis_connected.set(0)  # a live pid: its file is young, so it counts
    assert value(served(folder), "redis_connected") == 0


def test_counters_and_histograms_are_summed_over_programs_dead_or_alive(folder: Path) -> None:
    dead = program(NEVER_A_PID)
    dead.tasks_completed.labels("w1", "completed").inc(2)
    dead.task_processing_seconds.labels("w1", "completed").observe(0.2)
    alive = program(os.getpid())
    alive.tasks_completed.labels("w1", "completed").inc()
    alive.tasks_completed.labels("w1", "failed").inc()
    alive.task_processing_seconds.labels("w1", "completed").observe(7)
    alive.agent_timeouts.inc()
    samples = served(folder)
    assert value(samples, "tasks_completed_total", worker="w1", status="completed") == 3
    assert value(samples, "tasks_completed_total", worker="w1", status="failed") == 1
    assert value(samples, "task_processing_seconds_count", worker="w1", status="completed") == 2
    assert value(samples, "task_processing_seconds_sum", worker="w1", status="completed") == pytest.approx(7.2)
    assert value(samples, "task_processing_seconds_bucket", worker="w1", status="completed", le="0.5") == 1
    assert value(samples, "task_processing_seconds_bucket", worker="w1", status="completed", le="+Inf") == 2
    assert value(samples, "agent_timeouts_total") == 1
    assert (folder / f"counter_{NEVER_A_PID}.db").exists()  # never dropped: the sums must not go back


def test_a_dead_programs_live_gauges_leave_the_sum(folder: Path) -> None:
    killed = program(NEVER_A_PID)  # the heartbeat before its SIGKILL
    killed.worker_up.set(1)
    killed.task_queue_size.labels("w1").set(50)
    restarted = program(os.getpid())
    restarted.worker_up.set(0)  # say, stopping
    restarted.task_queue_size.labels("w1").set(3)
    samples = served(folder)
    assert value(samples, "worker_up") == 0
    assert value(samples, "task_queue_size", worker="w1") == 3
    assert [key for key in samples if key[0] == "task_queue_size"] == [
        ("task_queue_size", frozenset({("worker", "w1")}))
    ]
    assert live_gauge_pids(folder) == {os.getpid()}


def test_forget_dead_processes_keeps_live_programs_and_reports_the_dead(folder: Path) -> None:
    program(os.getpid()).worker_up.set(1)
    program(NEVER_A_PID).worker_up.set(1)
    program(NEVER_A_PID + 1).task_queue_size.labels("w1").set(1)
    (folder / "gauge_livemax_notapid.db").write_bytes(b"")
    assert forget_dead_processes(folder) == [NEVER_A_PID, NEVER_A_PID + 1]
    assert live_gauge_pids_or_junk(folder) == {str(os.getpid()), "notapid"}
    assert forget_dead_processes(folder) == []


def live_gauge_pids_or_junk(folder: Path) -> set[str]:
    return {p.stem.rsplit("_", 1)[1] for p in folder.glob("gauge_live*_*.db")}


def test_a_reused_pid_does_not_keep_a_dead_programs_gauges(folder: Path) -> None:
    # The parent of this test is alive and is no program of ours: it does not map the file.
    reused = os.getppid()
    assert psutil.pid_exists(reused)
    program(reused).task_queue_size.labels("w1").set(50)
    path = next(folder.glob(f"gauge_live*_{reused}.db"))
    assert forget_dead_processes(folder) == []  # young: it may be a program still starting
    old = time.time() - 60
    os.utime(path, (old, old))
    assert forget_dead_processes(folder) == [reused]
    assert not path.exists()


def test_a_live_program_that_maps_its_file_keeps_it_however_old(folder: Path) -> None:
    program(os.getpid()).task_queue_size.labels("w1").set(4)
    path = next(folder.glob(f"gauge_live*_{os.getpid()}.db"))
    old = time.time() - 3600
    os.utime(path, (old, old))
    assert forget_dead_processes(folder) == []
    assert value(served(folder), "task_queue_size", worker="w1") == 4


def test_enable_multiprocess_drops_live_gauges_an_earlier_owner_of_its_pid_left(folder: Path) -> None:
    # A container restart: pids start again, and a new program gets the pid of an old heartbeat.
    earlier = program(os.getpid())
    earlier.task_queue_size.labels("w1").set(50)
    earlier.worker_up.set(1)
    earlier.tasks_completed.labels("w1", "completed").inc(5)
    adopt_folder(folder)  # what enable_multiprocess does besides setting PROMETHEUS_MULTIPROC_DIR
    assert not list(folder.glob(f"gauge_live*_{os.getpid()}.db"))
    now = program(os.getpid())  # the new program (fresh files): a listener that never sets the queue size
    samples = served(folder)
    assert value(samples, "task_queue_size", worker="w1") is None
    assert value(samples, "worker_up") == 0
    now.tasks_completed.labels("w1", "completed").inc()
    assert value(served(folder), "tasks_completed_total", worker="w1", status="completed") == 6


def test_multiprocess_registry_needs_a_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(multiprocess, "_folder", None)
    with pytest.raises(ValueError, match="PROMETHEUS_MULTIPROC_DIR"):
        multiprocess_registry()
    with pytest.raises(ValueError):
        multiprocess_registry(tmp_path / "missing")


def test_mapped_files_of_this_process_include_an_open_metrics_file(folder: Path) -> None:
    program(os.getpid()).worker_up.set(1)
    mapped: Callable[[int], set[str] | None] = metrics._mapped_files
    files = mapped(os.getpid())
    assert files is not None
    assert str(next(folder.glob("gauge_livemax_*.db")).resolve()) in files
    assert mapped(NEVER_A_PID) == set()


def test_enable_multiprocess_refuses_once_prometheus_client_chose_its_value_class(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """prometheus_client is imported in this process already: enabling another folder now would
    silently keep samples in memory, so it refuses instead of patching the library."""
    monkeypatch.delenv(metrics.MULTIPROC_ENV, raising=False)
    with pytest.raises(RuntimeError, match="imported before PROMETHEUS_MULTIPROC_DIR"):
        multiprocess.enable_multiprocess(tmp_path / "metrics")


def test_a_program_started_by_the_cli_writes_its_samples_to_the_run_folder(tmp_path: Path) -> None:
    """The public way, end to end: a fresh interpreter sets the folder before importing the library."""
    import subprocess
    import sys

    folder = tmp_path / "metrics"
    code = (
        "from pathlib import Path; import sys\n"
        "from activation.observability.multiprocess import enable_multiprocess\n"
        f"enable_multiprocess(Path({str(folder)!r}))\n"
        "from activation.observability.metrics import worker_metrics\n"
        "worker_metrics().tasks_completed.labels('w1', 'completed').inc()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert list(folder.glob("counter_*.db"))
    assert value(served(folder), "tasks_completed_total", worker="w1", status="completed") == 1
