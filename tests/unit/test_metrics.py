"""The worker's metrics: names and types, each program's samples file, and what the heartbeat serves.

Programs are simulated by stores in this process, each writing its own file; a "dead" program is
one whose file names a pid that cannot exist (above the kernel's maximum), or this process's pid
with another start time (pid reuse). One test runs real programs, in fresh interpreters.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from activation.observability import catalog, samples
from activation.observability.metrics import render
from activation.observability.samples import Owner, Store, WorkerMetrics, read_file

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
def folder(tmp_path: Path) -> Path:
    return tmp_path / "metrics"


@pytest.fixture
def program(folder: Path) -> Iterator[object]:
    """program(name, owner=None) -> the WorkerMetrics of a program writing <folder>/<name>.json."""
    stores: list[Store] = []

    def start(name: str, owner: Owner | None = None) -> WorkerMetrics:
        store = Store(folder / f"{name}.json", owner=owner, delay=0)
        stores.append(store)
        return WorkerMetrics(store)

    yield start
    for store in stores:
        store.close()


def flush(*programs: WorkerMetrics) -> None:
    for metrics in programs:
        metrics.store.flush()


def served(folder: Path, own: Store | None = None) -> Served:
    """What the heartbeat's /metrics would say now, as {(sample name, labels): value}."""
    text = render(samples.merged(folder, own=own)).decode()
    found: Served = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, frozenset(sample.labels.items()))
            assert key not in found, f"{key} served twice"
            found[key] = sample.value
    return found


def value(found: Served, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def dead() -> Owner:
    return Owner(NEVER_A_PID, "1", samples.BOOT_ID)


def reused() -> Owner:
    """This process's pid, but another process start: what a pid reused in a container looks like."""
    me = Owner.me()
    return Owner(me.pid, str(int(me.start) + 1), me.boot)


def test_names_types_labels_and_help_follow_the_table(folder: Path, program) -> None:
    metrics = program("all")
    for family in (metrics.tasks_completed, metrics.tasks_dead_lettered, metrics.listener_events):
        family.labels(*["x"] * len(family.spec.labels)).inc()
    metrics.agent_timeouts.inc()
    metrics.listener_refused.labels("r").inc()
    metrics.inotify_overflows.inc()
    metrics.task_queue_size.labels("w1").set(1)
    metrics.worker_up.set(1)
    metrics.redis_connected.set(1)
    for family in (metrics.task_processing_seconds, metrics.activation_latency_seconds):
        family.labels("w1", "x").observe(1)
    flush(metrics)
    text = render(samples.merged(folder)).decode()
    found = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {k for s in family.samples for k in s.labels} - {"le"}
        found[name] = (family.type, labels)
        assert family.documentation == catalog.CATALOG[family.name].help
    assert found == TABLE


def test_every_histogram_is_in_seconds_with_sorted_buckets() -> None:
    for buckets in (catalog.LATENCY_BUCKETS, catalog.DURATION_BUCKETS):
        assert list(buckets) == sorted(set(buckets))
    # The latency targets (p50 1.5 ms, p99 5 ms) and the poll interval (1 s) are bucket edges.
    assert {0.0015, 0.005, 1.0} <= set(catalog.LATENCY_BUCKETS)
    assert catalog.DURATION_BUCKETS[-1] >= 3600


def test_histogram_buckets_are_cumulative_with_prometheus_le(folder: Path, program) -> None:
    executor = program("executor")
    latency = executor.activation_latency_seconds.labels("w1", "inotify")
    for seconds in (0.0005, 0.0007, 0.002, 99):  # a value on a bound counts in that bucket (le)
        latency.observe(seconds)
    latency.observe(float("nan"))  # never stored: it would spoil the sum for good
    flush(executor)
    found = served(folder)
    labels = {"worker": "w1", "source": "inotify"}
    assert value(found, "activation_latency_seconds_bucket", le="0.0005", **labels) == 1
    assert value(found, "activation_latency_seconds_bucket", le="0.001", **labels) == 2
    assert value(found, "activation_latency_seconds_bucket", le="0.002", **labels) == 3
    assert value(found, "activation_latency_seconds_bucket", le="30.0", **labels) == 3
    assert value(found, "activation_latency_seconds_bucket", le="+Inf", **labels) == 4
    assert value(found, "activation_latency_seconds_count", **labels) == 4
    assert value(found, "activation_latency_seconds_sum", **labels) == pytest.approx(99.0032)


def test_redis_connected_is_exported_only_once_a_program_uses_it(folder: Path, program) -> None:
    listener = program("listener")
    listener.listener_events.labels("inotify").inc()
    flush(listener)
    found = served(folder)
    assert value(found, "redis_connected") is None  # a worker without Redis: no false alert
    assert value(found, "inotify_overflows_total") == 0  # an unlabelled counter reads 0 from the start
    listener.redis_connected.set(1)
    flush(listener)
    assert value(served(folder), "redis_connected") == 1


def test_redis_connected_is_zero_when_any_live_program_lost_redis(folder: Path, program) -> None:
    listener, executor = program("listener"), program("executor")
    listener.redis_connected.set(1)
    executor.redis_connected.set(0)
    flush(listener, executor)
    assert value(served(folder), "redis_connected") == 0


def test_counters_and_histograms_are_summed_over_programs_dead_or_alive(folder: Path, program) -> None:
    gone = program("old-executor", dead())
    gone.tasks_completed.labels("w1", "completed").inc(2)
    gone.task_processing_seconds.labels("w1", "completed").observe(0.2)
    alive = program("executor")
    alive.tasks_completed.labels("w1", "completed").inc()
    alive.tasks_completed.labels("w1", "failed").inc()
    alive.task_processing_seconds.labels("w1", "completed").observe(7)
    alive.agent_timeouts.inc()
    flush(gone, alive)
    found = served(folder)
    assert value(found, "tasks_completed_total", worker="w1", status="completed") == 3
    assert value(found, "tasks_completed_total", worker="w1", status="failed") == 1
    assert value(found, "task_processing_seconds_count", worker="w1", status="completed") == 2
    assert value(found, "task_processing_seconds_sum", worker="w1", status="completed") == pytest.approx(7.2)
    assert value(found, "task_processing_seconds_bucket", worker="w1", status="completed", le="0.5") == 1
    assert value(found, "task_processing_seconds_bucket", worker="w1", status="completed", le="+Inf") == 2
    assert value(found, "agent_timeouts_total") == 1


@pytest.mark.parametrize("owner", [dead, reused], ids=["dead", "pid-reused"])
def test_a_gone_programs_gauges_leave_what_is_served(folder: Path, program, owner) -> None:
    killed = program("listener", owner())  # its last file before a SIGKILL
    killed.redis_connected.set(0)
    killed.listener_events.labels("inotify").inc(4)
    heartbeat = program("heartbeat")
    heartbeat.worker_up.set(1)
    heartbeat.redis_connected.set(1)
    flush(killed, heartbeat)
    found = served(folder)
    assert value(found, "redis_connected") == 1  # the dead listener's 0 no longer counts
    assert value(found, "listener_events_total", source="inotify") == 4  # its counts stay
    assert value(found, "worker_up") == 1


def test_a_restarted_program_continues_its_counters_but_not_its_gauges(folder: Path, program) -> None:
    first = program("executor", dead())
    first.tasks_completed.labels("w1", "completed").inc(5)
    first.activation_latency_seconds.labels("w1", "rescan").observe(0.01)
    first.redis_connected.set(1)
    flush(first)
    second = program("executor")  # the same file, a new process: it loads what its predecessor wrote
    assert value(served(folder), "redis_connected") is None
    second.tasks_completed.labels("w1", "completed").inc()
    second.activation_latency_seconds.labels("w1", "rescan").observe(0.01)
    flush(second)
    found = served(folder)
    assert value(found, "tasks_completed_total", worker="w1", status="completed") == 6
    assert value(found, "activation_latency_seconds_count", worker="w1", source="rescan") == 2
    assert read_file(folder / "executor.json").owner == Owner.me()


HEAD = b'{"format": 1, "pid": 1, "start": "1", "boot": "", "metrics": '


@pytest.mark.parametrize(
    "content",
    [
        b"{not json",
        b"\xff\xfe",
        b"[]",
        b'{"format": 1}',
        b'{"format": 1, "pid": true, "start": "1", "boot": "", "metrics": {}}',
        HEAD + b'{"tasks_completed": [[["w1"], 3]]}}',
        HEAD + b'{"tasks_completed": [[["w1", "ok"], -3]]}}',
        HEAD + b'{"tasks_completed": [[["a", "b"], NaN]]}}',
        HEAD + b'{"agent_timeouts": [[[], 1], [[], 2]]}}',
        HEAD + b'{"task_processing_seconds": [[["a", "b"], [1]]]}}',
        HEAD + b'{"agent_timeouts": {"x": 1}}}',
        b"[" * 100_000,
        b" " * (samples.MAX_FILE + 1),
    ],
)
def test_a_corrupt_or_hostile_file_means_starting_from_zero_with_one_line(
    folder: Path, program, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    folder.mkdir()
    (folder / "executor.json").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="activation.metrics"):
        executor = program("executor")
    assert [r.getMessage() for r in caplog.records if "start from zero" in r.getMessage()], caplog.text
    assert len(caplog.records) == 1
    executor.tasks_completed.labels("w1", "completed").inc()
    flush(executor)
    assert value(served(folder), "tasks_completed_total", worker="w1", status="completed") == 1


def test_unusable_files_are_left_out_of_what_is_served_and_logged_once(
    folder: Path, program, caplog: pytest.LogCaptureFixture
) -> None:
    executor = program("executor")
    executor.agent_timeouts.inc(2)
    flush(executor)
    (folder / "junk.json").write_text('{"format": 1, "pid": "x"}')
    os.symlink(folder / "executor.json", folder / "link.json")  # never followed: it would count twice
    with caplog.at_level(logging.WARNING, logger="activation.metrics"):
        assert value(served(folder), "agent_timeouts_total") == 2
        assert value(served(folder), "agent_timeouts_total") == 2
    assert len([r for r in caplog.records if "junk.json" in r.getMessage()]) == 1


def test_the_reader_takes_its_own_samples_from_memory(folder: Path, program) -> None:
    heartbeat = program("heartbeat")
    heartbeat.task_queue_size.labels("w1").set(3)  # not written yet
    assert value(served(folder, own=heartbeat.store), "task_queue_size", worker="w1") == 3
    heartbeat.store.flush()
    heartbeat.task_queue_size.labels("w1").set(0)
    assert value(served(folder, own=heartbeat.store), "task_queue_size", worker="w1") == 0  # not its file's 3


def test_labels_must_match_the_catalog(folder: Path, program) -> None:
    metrics = program("listener")
    with pytest.raises(ValueError):
        metrics.tasks_completed.labels("w1")
    with pytest.raises(ValueError):
        metrics.tasks_completed.labels(worker="w1", reason="x")
    with pytest.raises(ValueError):
        metrics.agent_timeouts.inc(-1)
    assert metrics.tasks_dead_lettered.labels(worker="w1", reason="r") is metrics.tasks_dead_lettered.labels("w1", "r")


def test_changes_are_written_by_the_writer_thread_and_the_file_is_not_world_readable(folder: Path) -> None:
    store = Store(folder / "listener.json")  # the programs' delay: a burst shares one write
    try:
        WorkerMetrics(store).listener_events.labels("inotify").inc()
        from tests.conftest import wait_for

        wait_for(lambda: (folder / "listener.json").exists(), 10, 0.01, "the listener's metrics file")
        assert (folder / "listener.json").stat().st_mode & 0o077 == 0
        assert read_file(folder / "listener.json").values["listener_events"] == {("inotify",): 1.0}
    finally:
        store.close()


def test_the_writer_thread_starts_with_the_program_and_sleeps_until_a_change(folder: Path) -> None:
    """Started at the program's start (record_to), not by its first task's first metric: a thread
    start waits for the new thread to run, which would be on that task's path."""
    store = Store(folder / "executor.json")
    try:
        store.start_writer()
        writer = store._writer
        store.start_writer()  # idempotent: one thread
        assert writer is not None and store._writer is writer
        assert writer.name == "metrics-writer" and writer.is_alive()
        assert not (folder / "executor.json").exists()  # nothing changed: nothing written
        WorkerMetrics(store).agent_timeouts.inc()
        from tests.conftest import wait_for

        wait_for(lambda: (folder / "executor.json").exists(), 10, 0.01, "the executor's metrics file")
    finally:
        store.close()
    assert not writer.is_alive()
    store.start_writer()  # a closed store starts no thread again
    assert store._writer is None


def test_a_programs_start_starts_its_metrics_writer(tmp_path: Path) -> None:
    code = (
        "import sys, threading; from pathlib import Path; from activation.observability.samples import record_to; "
        "record_to(Path(sys.argv[1]), 'listener'); print(sorted(t.name for t in threading.enumerate()))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "'metrics-writer'" in out.stdout


def test_real_programs_write_their_files_and_a_killed_ones_gauge_goes(folder: Path) -> None:
    """Fresh interpreters record the way the CLI's programs do (record_to, then the singleton)."""
    run_dir = folder.parent
    code = (
        "import sys, time; from pathlib import Path\n"
        "from activation.observability.samples import record_to, worker_metrics\n"
        f"record_to(Path({str(run_dir)!r}), sys.argv[1])\n"
        "m = worker_metrics()\n"
        "m.tasks_completed.labels('w1', 'completed').inc()\n"
        "m.redis_connected.set(int(sys.argv[2]))\n"
        "assert 'prometheus_client' not in sys.modules\n"
        "print('recorded', flush=True)\n"
        "if sys.argv[3] == 'hang': time.sleep(60)\n"
    )
    subprocess.run([sys.executable, "-c", code, "executor", "1", "exit"], check=True, timeout=60)
    hung = subprocess.Popen([sys.executable, "-c", code, "listener", "0", "hang"], stdout=subprocess.PIPE, text=True)
    try:
        assert hung.stdout is not None and hung.stdout.readline() == "recorded\n"
        from tests.conftest import wait_for

        wait_for(lambda: (folder / "listener.json").exists(), 10, 0.01, "the listener's file")
        found = served(folder)
        assert value(found, "redis_connected") == 0  # the live listener lost Redis
        assert value(found, "tasks_completed_total", worker="w1", status="completed") == 2
    finally:
        hung.send_signal(signal.SIGKILL)
        hung.wait(10)
        if hung.stdout is not None:
            hung.stdout.close()
    found = served(folder)
    assert value(found, "redis_connected") is None  # both gone: no live program says anything
    assert value(found, "tasks_completed_total", worker="w1", status="completed") == 2
    assert json.loads((folder / "executor.json").read_text())["program"] == "executor"
