"""The bench's pure helpers: percentiles, ratios and how they print, the raw inotify reader, sizes."""

import os

import pytest

from benchmarks import floor
from benchmarks.history import label, parse_sizes
from benchmarks.stats import ms, percentile, ratio, summary, times, verdict


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 0) == 1
    assert percentile([4, 1, 3, 2], 100) == 4
    assert percentile(list(range(101)), 99) == 99
    assert percentile([10, 20], 25) == 12.5


def test_percentile_of_one_value_is_that_value():
    assert percentile([7.5], 99) == 7.5


def test_percentile_refuses_no_values_and_out_of_range():
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary_names_every_figure():
    s = summary([1.0, 2.0, 3.0, 4.0, 100.0])
    assert s["n"] == 5
    assert s["p50"] == 3.0
    assert s["max"] == 100.0
    assert s["mean"] == 22.0
    assert s["p99"] == pytest.approx(96.16)


def test_ratio_is_none_without_a_positive_floor():
    assert ratio(3.0, 1.5) == 2.0
    assert ratio(3.0, 0.0) is None
    assert ratio(None, 1.0) is None
    assert ratio(1.0, None) is None
    assert ratio(float("nan"), 1.0) is None


def test_times_prints_significant_digits_by_magnitude():
    assert times(8.523, 1.0) == "8.52x"
    assert times(0.43, 1.0) == "0.43x"
    assert times(14.26, 1.0) == "14.3x"
    assert times(142.4, 1.0) == "142x"
    assert times(1.0, 0.0) == "n/a"


def test_ms_and_verdict():
    assert ms(0.0213) == "0.021 ms"
    assert ms(1.683) == "1.68 ms"
    assert ms(25.04) == "25.0 ms"
    assert ms(254.4) == "254 ms"
    assert ms(None) == "n/a"
    assert (verdict(True), verdict(False), verdict(None)) == ("met", "NOT met", "n/a")


def test_the_raw_inotify_reader_sees_a_rename_into_its_folder(tmp_path):
    watch = floor.Inotify(tmp_path)
    try:
        (tmp_path / ".tmp_x").write_text("{}")
        os.rename(tmp_path / ".tmp_x", tmp_path / "x.json")
        events = watch.read()
    finally:
        watch.close()
    assert [(mask & floor.IN_MOVED_TO, name) for mask, name in events] == [(floor.IN_MOVED_TO, "x.json")]


def test_inotify_delivery_gives_one_sample_per_rename_and_cleans_up(tmp_path):
    delays = floor.inotify_delivery(tmp_path, 5)
    assert len(delays) == 5
    assert all(d > 0 for d in delays)
    assert os.listdir(tmp_path) == []


def test_the_raw_inotify_reader_refuses_a_missing_folder(tmp_path):
    with pytest.raises(OSError):
        floor.Inotify(tmp_path / "absent")


def test_history_sizes_parse_and_label():
    assert parse_sizes("100k, 1k,10k,1m") == [1_000, 10_000, 100_000, 1_000_000]
    assert parse_sizes("2500") == [2500]
    assert [label(s) for s in (1_000, 10_000, 1_000_000, 2500)] == ["1k", "10k", "1M", "2500"]
    with pytest.raises(ValueError):
        parse_sizes("0")
    with pytest.raises(ValueError):
        parse_sizes("")


def test_percentile_is_monotonic_in_q_and_within_the_values():
    import random

    rng = random.Random(15)
    for _ in range(200):
        values = [rng.uniform(-1e3, 1e3) for _ in range(rng.randint(1, 40))]
        figures = [percentile(values, q) for q in range(0, 101, 5)]
        assert figures == sorted(figures)
        assert min(values) == figures[0]
        assert max(values) == figures[-1]


def test_reclaim_counts_the_lease_from_the_holders_last_renewal():
    from benchmarks.streams_figures import reclaim

    # Renewed 1 s before the kill: the 5 s lease ran out 4 s after it; the agent started 4.25 s after.
    r = reclaim(5.0, 1000.0, killed_at=100.0, started_at=104.25)
    assert r["kill_to_start_s"] == pytest.approx(4.25)
    assert r["expiry_after_kill_s"] == pytest.approx(4.0)
    assert r["past_expiry_s"] == pytest.approx(0.25)
    assert r["bound_s"] == 6.0
    assert r["within"] is True


def test_reclaim_past_the_lease_plus_a_second_is_not_within_and_a_lapsed_lease_expires_at_the_kill():
    from benchmarks.streams_figures import reclaim

    late = reclaim(5.0, 0.0, killed_at=0.0, started_at=6.5)
    assert late["within"] is False
    lapsed = reclaim(2.0, 3000.0, killed_at=0.0, started_at=0.5)
    assert lapsed["expiry_after_kill_s"] == 0.0
    assert lapsed["past_expiry_s"] == pytest.approx(0.5)


def test_scaling_is_each_replica_counts_rate_over_one_replicas():
    from benchmarks.streams_figures import scaling

    got = scaling({"1": {"tasks_per_s": 50.0}, "2": {"tasks_per_s": 90.0}, "4": {"tasks_per_s": 100.0}})
    assert got == {"1": 1.0, "2": 1.8, "4": 2.0}
    assert scaling({"2": {"tasks_per_s": 90.0}}) == {"2": None}


def test_memory_gives_the_growth_per_result_and_none_without_results():
    from benchmarks.streams_figures import memory

    m = memory(1_000_000, 4_000_000, 1000)
    assert m["grown_bytes"] == 3_000_000
    assert m["per_result_bytes"] == 3000.0
    assert memory(10, 10, 0)["per_result_bytes"] is None


def _streams_run(**streams):
    floor = {"activation_floor_ms": 0.5}
    return {"floor": floor, "streams": streams}


def test_the_report_says_why_streams_were_not_measured():
    from benchmarks.report import streams

    lines = streams(_streams_run(status="not measured: probe 7 needs root to create network namespaces"))
    assert len(lines) == 1 and "needs root" in lines[0]


def test_the_report_puts_each_streams_figure_beside_its_target():
    from benchmarks.report import streams
    from benchmarks.streams_figures import memory, reclaim

    lat = {"n": 3, "p50": 1.5, "p95": 3.0, "p99": 4.0, "max": 4.0, "mean": 2.0}
    files = {**lat, "p50": 1.0, "p99": 2.0}
    run = {"tasks": 10, "tasks_per_s": 40.0, "lost": 0, "extra": 0}
    lines = streams(
        _streams_run(
            status="measured",
            lease_s=5.0,
            hosts={"redis": "a", "dispatcher": "b", "worker-1": "c"},
            latency=lat,
            latency_everysec={**lat, "p50": 0.75, "p99": 2.0},
            latency_local={**lat, "p50": 1.0},
            latency_transport={**lat, "p50": 0.5},
            files_inotify=files,
            files_inotify_from="latency probe",
            throughput={"1": run, "2": {**run, "tasks_per_s": 80.0, "lost": 1}},
            scaling={"1": 1.0, "2": 2.0},
            reclaim=[reclaim(5.0, 1000.0, 0.0, 7.0)],
            memory={**memory(0, 2**20, 10), "tasks_left": 0},
        )
    )
    text = "\n".join(lines)
    assert "1 worker hosts" in text and "lease 5 s" in text
    xadd = next(line for line in lines if "XADD -> agent started, p50" in line)
    assert "1.50x files" in xadd and "<= 2 ms" in xadd and xadd.endswith("met")
    everysec = next(line for line in lines if "appendfsync everysec" in line)
    assert "0.750 ms / 2.00 ms" in everysec and "0.50x always" in everysec
    local = next(line for line in lines if "taken -> agent started" in line)
    assert "XADD -> taken p50 0.500 ms" in local
    one, two = (line for line in lines if "tasks to" in line)
    assert one.endswith(" met") and "1.00x 1 replica" in one
    assert two.endswith("NOT met") and "2.00x 1 replica" in two
    reclaimed = next(line for line in lines if "reclaim #1" in line)
    assert "7000 ms" in reclaimed and "3000 ms past lease expiry" in reclaimed and reclaimed.endswith("NOT met")
    assert "104858 B/result" in text


def _profiled_step(n: int) -> int:
    return sum(range(n))


def test_the_profile_probe_sums_a_steps_cumulative_time_and_calls_from_pstats(tmp_path):
    import cProfile
    import pstats

    from benchmarks.profile_path import cumulative_ms

    profile = cProfile.Profile()
    profile.enable()
    for _ in range(3):
        _profiled_step(10_000)
    profile.disable()
    stats = pstats.Stats(profile)
    total, calls = cumulative_ms(stats, ("tests/unit/test_bench_helpers.py", "_profiled_step"))
    assert calls == 3 and total > 0
    assert cumulative_ms(stats, ("elsewhere.py", "_profiled_step")) == (0.0, 0)


def test_idle_cpu_is_schedstats_nanoseconds_while_the_threads_stay_and_ticks_when_one_ends():
    import threading
    import time

    import psutil

    from benchmarks import idle

    def spin(seconds: float) -> None:
        # On the thread's own CPU clock: a loaded machine stretches the wall time, not this.
        until = time.thread_time() + seconds
        while time.thread_time() < until:
            pass

    window = idle._Window(psutil.Process())
    spin(0.05)
    used, precise = window.seconds()
    assert precise and 0.04 <= used < 1

    window = idle._Window(psutil.Process())
    worker = threading.Thread(target=spin, args=(0.2,))
    worker.start()
    worker.join()
    used, precise = window.seconds()
    assert not precise and used >= 0.15  # the ended thread's time is in the ticks, not lost
    assert idle._run_times(2**22 + 12345) is None  # no such process: no figure, not a zero
