import json
import os
import time

from click.testing import CliRunner

from activation.cli import main
from activation.clock import iso_now
from activation.spool import ownership
from activation.spool.atomic import atomic_write_json
from activation.spool.audit import audit

W = "w1"


def task(spool, task_id, where="inbox"):
    path = {"inbox": spool.task_path, "claim": spool.claim_path, "result": spool.result_path}[where](W, task_id)
    atomic_write_json(path, {"task_id": task_id, "description": "x"}, durable=False)


def beat(spool, age=0.0):
    atomic_write_json(spool.heartbeat_path(W), {"worker": W, "epoch": time.time() - age, "timestamp": iso_now()})


def live_executor(spool, run_dir):
    """The worker's executor, as far as the audit can tell: its lock is held."""
    return ownership.acquire(spool, W, "executor", run_dir, wait=0)


def kinds(violations):
    return sorted((v.kind, v.task_id or "") for v in violations)


def test_a_clean_spool_has_no_violations(spool, run_dir):
    lock = live_executor(spool, run_dir)
    task(spool, "a")
    task(spool, "b", "claim")
    task(spool, "c", "result")
    try:
        assert audit(spool, heartbeat_timeout=30, temp_age=600) == []
    finally:
        lock.release()


def test_a_task_in_two_places_is_a_violation(spool):
    task(spool, "a")
    task(spool, "a", "result")
    assert kinds(audit(spool, heartbeat_timeout=30, temp_age=600)) == [("duplicate", "a")]


def test_a_result_with_a_leftover_claim_is_allowed(spool):
    beat(spool)
    task(spool, "a", "claim")
    task(spool, "a", "result")
    assert audit(spool, heartbeat_timeout=30, temp_age=600) == []


def test_a_claim_of_a_dead_worker(spool):
    beat(spool)  # a fresh heartbeat is no proof: the executor's lock is free, so it is gone
    task(spool, "a", "claim")
    assert kinds(audit(spool, heartbeat_timeout=30, temp_age=600)) == [("dead_worker_claim", "a")]


def test_a_stale_temp_file(spool):
    tmp = spool.inbox(W) / ".tmp_x.json.1234"
    tmp.write_text("{")
    os.utime(tmp, (time.time() - 3600, time.time() - 3600))
    (spool.inbox(W) / ".tmp_fresh.json.1").write_text("{")
    violations = audit(spool, heartbeat_timeout=30, temp_age=600)
    assert [v.kind for v in violations] == ["stale_temp"] and ".tmp_x.json.1234" in violations[0].detail


def test_a_dead_letter_without_a_reason(spool):
    atomic_write_json(spool.dead_letter_path("d"), {"task_id": "d", "reason": ""})
    spool.dead_letter_path("e").write_text("not json")
    assert kinds(audit(spool, heartbeat_timeout=30, temp_age=600)) == [
        ("dead_letter_without_reason", ""),
        ("dead_letter_without_reason", "d"),
    ]


def test_the_cli_exits_1_and_prints_each_violation(spool):
    task(spool, "a")
    task(spool, "a", "result")
    runner = CliRunner()
    failed = runner.invoke(main, ["--spool", str(spool.root), "audit", "--json"])
    assert failed.exit_code == 1
    assert json.loads(failed.stdout)[0]["kind"] == "duplicate"
    os.unlink(spool.task_path(W, "a"))
    clean = runner.invoke(main, ["--spool", str(spool.root), "audit"])
    assert clean.exit_code == 0 and "0 violation(s)" in clean.output
