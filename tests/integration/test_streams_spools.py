"""Two hosts' spools joined by the streams transport: the orchestrator's outbox, a worker's inbox.

No worker tree runs here: the executor's part (claim, run, write the result) is done by hand, so
that what is tested is the path a task and its result take between the spools.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from activation.spool.layout import Spool
from activation.spool.task import load_task
from activation.transport.streams.client import DONE, StreamsTransport
from activation.transport.streams.inbox import delivery_of, take_one, write_to_inbox
from activation.transport.streams.outbox import mirror, resend_outbox, send
from tests.conftest import wait_for

WORKER = "marie"


@pytest.fixture
def spools(tmp_path: Path) -> tuple[Spool, Spool]:
    orchestrator, worker = Spool(tmp_path / "orchestrator"), Spool(tmp_path / "worker")
    orchestrator.init([WORKER])
    worker.init([WORKER])
    return orchestrator, worker


def task(task_id: str) -> dict[str, str]:
    return {"task_id": task_id, "description": f"do {task_id}"}


def run_by_hand(worker_spool: Spool, replica: StreamsTransport) -> str:
    """The worker host: one entry to an inbox file, claimed, 'run', its result written and completed."""
    delivery = replica.receive(0)
    assert delivery is not None
    write_to_inbox(worker_spool, WORKER, delivery)
    claim = worker_spool.claim(WORKER, delivery.task_id)
    assert claim is not None
    held = delivery_of(load_task(claim))  # what the executor knows: only the file
    result = {"task_id": held.task_id, "worker": WORKER, "status": "completed", "attempts": held.attempt}
    worker_spool.write_result(WORKER, result)
    assert replica.complete(held, result).status == DONE
    return held.task_id


def test_a_task_goes_from_the_outbox_to_a_worker_spool_and_its_result_comes_back(spools, client):
    orchestrator_spool, worker_spool = spools
    orchestrator = StreamsTransport(client, WORKER, consumer="orchestrator")
    orchestrator.ensure_groups()
    replica = StreamsTransport(client, WORKER, consumer="a")
    send(orchestrator, orchestrator_spool, WORKER, task("t1"))
    assert orchestrator_spool.locate("t1").state == "pending"  # `show` sees it waiting
    assert run_by_hand(worker_spool, replica) == "t1"
    assert mirror(orchestrator, orchestrator_spool, WORKER) == 1
    location = orchestrator_spool.locate("t1")
    assert location is not None and location.state == "done"
    assert json.loads(location.path.read_text())["attempts"] == 1
    assert orchestrator_spool.count_inbox(WORKER) == 0
    assert mirror(orchestrator, orchestrator_spool, WORKER) == 0  # acknowledged: mirrored once


def test_a_stream_dead_letter_lands_in_the_orchestrators_dead_letter(spools, client):
    orchestrator_spool, _worker_spool = spools
    orchestrator = StreamsTransport(client, WORKER, consumer="orchestrator")
    orchestrator.ensure_groups()
    a = StreamsTransport(client, WORKER, consumer="a", lease=0.1, max_attempts=1)
    b = StreamsTransport(client, WORKER, consumer="b", lease=0.1, max_attempts=1)
    send(orchestrator, orchestrator_spool, WORKER, task("poison"))
    a.receive(0)  # and dies with it
    wait_for(lambda: b.receive(0) is None and client.xlen(b.keys.dead) == 1, 10, 0.02, "the dead letter")
    mirror(orchestrator, orchestrator_spool, WORKER)
    [record_path] = list(orchestrator_spool.dead_letters())
    record = json.loads(record_path.read_text())
    assert (record["task_id"], record["reason"], record["task"]) == ("poison", "max_attempts", task("poison"))
    assert "last owner a" in record["detail"] and "deliveries 1" in record["detail"]
    assert orchestrator_spool.count_inbox(WORKER) == 0


@pytest.mark.parametrize(
    "hostile",
    [
        {"task_id": "t1", "status": 5},  # a status that is no string
        {"task_id": "other", "status": "completed"},  # names another task
        {"task_id": "t1", "status": "completed", "duration_s": "long"},
    ],
)
def test_a_result_no_reader_could_take_lands_in_the_dead_letter_not_the_results(spools, client, hostile):
    orchestrator_spool, _worker_spool = spools
    orchestrator = StreamsTransport(client, WORKER, consumer="orchestrator")
    orchestrator.ensure_groups()
    replica = StreamsTransport(client, WORKER, consumer="a")
    send(orchestrator, orchestrator_spool, WORKER, task("t1"))
    delivery = replica.receive(0)
    assert delivery is not None
    assert replica.complete(delivery, hostile).status == DONE  # the script stores what it is given
    assert mirror(orchestrator, orchestrator_spool, WORKER) == 1
    location = orchestrator_spool.locate("t1")
    assert location is not None and location.state == "dead", location
    record = json.loads(location.path.read_text())
    assert record["reason"] == "unreadable_result" and "no result record" in record["detail"]
    assert record["task"] == task("t1")  # the outbox copy: `dlq retry` runs it again
    assert orchestrator_spool.count_inbox(WORKER) == 0 and not orchestrator_spool.has_result(WORKER, "t1")


def test_a_dead_letter_nested_past_any_limit_or_with_a_hostile_task_id_lands_safely(spools, client, tmp_path):
    """Bad input a replica dead-letters as it came (a raw XADD): the mirror must neither crash on its
    payload (a RecursionError would crash-loop the orchestrator on its unacknowledged entry) nor
    follow its task id out of the spool (unlinking what `tasks/marie/../../x.json` names)."""
    orchestrator_spool, worker_spool = spools
    orchestrator = StreamsTransport(client, WORKER, consumer="orchestrator")
    orchestrator.ensure_groups()
    replica = StreamsTransport(client, WORKER, consumer="a")
    decoy = orchestrator_spool.root / "escape.json"  # where tasks/marie/../../escape.json leads
    decoy.write_text("{}")
    deep = '{"task_id": "deep", "description": "x", "m": ' + "[" * 50_000 + "]" * 50_000 + "}"
    orchestrator.dispatch("deep", deep)
    hostile = "../../escape"
    client.xadd(replica.keys.tasks, {"task_id": hostile, "task": json.dumps({"task_id": hostile, "description": "x"})})
    assert take_one(replica, worker_spool, WORKER, block=0) is None  # both dead-lettered on the stream
    assert mirror(orchestrator, orchestrator_spool, WORKER) == 2
    records = {
        r["detail"].split(":")[0]: r for r in (json.loads(p.read_text()) for p in orchestrator_spool.dead_letters())
    }
    assert len(records) == 2
    deep_record = next(r for r in records.values() if r["task_id"] == "deep")
    assert deep_record["reason"] == "unencodable" and "nested deeper than 64 levels" in deep_record["detail"]
    assert Path(deep_record["raw"]).read_text() == deep  # the payload kept as it came: nothing is lost
    [hostile_record] = [r for r in records.values() if r["task_id"] is None]
    assert hostile_record["reason"] == "invalid_task_id" and "'../../escape'" in hostile_record["detail"]
    assert decoy.read_text() == "{}"  # untouched
    assert [p.name for p in orchestrator_spool.inbox(WORKER).iterdir()] == [".processing"]  # nothing left behind
    assert mirror(orchestrator, orchestrator_spool, WORKER) == 0  # acknowledged: no crash loop, no repeat


def test_after_redis_lost_everything_the_outbox_is_sent_again_and_nothing_is_lost(spools, client, redis_server):
    orchestrator_spool, worker_spool = spools
    orchestrator = StreamsTransport(client, WORKER, consumer="orchestrator")
    orchestrator.ensure_groups()
    replica = StreamsTransport(client, WORKER, consumer="a")
    for n in range(4):
        send(orchestrator, orchestrator_spool, WORKER, task(f"t{n}"))
    run_by_hand(worker_spool, replica)
    mirror(orchestrator, orchestrator_spool, WORKER)
    assert resend_outbox(orchestrator, orchestrator_spool, WORKER) == []  # nothing lost yet
    redis_server.restart()  # no persistence: streams, groups and task records are gone
    assert sorted(resend_outbox(orchestrator, orchestrator_spool, WORKER)) == ["t1", "t2", "t3"]
    assert resend_outbox(orchestrator, orchestrator_spool, WORKER) == []  # once is enough
    for _ in range(3):
        run_by_hand(worker_spool, replica)
    mirror(orchestrator, orchestrator_spool, WORKER)
    assert {orchestrator_spool.locate(f"t{n}").state for n in range(4)} == {"done"}
    assert orchestrator_spool.count_inbox(WORKER) == 0


def test_take_one_writes_the_entry_into_the_inbox_and_dead_letters_bad_input(spools, client):
    orchestrator_spool, worker_spool = spools
    orchestrator = StreamsTransport(client, WORKER, consumer="orchestrator")
    replica = StreamsTransport(client, WORKER, consumer="a")
    orchestrator.dispatch("bad", {"task_id": "bad"})  # no description: never a runnable task
    send(orchestrator, orchestrator_spool, WORKER, task("good"))
    delivery = take_one(replica, worker_spool, WORKER, block=0)
    assert delivery is not None and delivery.task_id == "good"
    assert worker_spool.inbox_names(WORKER) == ["good.json"]
    [(_id, dead)] = client.xrange(replica.keys.dead)
    assert (dead["task_id"], dead["reason"]) == ("bad", "missing_field: description is required")
    assert take_one(replica, worker_spool, WORKER, block=0) is None


def test_an_empty_or_half_written_outbox_file_is_skipped_and_the_others_are_re_sent(spools, client, redis_server):
    # The chaos run wedged the orchestrator here: NotReady ("empty file") failed every step.
    orchestrator_spool, _worker_spool = spools
    orchestrator = StreamsTransport(client, WORKER, consumer="orchestrator")
    orchestrator.ensure_groups()
    send(orchestrator, orchestrator_spool, WORKER, task("kept"))
    orchestrator_spool.task_path(WORKER, "empty").write_bytes(b"")
    orchestrator_spool.task_path(WORKER, "half").write_bytes(b'{"task_id": "half", "descr')
    redis_server.restart(lose_data=True)
    assert resend_outbox(orchestrator, orchestrator_spool, WORKER) == ["kept"]
