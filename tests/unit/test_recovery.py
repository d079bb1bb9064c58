"""Recovery on a spool: orphans, stale claims, the dead letter's retry and purge, and their CLI."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from activation.cli.admin import config_group, dlq_group, orchestrator_command, recover_command
from activation.orchestrator import recovery
from activation.orchestrator.liveness import LivenessWatch
from activation.spool import ownership
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool

W = "w1"
SETTINGS: dict[str, Any] = {"orphan_age": 600.0, "stopped_grace": 0.0, "max_attempts": 3}


def beat(spool: Spool, worker: str = W, *, age: float = 0.0, **fields: Any) -> None:
    """A heartbeat file ``age`` seconds old."""
    spool.heartbeats_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        spool.heartbeat_path(worker),
        {"worker": worker, "state": "running", "epoch": time.time() - age, "queue_size": 0, **fields},
    )


def pending(spool: Spool, task_id: str, worker: str = W, **fields: Any) -> Path:
    path = spool.task_path(worker, task_id)
    atomic_write_json(path, {"task_id": task_id, "description": "do it", **fields})
    return path


def claimed(spool: Spool, task_id: str, worker: str = W, **fields: Any) -> Path:
    pending(spool, task_id, worker, **fields)
    claim = spool.claim(worker, task_id)
    assert claim is not None
    return claim


def dead(spool: Spool, task_id: str, *, reason: str = "orphaned", **fields: Any) -> Path:
    """A dead letter as the executor or the orchestrator leaves it: the parsed task kept in the record."""
    claim = claimed(spool, task_id, **fields)
    return spool.dead_letter(claim, reason=reason, detail="for the test", worker=W, task=read_json(claim))


# -- orphans: silence on the watch's own clock --------------------------------------------------


class Ticks:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def ticks() -> Ticks:
    return Ticks()


@pytest.fixture
def watch(spool, ticks) -> LivenessWatch:
    return LivenessWatch(spool, clock=ticks)


def sweep(spool: Spool, watch: LivenessWatch, **overrides: Any) -> list[tuple[str, str]]:
    actions = recovery.recover(spool, **{**SETTINGS, **overrides}, watch=watch)
    return [(a.action, a.task_id) for a in actions]


def test_a_silent_workers_task_is_orphaned_once_the_orphan_age_passed_on_the_watchs_clock(spool, watch, ticks):
    pending(spool, "ancient", created_at="1970-01-01T00:00:00+00:00")
    assert sweep(spool, watch) == []  # the first look: nobody is known to be silent yet
    ticks.now += 599
    assert sweep(spool, watch) == []
    ticks.now += 2
    assert sweep(spool, watch) == [("orphaned", "ancient")]
    record = read_json(spool.dead_letter_path("ancient"))
    assert record["reason"] == "orphaned" and record["worker"] == W
    assert record["task"]["description"] == "do it" and "no sign of life for 601s" in record["detail"]
    assert spool.count_inbox(W) == 0 and spool.claimed_ids(W) == []


def test_a_heartbeat_that_keeps_changing_keeps_the_backlog_whatever_its_timestamps_say(spool, watch, ticks):
    pending(spool, "ancient", created_at="1970-01-01T00:00:00+00:00")
    for stamp in (0.0, 1e10, -5.0, 42.0):  # a worker clock far behind, far ahead, nonsense
        atomic_write_json(spool.heartbeat_path(W), {"worker": W, "state": "running", "epoch": stamp})
        assert sweep(spool, watch) == []
        ticks.now += 500
    assert spool.count_inbox(W) == 1


def test_claims_and_results_changing_are_signs_of_life_too(spool, watch, ticks):
    pending(spool, "waiting")
    sweep(spool, watch)
    for i in range(3):
        ticks.now += 500
        claimed(spool, f"r{i}")  # the executor claims a task and finishes it, between two looks
        spool.write_result(W, {"task_id": f"r{i}", "status": "completed"})
        assert sweep(spool, watch) == []
    ticks.now += 500
    os.unlink(claimed(spool, "vanishing"))  # only the claims folder changed
    assert sweep(spool, watch) == []
    assert spool.count_inbox(W) == 1


def test_a_worker_whose_program_holds_its_lock_is_alive_however_long_it_is_silent(spool, watch, ticks, run_dir):
    pending(spool, "queued")
    lock = ownership.acquire(spool, W, "listener", run_dir)  # a listener: its heartbeat may be dead
    try:
        sweep(spool, watch)
        ticks.now += 10_000
        assert sweep(spool, watch) == []
    finally:
        lock.release()
    assert sweep(spool, watch) == []  # the silence counts from the moment it was last seen alive
    ticks.now += 601
    assert sweep(spool, watch) == [("orphaned", "queued")]


def test_a_cleanly_stopped_worker_keeps_its_backlog_for_the_stopped_grace(spool, watch, ticks):
    beat(spool, W, state="stopped")
    pending(spool, "later")
    sweep(spool, watch, stopped_grace=3600)
    ticks.now += 3599
    assert sweep(spool, watch, stopped_grace=3600) == []
    ticks.now += 2
    assert sweep(spool, watch, stopped_grace=3600) == [("orphaned", "later")]


def test_a_heartbeat_that_restarted_alone_is_not_a_stop(spool, watch, ticks):
    beat(spool, W, state="restarting")
    pending(spool, "later")
    sweep(spool, watch, stopped_grace=3600)
    ticks.now += 601
    assert sweep(spool, watch, stopped_grace=3600) == [("orphaned", "later")]


def test_a_task_that_arrives_for_a_long_silent_worker_waits_its_own_orphan_age(spool, watch, ticks):
    sweep(spool, watch)
    ticks.now += 5000
    pending(spool, "new")
    assert sweep(spool, watch) == []
    ticks.now += 601
    assert sweep(spool, watch) == [("orphaned", "new")]


def test_recoverys_own_moves_are_no_sign_of_life(spool, watch, ticks):
    pending(spool, "a")
    pending(spool, "b")
    sweep(spool, watch)
    ticks.now += 601
    assert sorted(sweep(spool, watch)) == [("orphaned", "a"), ("orphaned", "b")]
    pending(spool, "c")
    sweep(spool, watch)
    ticks.now += 601
    assert sweep(spool, watch) == [("orphaned", "c")]  # silence went on through our own renames


def test_an_unparseable_orphan_is_kept_raw(spool, watch, ticks):
    path = spool.task_path(W, "garbage")
    path.write_bytes(b"\xff\xfe not json")
    sweep(spool, watch)
    ticks.now += 601
    sweep(spool, watch)
    record = read_json(spool.dead_letter_path("garbage"))
    assert record["reason"] == "orphaned" and "task" not in record
    assert Path(record["raw"]).read_bytes() == b"\xff\xfe not json"


class ComesBack(LivenessWatch):
    """A watch that sees the worker write a heartbeat on its ``after``-th look."""

    def __init__(self, spool: Spool, clock: Ticks, after: int) -> None:
        super().__init__(spool, clock=clock)
        self.looks, self.after = 0, after

    def observe(self, worker: str) -> Any:
        self.looks += 1
        if self.looks == self.after:
            beat(self.spool, worker)
        return super().observe(worker)


def test_a_worker_that_comes_back_mid_pass_keeps_the_rest(spool, ticks):
    pending(spool, "a")
    pending(spool, "b")
    watch = ComesBack(spool, ticks, after=5)
    sweep(spool, watch)  # looks 1 and 2
    ticks.now += 601
    # look 3 (recover), 4 (recover_orphans), 5 before moving "a": it is back, so both stay
    assert sweep(spool, watch) == []
    assert spool.count_inbox(W) == 2


def test_a_dry_run_moves_nothing(spool, watch, ticks):
    pending(spool, "ancient")
    claimed(spool, "stuck")
    recovery.recover(spool, **SETTINGS, watch=watch, dry_run=True)
    ticks.now += 601
    actions = recovery.recover(spool, **SETTINGS, watch=watch, dry_run=True)
    assert sorted(a.action for a in actions) == ["orphaned", "requeued"]
    assert spool.count_inbox(W) == 1 and spool.claimed_ids(W) == ["stuck"]
    assert list(spool.dead_letters()) == []


# -- claims: settled only when the executor is provably gone -----------------------------------


def test_a_claim_is_left_alone_while_its_executor_holds_its_lock(spool, watch, ticks, run_dir):
    beat(spool, W, age=10_000)  # a heartbeat as stale as any clock can make it
    claim = claimed(spool, "running", attempts=1, created_at="1970-01-01T00:00:00Z")
    before = claim.read_bytes()
    lock = ownership.acquire(spool, W, "executor", run_dir)
    try:
        ticks.now += 10_000
        assert sweep(spool, watch) == []
        assert claim.read_bytes() == before
    finally:
        lock.release()
    assert sweep(spool, watch) == [("requeued", "running")]
    assert read_json(spool.task_path(W, "running"))["attempts"] == 2


def test_a_gone_executors_claims_are_settled_on_the_first_look(spool, watch):
    claimed(spool, "stuck", attempts=1)
    claimed(spool, "doomed", attempts=2)
    claimed(spool, "finished")
    atomic_write_json(spool.result_path(W, "finished"), {"task_id": "finished", "status": "completed"})
    spool.claim_path(W, "half").write_text("{")
    assert sorted(sweep(spool, watch)) == [
        ("dropped_claim", "finished"),
        ("max_attempts", "doomed"),
        ("put_back", "half"),
        ("requeued", "stuck"),
    ]
    assert spool.claimed_ids(W) == [] and spool.task_path(W, "half").read_text() == "{"
    assert read_json(spool.dead_letter_path("doomed"))["detail"].startswith("w1's executor is gone")


# -- the dead letter ------------------------------------------------------------------------------


def test_retry_round_trip_keeps_the_history(spool):
    dead(spool, "again", attempts=3, metadata={"team": "infra"})
    first = recovery.retry_dead_letter(spool, "again")
    assert first.worker == W and first.path == spool.task_path(W, "again")
    task = read_json(first.path)
    assert task["attempts"] == 0 and task["metadata"] == {"team": "infra"}
    assert [(h["reason"], h["attempts"]) for h in task["history"]] == [("orphaned", 3)]
    assert not spool.dead_letter_path("again").exists()
    # it dies once more and comes back again: both deaths are in its history
    claim = spool.claim(W, "again")
    spool.dead_letter(claim, reason="max_attempts", detail="x", worker=W, task={**read_json(claim), "attempts": 3})
    task = read_json(recovery.retry_dead_letter(spool, "again").path)
    assert [h["reason"] for h in task["history"]] == ["orphaned", "max_attempts"]


def test_a_retried_task_waits_a_whole_orphan_age_from_its_retry(spool, watch, ticks):
    dead(spool, "back", created_at="1970-01-01T00:00:00Z")
    sweep(spool, watch)
    ticks.now += 5000  # the worker has been silent a long time when the operator retries
    recovery.retry_dead_letter(spool, "back")
    assert sweep(spool, watch) == []
    assert spool.count_inbox(W) == 1
    ticks.now += 601
    assert sweep(spool, watch) == [("orphaned", "back")]


def test_a_retry_cut_short_by_a_crash_finishes_on_the_next_try(spool):
    dead(spool, "crashy")
    record = read_json(spool.dead_letter_path("crashy"))
    entry = {k: record.get(k) for k in ("reason", "detail", "dead_at")} | {"attempts": 0}
    atomic_write_json(spool.task_path(W, "crashy"), {**record["task"], "attempts": 0, "history": [entry]})
    recovery.retry_dead_letter(spool, "crashy")
    assert not spool.dead_letter_path("crashy").exists()
    assert len(read_json(spool.task_path(W, "crashy"))["history"]) == 1


def test_raw_dead_letters_and_unknown_ids_cannot_be_retried(spool):
    path = spool.task_path(W, "rawbad")
    path.write_text("not json")
    spool.dead_letter(path, reason="invalid_json", detail="x", worker=W)
    with pytest.raises(recovery.NotRetryable, match="did not parse"):
        recovery.retry_dead_letter(spool, "rawbad")
    with pytest.raises(recovery.UnknownDeadLetter):
        recovery.retry_dead_letter(spool, "nobody")
    with pytest.raises(recovery.UnknownDeadLetter):
        recovery.retry_dead_letter(spool, "../../etc/passwd")


def test_a_dead_letter_whose_task_has_a_result_is_not_retried(spool):
    dead(spool, "done-already")
    atomic_write_json(spool.result_path(W, "done-already"), {"task_id": "done-already"})
    with pytest.raises(recovery.NotRetryable, match="already done"):
        recovery.retry_dead_letter(spool, "done-already")
    assert spool.dead_letter_path("done-already").exists()


def test_purge_removes_old_records_and_their_raw_originals(spool, tmp_path):
    dead(spool, "old-one")
    target = tmp_path / "precious"
    target.write_text("keep me")
    os.symlink(target, spool.task_path(W, "old-link"))
    spool.dead_letter(spool.task_path(W, "old-link"), reason="symlink", detail="x", worker=W)
    assert spool.dead_letter_dir.joinpath("old-link.raw").is_symlink()
    later = time.time() + 8 * 86400
    dead(spool, "new-one")
    for key in ("old-one", "old-link"):
        record = read_json(spool.dead_letter_path(key))
        atomic_write_json(spool.dead_letter_path(key), {**record, "dead_at": "2000-01-01T00:00:00+00:00"})
    assert [d.key for d in recovery.purge_dead_letters(spool, 7 * 86400, dry_run=True)] == ["old-link", "old-one"]
    assert len(list(spool.dead_letters())) == 3
    purged = recovery.purge_dead_letters(spool, 7 * 86400)
    assert sorted(d.key for d in purged) == ["old-link", "old-one"]
    assert [p.stem for p in spool.dead_letters()] == ["new-one"]
    assert not os.path.lexists(spool.dead_letter_dir / "old-link.raw")
    assert target.read_text() == "keep me"  # the symlink went, never its target
    assert [d.key for d in recovery.purge_dead_letters(spool, 7 * 86400, now=later)] == ["new-one"]


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("7d", 7 * 86400), ("12h", 43200), ("30m", 1800), ("90s", 90), ("1h30m", 5400), ("45", 45), ("1.5h", 5400)],
)
def test_durations(text, seconds):
    assert recovery.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "7x", "d", "-5", "7d garbage", "h7"])
def test_bad_durations(text):
    with pytest.raises(ValueError):
        recovery.parse_duration(text)


# -- the CLI ------------------------------------------------------------------------------------


def activation_cli() -> click.Group:
    """cli.py's `main` with this issue's commands added, without changing the real `main`."""
    from activation.cli import Group, main

    commands = {**main.commands}
    for command in (config_group, dlq_group, recover_command, orchestrator_command):
        commands[command.name or ""] = command
    return Group("activation", callback=main.callback, params=main.params, commands=commands)


@pytest.fixture
def cli(spool, monkeypatch):
    monkeypatch.setenv("ACTIVATION_SPOOL", str(spool.root))

    def run(*args: str) -> Any:
        return CliRunner().invoke(activation_cli(), list(args))

    return run


def test_dlq_commands_list_show_retry_and_purge(cli, spool):
    dead(spool, "one")
    dead(spool, "two", reason="max_attempts")
    listed = cli("dlq", "list", "--json")
    assert listed.exit_code == 0, listed.output
    assert [(d["id"], d["reason"], d["retryable"]) for d in json.loads(listed.output)] == [
        ("one", "orphaned", True),
        ("two", "max_attempts", True),
    ]
    assert "one" in cli("dlq", "list").output
    shown = cli("dlq", "show", "two", "--json")
    assert json.loads(shown.output)["reason"] == "max_attempts"
    assert cli("dlq", "show", "three").exit_code == 1
    retried = cli("dlq", "retry", "one")
    assert retried.exit_code == 0 and "one back in w1's inbox" in retried.output
    everything = cli("dlq", "retry", "--all", "--json")
    assert [r["task_id"] for r in json.loads(everything.output)["retried"]] == ["two"]
    assert spool.count_inbox(W) == 2 and cli("dlq", "list").output.strip() == "no dead letters"
    dead(spool, "three")
    assert cli("dlq", "purge", "--older-than", "7d").output.strip() == "0 dead letters deleted"
    purged = cli("dlq", "purge", "--older-than", "0s", "--json")
    assert [d["id"] for d in json.loads(purged.output)["purged"]] == ["three"]


def test_dlq_errors_are_one_line_and_non_zero(cli, spool):
    path = spool.task_path(W, "rawbad")
    path.write_text("nope")
    spool.dead_letter(path, reason="invalid_json", detail="x", worker=W)
    for args, message in [
        (("dlq", "retry", "rawbad"), "cannot be retried"),
        (("dlq", "retry"), "give one dead letter ID or --all"),
        (("dlq", "retry", "x", "--all"), "give one dead letter ID or --all"),
        (("dlq", "purge", "--older-than", "soon"), "--older-than"),
        (("dlq", "show", "missing"), "no dead letter"),
    ]:
        result = cli(*args)
        assert result.exit_code != 0, args
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_recover_command_settles_gone_executors_claims_and_never_orphans(cli, spool):
    pending(spool, "ancient", created_at="1970-01-01T00:00:00Z")
    claimed(spool, "stuck", attempts=1)
    dry = cli("recover", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert [(a["action"], a["task_id"]) for a in json.loads(dry.output)["actions"]] == [("requeued", "stuck")]
    assert spool.claimed_ids(W) == ["stuck"]
    real = cli("recover")
    assert real.exit_code == 0 and "1 task recovered" in real.output
    assert read_json(spool.task_path(W, "stuck"))["attempts"] == 2
    assert spool.count_inbox(W) == 2 and list(spool.dead_letters()) == []  # one look cannot see silence
