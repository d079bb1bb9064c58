"""The result index: a cache of one results folder in time order that never hides a result.

Each case ages the folder's mtime by hand (os.utime) where it needs the index trusted: a folder
changed within MTIME_GUARD_NS of a listing is never trusted, which a test would otherwise wait for.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from activation.spool.layout import Spool
from activation.spool.listing import FINISHED, Query, finished
from activation.spool.result_index import ResultIndex
from activation.spool.status import count_results

W = "w1"


def write(spool: Spool, task_id: str, age: float, status: str = "completed") -> None:
    """A result whose file (and so its listing time) is ``age`` seconds old."""
    path = spool.result_path(W, task_id)
    path.write_text(json.dumps({"task_id": task_id, "status": status}))
    when = time.time() - age
    os.utime(path, (when, when))


def settle(spool: Spool) -> None:
    """Age the folder's mtime past the guard, as a folder nobody wrote to for a while is."""
    when = time.time() - 60
    os.utime(spool.results(W), (when, when))


def ids(rows) -> list[str]:
    return [name.removesuffix(".json") for _, name, _ in rows]


def test_newest_first_and_since_stops_early(spool):
    for i, age in enumerate((300, 100, 200)):
        write(spool, f"t{i}", age)
    settle(spool)
    index = ResultIndex(spool, W)
    assert ids(index.newest()) == ["t1", "t2", "t0"]
    assert index.rebuilt
    assert ids(index.newest(since=time.time() - 250)) == ["t1", "t2"]
    assert not index.rebuilt  # the folder did not change: the index answered alone
    assert index.count() == count_results(spool, W) == 3


def test_a_result_written_by_another_process_is_seen_at_once(spool):
    write(spool, "old", 100)
    settle(spool)
    index = ResultIndex(spool, W)
    assert ids(index.newest()) == ["old"]
    code = f"open({str(spool.result_path(W, 'new'))!r}, 'w').write('{{}}')"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert ids(index.newest()) == ["new", "old"]
    assert index.rebuilt
    assert index.count() == 2


def test_a_deleted_result_goes_from_the_index(spool):
    write(spool, "a", 10)
    write(spool, "b", 20)
    settle(spool)
    assert ids(ResultIndex(spool, W).newest()) == ["a", "b"]
    spool.result_path(W, "a").unlink()
    assert ids(ResultIndex(spool, W).newest()) == ["b"]
    assert ResultIndex(spool, W).count() == 1


def test_a_result_replaced_under_the_same_name_gets_its_new_time(spool):
    write(spool, "a", 10)
    write(spool, "b", 500)
    settle(spool)
    assert ids(ResultIndex(spool, W).newest()) == ["a", "b"]
    spool.result_path(W, "b").unlink()
    write(spool, "b", 1)  # a new file (its inode may be the old one's): its own time, not the old
    settle(spool)
    assert ids(ResultIndex(spool, W).newest()) == ["b", "a"]


def test_a_young_folder_is_listed_every_time_and_still_right(spool):
    write(spool, "a", 10)  # the folder's mtime is now: inside the guard
    for _ in range(2):
        index = ResultIndex(spool, W)
        assert ids(index.newest()) == ["a"]
        assert index.rebuilt


def test_a_lost_torn_or_foreign_index_is_rebuilt(spool):
    for i in range(5):
        write(spool, f"t{i}", 10 * (i + 1))
    settle(spool)
    index = ResultIndex(spool, W)
    expected = ids(index.newest())
    for damage in (None, b"", b"activation-result-index/1 1 2", b"garbage\n\x00\xff", b"{}"):
        if damage is None:
            index.path.unlink()
        else:
            index.path.write_bytes(damage)
        assert ids(index.newest()) == expected
        assert index.rebuilt
        assert ids(index.newest()) == expected
        assert not index.rebuilt  # written back whole


def test_a_corrupt_line_under_a_valid_header_costs_a_listing_not_a_row(spool):
    for i in range(4):
        write(spool, f"t{i}", 10 * (i + 1))
    settle(spool)
    index = ResultIndex(spool, W)
    expected = ids(index.newest())
    lines = index.path.read_bytes().splitlines(keepends=True)
    index.path.write_bytes(b"".join([*lines[:3], b"not a row\n", *lines[3:]]))
    assert ids(index.newest()) == expected  # no row lost, none given twice


def test_an_unwritable_index_leaves_every_read_right(spool):
    write(spool, "a", 10)
    settle(spool)
    (spool.results_dir / ".index").write_text("a file where the index folder goes")
    for _ in range(2):
        index = ResultIndex(spool, W)
        assert ids(index.newest()) == ["a"]
        assert index.rebuilt
        assert index.count() == 1


def test_a_name_no_line_can_hold_is_still_listed(spool):
    write(spool, "a", 10)
    (spool.results(W) / "two\nlines.json").write_text("{}")
    settle(spool)
    names = [name for _, name, _ in ResultIndex(spool, W).newest()]
    assert sorted(names) == ["a.json", "two\nlines.json"]
    assert not ResultIndex(spool, W).path.exists()


def test_the_index_is_no_worker_and_no_result(spool):
    write(spool, "a", 10)
    settle(spool)
    assert ids(ResultIndex(spool, W).newest()) == ["a"]
    assert spool.workers() == [W]
    rows = list(finished(spool, Query(states=FINISHED, limit=10)))
    assert [r.task_id for r in rows] == ["a"]


def test_listing_merges_workers_newest_first_and_keeps_the_limit(spool):
    write(spool, "a", 30)
    write(spool, "b", 10, status="failed")
    other = spool.results("w2")
    other.mkdir()
    (other / "c.json").write_text(json.dumps({"task_id": "c", "status": "timeout"}))
    when = time.time() - 20
    os.utime(other / "c.json", (when, when))
    rows = list(finished(spool, Query(states=FINISHED, limit=2)))
    assert [(r.task_id, r.worker, r.state) for r in rows] == [("b", W, "failed"), ("c", "w2", "timeout")]
    rows = list(finished(spool, Query(states=("done",), limit=None)))
    assert [r.task_id for r in rows] == ["a"]


def test_a_temp_file_a_killed_writer_left_is_removed_by_the_next_write(spool):
    write(spool, "a", 10)
    settle(spool)
    folder = spool.results_dir / ".index"
    folder.mkdir()
    left, live = folder / f".tmp_{W}.dead", folder / f".tmp_{W}.live"
    for path, age in ((left, 3600), (live, 0)):
        path.write_text("half")
        when = time.time() - age
        os.utime(path, (when, when))
    assert ids(ResultIndex(spool, W).newest()) == ["a"]
    assert not left.exists()
    assert live.exists()  # maybe another writer's, still writing
