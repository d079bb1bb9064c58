"""Adaptive dispatch: each rule of `decide`, and the metrics window's incremental refresh."""

from __future__ import annotations

import datetime as dt
import json
import time

import pytest

from activation.orchestrator.adaptive import RESPONSE_WINDOW, Decision, ResultWindow, Snapshot, Thresholds, decide
from activation.spool.layout import Spool

W = "w1"
THRESHOLDS = Thresholds(response_time_ms=500, task_rate_per_min=10, queue_size=5)


def iso(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat()


def write_results(spool: Spool, worker: str, count: int, response_ms: float, prefix: str = "r") -> None:
    """``count`` results whose finished_at - created_at is ``response_ms`` (plain writes: fast)."""
    folder = spool.results(worker)
    folder.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for i in range(count):
        task_id = f"{prefix}{i:06d}"
        created = iso(now - response_ms / 1000)
        result = {"task_id": task_id, "status": "completed", "created_at": created, "finished_at": iso(now)}
        (folder / f"{task_id}.json").write_text(json.dumps(result))


# -- decide: one test per rule ---------------------------------------------------------------


@pytest.mark.parametrize("mode", ["files", "events"])
def test_a_fixed_mode_ignores_every_metric(mode):
    busy = Snapshot(avg_response_time_ms=10_000, response_samples=100, task_rate_per_min=999, queue_sizes={W: 99})
    decision = decide(mode, busy, THRESHOLDS, W)
    assert decision == Decision(mode, "mode", f"ORCHESTRATOR_MODE is {mode}")


def test_auto_slow_responses_choose_events():
    decision = decide("auto", Snapshot(avg_response_time_ms=501, response_samples=3), THRESHOLDS)
    assert (decision.transport, decision.rule) == ("events", "response_time")
    assert "501 ms" in decision.detail and "last 3 results" in decision.detail


def test_auto_high_task_rate_chooses_events():
    decision = decide("auto", Snapshot(avg_response_time_ms=20, task_rate_per_min=11), THRESHOLDS)
    assert (decision.transport, decision.rule) == ("events", "task_rate")


def test_auto_a_long_queue_chooses_events_for_that_worker_only():
    snapshot = Snapshot(queue_sizes={W: 6, "w2": 1})
    assert decide("auto", snapshot, THRESHOLDS, W).rule == "queue_size"
    assert decide("auto", snapshot, THRESHOLDS, W).transport == "events"
    assert decide("auto", snapshot, THRESHOLDS, "w2") == Decision("files", "default", "no rule for events fired")
    overall = decide("auto", snapshot, THRESHOLDS)  # no worker: the longest queue counts
    assert (overall.transport, overall.rule) == ("events", "queue_size") and "w1's queue of 6" in overall.detail


def test_auto_development_chooses_files():
    development = Thresholds(node_env="development")
    assert decide("auto", Snapshot(), development) == Decision("files", "development", "NODE_ENV is development")


def test_auto_defaults_to_files():
    assert decide("auto", Snapshot(), THRESHOLDS).rule == "default"
    assert decide("auto", Snapshot(), THRESHOLDS).transport == "files"


def test_thresholds_must_be_exceeded_not_just_reached():
    at_limit = Snapshot(avg_response_time_ms=500, response_samples=1, task_rate_per_min=10, queue_sizes={W: 5})
    assert decide("auto", at_limit, THRESHOLDS, W).rule == "default"


def test_rules_apply_in_the_seeds_order():
    everything = Snapshot(avg_response_time_ms=900, response_samples=1, task_rate_per_min=50, queue_sizes={W: 50})
    assert decide("auto", everything, Thresholds(node_env="development"), W).rule == "response_time"
    assert decide("auto", Snapshot(task_rate_per_min=50, queue_sizes={W: 50}), THRESHOLDS, W).rule == "task_rate"


# -- the window --------------------------------------------------------------------------------


def test_response_time_is_the_mean_of_the_newest_100(spool):
    write_results(spool, W, 50, 2000, prefix="old")
    time.sleep(0.05)  # the newer batch gets later ctimes, even on a coarse filesystem clock
    write_results(spool, W, RESPONSE_WINDOW, 100, prefix="new")
    window = ResultWindow(spool)
    window.refresh()
    snapshot = window.snapshot()
    assert snapshot.response_samples == RESPONSE_WINDOW
    assert snapshot.avg_response_time_ms == pytest.approx(100, abs=1)
    assert snapshot.task_rate_per_min == 150


def test_rate_counts_only_the_last_minute(spool):
    clock = {"offset": 0}
    window = ResultWindow(spool, clock_ns=lambda: time.time_ns() + clock["offset"])
    write_results(spool, W, 12, 10)
    window.refresh()
    assert window.snapshot().task_rate_per_min == 12
    clock["offset"] = 61 * 1_000_000_000  # a minute later, nothing new
    window.refresh()
    snapshot = window.snapshot()
    assert snapshot.task_rate_per_min == 0
    assert snapshot.response_samples == 12  # response times are the last 100, however old


def test_results_of_every_worker_count_and_bad_files_do_no_harm(spool):
    write_results(spool, W, 3, 1000)
    write_results(spool, "w2", 3, 3000)
    (spool.results(W) / "broken.json").write_text("{not json")
    (spool.results(W) / "list.json").write_text("[1, 2]")
    (spool.results(W) / ".tmp_x.json.abcd").write_text("{}")  # a write in progress, not a result
    window = ResultWindow(spool)
    window.refresh()
    snapshot = window.snapshot({W: 2})
    assert snapshot.task_rate_per_min == 8
    assert snapshot.avg_response_time_ms == pytest.approx(2000, abs=5)
    assert snapshot.queue_sizes == {W: 2}


def test_a_refresh_reads_only_new_results_in_a_spool_of_20k(spool):
    write_results(spool, W, 20_000, 5)
    window = ResultWindow(spool)
    window.refresh()
    assert window.reads == RESPONSE_WINDOW  # the newest 100 of 20k, never the rest
    assert window.snapshot().task_rate_per_min == 20_000
    time.sleep(0.05)  # later ctimes than the 20k, even on a coarse filesystem clock
    write_results(spool, W, 7, 900, prefix="later")
    window.refresh()
    assert window.reads == RESPONSE_WINDOW + 7
    window.refresh()
    assert window.reads == RESPONSE_WINDOW + 7  # nothing new, nothing read
    snapshot = window.snapshot()
    assert snapshot.task_rate_per_min == 20_007
    assert snapshot.avg_response_time_ms == pytest.approx((93 * 5 + 7 * 900) / 100, abs=1)


def test_an_unchanged_old_folder_is_not_even_listed(spool, monkeypatch):
    write_results(spool, W, 5, 10)
    window = ResultWindow(spool, clock_ns=lambda: time.time_ns() + 10 * 1_000_000_000)
    window.refresh()
    listed = []
    real_scandir = __import__("os").scandir

    def counting_scandir(path):
        listed.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr("activation.orchestrator.adaptive.os.scandir", counting_scandir)
    window.refresh()
    assert str(spool.results(W)) not in listed
    assert window.snapshot().task_rate_per_min == 5


def test_a_result_older_than_those_held_still_counts_and_expires_in_its_turn(spool):
    clock = {"offset": 0}
    window = ResultWindow(spool, clock_ns=lambda: time.time_ns() + clock["offset"])
    write_results(spool, "w2", 2, 10, prefix="early")
    time.sleep(0.05)  # later ctimes for the next batch, even on a coarse filesystem clock
    write_results(spool, W, 3, 10, prefix="late")
    window.refresh([W])
    window.refresh(["w2"])  # found after newer ones: the window stays in time order
    assert window.snapshot().task_rate_per_min == 5
    early = max(p.stat().st_ctime_ns for p in spool.results("w2").iterdir())
    late = min(p.stat().st_ctime_ns for p in spool.results(W).iterdir())
    clock["offset"] = 60 * 1_000_000_000 + (early + late) // 2 - time.time_ns()  # the early ones' minute is over
    assert window.snapshot().task_rate_per_min == 3
