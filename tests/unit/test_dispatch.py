import threading

import pytest

from activation.dispatch import build_task, dispatch, new_task_id, wait_for_outcome
from activation.errors import DispatchError
from activation.spool import read_json

W = "w1"


def test_dispatch_writes_a_valid_task_atomically(spool):
    task = build_task("do it", timeout=5, metadata={"k": "v"})
    sent = dispatch(spool, W, task)
    on_disk = read_json(sent.path)
    assert on_disk["description"] == "do it" and on_disk["timeout"] == 5 and on_disk["metadata"] == {"k": "v"}
    assert on_disk["task_id"] == sent.task_id and "created_at" in on_disk
    assert [p.name for p in spool.inbox(W).iterdir() if p.is_file()] == [f"{sent.task_id}.json"]


def test_ids_are_unique_and_valid():
    ids = {new_task_id() for _ in range(1000)}
    assert len(ids) == 1000


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"task_id": "../../etc/passwd"}, "invalid task"),
        ({"timeout": 10**9, "max_timeout": 60}, "exceeds the worker's maximum"),
    ],
)
def test_bad_tasks_are_refused_with_one_line(kwargs, message):
    with pytest.raises(DispatchError, match=message):
        build_task("x", **kwargs)


def test_unknown_worker_and_duplicate_ids_are_refused(spool):
    with pytest.raises(DispatchError, match="no inbox"):
        dispatch(spool, "nobody", build_task("x"))
    dispatch(spool, W, build_task("x", task_id="same"))
    with pytest.raises(DispatchError, match="already exists"):
        dispatch(spool, W, build_task("x", task_id="same"))


def test_wait_returns_when_the_result_lands(spool):
    sent = dispatch(spool, W, build_task("x"))

    def finish():
        spool.claim(W, sent.task_id)
        spool.write_result(W, {"task_id": sent.task_id, "status": "completed"})

    timer = threading.Timer(0.2, finish)
    timer.start()
    try:
        location = wait_for_outcome(spool, W, sent.task_id, timeout=10)
    finally:
        timer.join()
    assert location.state == "done"


def test_wait_times_out_with_the_state(spool):
    sent = dispatch(spool, W, build_task("x"))
    with pytest.raises(DispatchError, match="still pending"):
        wait_for_outcome(spool, W, sent.task_id, timeout=0.3)
