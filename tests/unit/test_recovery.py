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
from activation.clock import iso_now
from activation.orchestrator import recovery
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool

W = "w1"
SETTINGS = {"orphan_age": 600.0, "heartbeat_timeout": 30.0, "max_attempts": 3}


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


# -- orphans ------------------------------------------------------------------------------------


def test_a_1970_task_for_a_worker_without_heartbeat_is_orphaned(spool):
    pending(spool, "ancient", created_at="1970-01-01T00:00:00+00:00")
    actions = recovery.recover(spool, **SETTINGS)
    assert [(a.action, a.task_id) for a in actions] == [("orphaned", "ancient")]
    record = read_json(spool.dead_letter_path("ancient"))
    assert record["reason"] == "orphaned" and record["worker"] == W
    assert record["task"]["description"] == "do it"
    assert spool.count_inbox(W) == 0 and spool.claimed_ids(W) == []


def test_live_workers_and_young_tasks_keep_their_pending_tasks(spool):
    spool.init(["w2"])
    beat(spool, W)
    pending(spool, "ancient-live", created_at="1970-01-01T00:00:00+00:00")
    pending(spool, "young", "w2", created_at=iso_now())
    assert recovery.recover(spool, **SETTINGS) == []
    assert spool.count_inbox(W) == 1 and spool.count_inbox("w2") == 1


def test_without_created_at_the_age_comes_from_the_mtime(spool):
    path = pending(spool, "no-stamp")
    os.utime(path, (time.time() - 700, time.time() - 700))
    pending(spool, "no-stamp-young")
    actions = recovery.recover(spool, **SETTINGS)
    assert [a.task_id for a in actions] == ["no-stamp"]


def test_an_unparseable_orphan_is_kept_raw(spool):
    path = spool.task_path(W, "garbage")
    path.write_bytes(b"\xff\xfe not json")
    os.utime(path, (1, 1))
    recovery.recover(spool, **SETTINGS)
    record = read_json(spool.dead_letter_path("garbage"))
    assert record["reason"] == "orphaned" and "task" not in record
    assert Path(record["raw"]).read_bytes() == b"\xff\xfe not json"


def test_a_stale_heartbeat_counts_as_no_heartbeat(spool):
    beat(spool, W, age=100)
    pending(spool, "old", created_at="2000-01-01T00:00:00Z")
    assert [a.action for a in recovery.recover(spool, **SETTINGS)] == ["orphaned"]


# -- stale claims -------------------------------------------------------------------------------


def test_a_stale_claim_is_requeued_with_attempts_plus_one(spool):
    beat(spool, W, age=100)
    claimed(spool, "stuck", attempts=1, created_at=iso_now())
    actions = recovery.recover(spool, **SETTINGS)
    assert [(a.action, a.task_id) for a in actions] == [("requeued", "stuck")]
    assert read_json(spool.task_path(W, "stuck"))["attempts"] == 2
    assert spool.claimed_ids(W) == []


def test_a_stale_claim_at_max_attempts_goes_to_the_dead_letter(spool):
    claimed(spool, "doomed", attempts=2, created_at=iso_now())
    actions = recovery.recover(spool, **SETTINGS)
    assert [a.action for a in actions] == ["max_attempts"]
    record = read_json(spool.dead_letter_path("doomed"))
    assert record["reason"] == "max_attempts" and record["task"]["attempts"] == 3
    assert spool.count_inbox(W) == 0


def test_a_stale_claim_with_a_result_is_dropped(spool):
    claimed(spool, "finished", created_at=iso_now())
    atomic_write_json(spool.result_path(W, "finished"), {"task_id": "finished", "status": "completed"})
    assert [a.action for a in recovery.recover(spool, **SETTINGS)] == ["dropped_claim"]
    assert spool.claimed_ids(W) == [] and spool.count_inbox(W) == 0
    assert spool.has_result(W, "finished")


def test_a_live_workers_claim_is_never_touched(spool):
    beat(spool, W)
    claim = claimed(spool, "running", created_at="1970-01-01T00:00:00Z")
    before = claim.read_bytes()
    assert recovery.recover(spool, **SETTINGS) == []
    assert claim.read_bytes() == before


def test_an_unparseable_stale_claim_goes_back_unchanged_for_the_listener(spool):
    spool.claim_path(W, "half").write_text("{")
    assert [a.action for a in recovery.recover(spool, **SETTINGS)] == ["put_back"]
    assert spool.task_path(W, "half").read_text() == "{"


def test_a_dry_run_moves_nothing(spool):
    pending(spool, "ancient", created_at="1970-01-01T00:00:00Z")
    claimed(spool, "stuck", created_at=iso_now())
    actions = recovery.recover(spool, **SETTINGS, dry_run=True)
    assert sorted(a.action for a in actions) == ["orphaned", "requeued"]
    assert spool.count_inbox(W) == 1 and spool.claimed_ids(W) == ["stuck"]
    assert list(spool.dead_letters()) == []


def test_a_worker_that_comes_back_mid_pass_keeps_the_rest(spool):
    pending(spool, "a", created_at="1970-01-01T00:00:00Z")
    pending(spool, "b", created_at="1970-01-01T00:00:00Z")
    answers = iter([False, False, True])  # dead when listed, dead for "a", alive again for "b"
    actions = recovery.recover_orphans(spool, orphan_age=600, alive=lambda w: next(answers, True))
    assert len(actions) == 1 and spool.count_inbox(W) == 1


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


def test_a_retried_task_waits_an_orphan_age_from_its_retry_not_its_birth(spool):
    dead(spool, "back", created_at="1970-01-01T00:00:00Z")
    recovery.retry_dead_letter(spool, "back")
    assert recovery.recover(spool, **SETTINGS) == []
    assert spool.count_inbox(W) == 1
    later = time.time() + 601
    assert [a.task_id for a in recovery.recover(spool, **SETTINGS, now=later)] == ["back"]


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


def test_recover_command_with_and_without_dry_run(cli, spool):
    pending(spool, "ancient", created_at="1970-01-01T00:00:00Z")
    dry = cli("recover", "--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    assert [a["action"] for a in json.loads(dry.output)["actions"]] == ["orphaned"]
    assert spool.count_inbox(W) == 1
    real = cli("recover")
    assert real.exit_code == 0 and "1 task recovered" in real.output
    assert read_json(spool.dead_letter_path("ancient"))["reason"] == "orphaned"
