import json
import os
import time
from pathlib import Path

import pytest

from activation.clock import parse_iso
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool

W = "w1"


def put(spool: Spool, task_id: str, **fields):
    atomic_write_json(spool.task_path(W, task_id), {"task_id": task_id, "description": "x", **fields})


def test_init_creates_the_layout(tmp_path):
    spool = Spool(tmp_path)
    spool.init(["a", "b"])
    for path in ("tasks/a/.processing", "tasks/b", "results/a", "results/b", "heartbeats", "tasks/.dead_letter"):
        assert (tmp_path / path).is_dir(), path
    assert spool.workers() == ["a", "b"]


def test_atomic_write_leaves_no_temp_file_and_never_a_partial_one(tmp_path):
    target = tmp_path / "x.json"
    atomic_write_json(target, {"a": 1})
    assert read_json(target) == {"a": 1}
    assert os.listdir(tmp_path) == ["x.json"]

    class Boom(Exception):
        pass

    class Exploding:
        def __iter__(self):
            raise Boom

    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "y.json", Exploding())
    assert os.listdir(tmp_path) == ["x.json"]


def test_inbox_is_fifo_by_arrival(spool):
    for name in ("c", "a", "b"):
        put(spool, name)
        time.sleep(0.01)
    assert spool.inbox_names(W) == ["c.json", "a.json", "b.json"]
    (spool.inbox(W) / ".tmp_z.json.123").write_text("{}")
    assert spool.count_inbox(W) == 3


def test_claim_is_a_rename_and_only_one_claimer_wins(spool):
    put(spool, "t1")
    claim = spool.claim(W, "t1")
    assert claim == spool.claim_path(W, "t1") and claim.exists()
    assert not spool.task_path(W, "t1").exists()
    assert spool.claim(W, "t1") is None
    assert spool.locate("t1").state == "processing"


def test_requeue_rewrites_then_moves_back(spool):
    put(spool, "t1")
    spool.claim(W, "t1")
    spool.requeue(W, "t1", {"task_id": "t1", "description": "x", "attempts": 1})
    assert read_json(spool.task_path(W, "t1"))["attempts"] == 1
    assert spool.locate("t1").state == "pending"


def test_result_wins_over_a_leftover_claim(spool):
    put(spool, "t1")
    spool.claim(W, "t1")
    spool.write_result(W, {"task_id": "t1", "status": "completed"})
    assert not spool.claim_path(W, "t1").exists()
    location = spool.locate("t1")
    assert location.state == "done" and location.worker == W


def test_dead_letter_keeps_a_parsed_task_in_the_record(spool):
    put(spool, "t1")
    record = spool.dead_letter(
        spool.task_path(W, "t1"),
        reason="max_attempts",
        detail="3 runs",
        worker=W,
        task={"task_id": "t1", "description": "x"},
    )
    data = read_json(record)
    assert data["reason"] == "max_attempts" and data["task"]["task_id"] == "t1" and data["worker"] == W
    assert not spool.task_path(W, "t1").exists()
    assert spool.locate("t1").state == "dead"


def test_dead_letter_moves_unparseable_bytes_beside_the_record(spool):
    bad = spool.inbox(W) / "bad.json"
    bad.write_bytes(b"\xff\xfe not json")
    record = read_json(spool.dead_letter(bad, reason="not_utf8", detail="byte 0", worker=W))
    assert Path(record["raw"]).read_bytes() == b"\xff\xfe not json"
    assert not bad.exists()


def test_a_hostile_name_never_becomes_a_path(spool):
    bad = spool.inbox(W) / "..%2f..%2fetc.json"
    bad.write_text("{}")
    record_path = spool.dead_letter(bad, reason="invalid_task_id", detail="x", worker=W)
    assert record_path.parent == spool.dead_letter_dir
    assert record_path.name.startswith("invalid-")
    assert json.loads(record_path.read_text())["task_id"] is None


def test_two_different_bad_files_with_one_name_both_survive(spool):
    for content in (b"first", b"second"):
        bad = spool.inbox(W) / "same.json"
        bad.write_bytes(content)
        spool.dead_letter(bad, reason="invalid_json", detail="x", worker=W)
    raws = sorted(p.read_bytes() for p in spool.dead_letter_dir.glob("*.raw"))
    assert raws == [b"first", b"second"]


def test_parse_iso():
    assert parse_iso("1970-01-01T00:00:10Z") == 10
    assert parse_iso("1970-01-01T00:00:10") == 10
    assert parse_iso("yesterday") is None and parse_iso(None) is None
