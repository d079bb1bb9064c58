"""The orchestrator and the CLI in streams mode: a real orchestrator program (supervisord), a real
redis-server on a free port, and a stand-in replica in the test (a StreamsTransport consumer that
receives and completes), so that what is tested is the orchestrator's side of the transport.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from typing import Any

import pytest
import redis

from activation.transport.streams.client import DONE, Delivery, StreamsTransport
from activation.transport.streams.keys import StreamKeys
from tests.conftest import wait_for
from tests.harness import BIN, RedisServer, WorkerTree, new_orchestrator
from tests.integration.conftest import api
from tests.integration.test_orchestrator import call

W = "marie"
KEYS = StreamKeys(W)


@pytest.fixture
def orchestrator(start_orchestrator: Callable[..., WorkerTree], redis_server: RedisServer) -> WorkerTree:
    return start_orchestrator(
        W, ACTIVATION_TRANSPORT="streams", REDIS_URL=redis_server.url, ACTIVATION_REDIS_BACKOFF_MAX="0.5"
    )


def replica(client: redis.Redis, name: str = "standin-1") -> StreamsTransport:
    return StreamsTransport(client, W, consumer=name, lease=30)


def receive(transport: StreamsTransport) -> Delivery:
    return wait_for(lambda: transport.receive(0.2), 20, 0, "a task entry for the stand-in replica")


def run(transport: StreamsTransport, delivery: Delivery, stdout: str = "ok\n") -> None:
    result = {
        "task_id": delivery.task_id,
        "worker": W,
        "status": "completed",
        "exit_code": 0,
        "duration_s": 0.01,
        "attempts": delivery.attempt,
        "stdout": stdout,
        "stderr": "",
    }
    assert transport.complete(delivery, result).status == DONE


def entries(client: redis.Redis) -> list[str]:
    return [entry[1]["task_id"] for entry in client.xrange(KEYS.tasks)]


def test_dispatch_by_cli_and_by_api_adds_one_entry_each_and_a_duplicate_id_adds_none(orchestrator, client):
    by_cli = orchestrator.cli("dispatch", W, "from the cli", "--task-id", "cli-1", "--json")
    assert by_cli.returncode == 0, by_cli.stderr
    assert json.loads(by_cli.stdout)["transport"] == "streams"
    body = {"worker": W, "description": "by api", "task_id": "api-1"}
    status, answer = call(api(orchestrator), "POST", "/tasks", body)
    assert status == 202, answer
    assert answer["transport"] == "streams"
    assert sorted(entries(client)) == ["api-1", "cli-1"]
    assert sorted(orchestrator.spool.inbox_names(W)) == ["api-1.json", "cli-1.json"]  # the outbox

    again = orchestrator.cli("dispatch", W, "from the cli", "--task-id", "cli-1")
    status, twice = call(api(orchestrator), "POST", "/tasks", body)
    assert again.returncode == 1 and "already exists (pending" in again.stderr and "nothing was sent" in again.stderr
    assert status == 409 and "nothing was sent again" in twice["error"]
    assert sorted(entries(client)) == ["api-1", "cli-1"]

    standin = replica(client)
    run(standin, receive(standin))
    run(standin, receive(standin))
    assert standin.receive(0) is None  # one run per id
    wait_for(lambda: sorted(p.stem for p in orchestrator.spool.results(W).glob("*.json")) == ["api-1", "cli-1"])
    status, metrics = call(api(orchestrator), "GET", "/metrics")
    assert 'dispatch_total{transport="streams",worker="marie"} 2.0' in metrics


def test_a_replica_result_lands_in_the_results_folder_and_show_and_wait_see_it(orchestrator, client):
    waiting = subprocess.Popen(
        [str(BIN / "activation"), "dispatch", W, "hello", "--task-id", "r-1", "--wait", "--wait-timeout", "60"],
        env=orchestrator.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        standin = replica(client)
        delivery = receive(standin)
        assert delivery.task_id == "r-1"
        run(standin, delivery, stdout="hello back\n")
        out, err = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
            waiting.wait()
    assert waiting.returncode == 0, err
    assert "r-1: completed" in out and "hello back" in out
    shown = orchestrator.cli("show", "r-1", "--json")
    assert json.loads(shown.stdout)["state"] == "done"
    status, task = call(api(orchestrator), "GET", "/tasks/r-1")
    assert status == 200 and task["state"] == "done" and task["result"]["stdout"] == "hello back\n"
    assert orchestrator.spool.inbox_names(W) == []  # out of the outbox
    audit = orchestrator.cli("audit")
    assert audit.returncode == 0, audit.stdout + audit.stderr


def test_after_a_redis_restart_without_persistence_the_outbox_is_sent_again(orchestrator, client, redis_server):
    sent = orchestrator.cli("dispatch", W, "survive", "--task-id", "lost-1")
    assert sent.returncode == 0, sent.stderr
    assert entries(client) == ["lost-1"]
    redis_server.restart()  # no persistence: streams, groups and task ids are gone
    fresh = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        what = lambda: f"the re-sent entry; log:\n{orchestrator.log_tail()}"  # noqa: E731
        wait_for(lambda: entries(fresh) == ["lost-1"], 30, 0.1, what)
        standin = replica(fresh)
        run(standin, receive(standin))
        wait_for(lambda: orchestrator.spool.result_path(W, "lost-1").exists(), 20, 0.1, "the result mirrored")
    finally:
        fresh.close()
    assert "re-sent 1 outbox task(s) of marie" in orchestrator.log.read_text()


def test_a_dead_letter_is_mirrored_and_dlq_retry_sends_it_again_under_its_id(orchestrator, client):
    sent = orchestrator.cli("dispatch", W, "doomed", "--task-id", "dead-1")
    assert sent.returncode == 0, sent.stderr
    standin = replica(client)
    delivery = receive(standin)
    assert standin.dead_letter(delivery, "agent_failed: the stand-in gave up").ok

    def listed() -> list[dict[str, Any]]:
        shown = orchestrator.cli("dlq", "list", "--json")
        return [d for d in json.loads(shown.stdout) if d["task_id"] == "dead-1"]

    letter = wait_for(listed, 20, 0.1, "the dead letter mirrored into the spool")[0]
    assert letter["worker"] == W and letter["retryable"]
    assert "the stand-in gave up" in letter["detail"] and "last owner standin-1" in letter["detail"]
    assert orchestrator.spool.inbox_names(W) == []

    retried = orchestrator.cli("dlq", "retry", letter["id"])
    assert retried.returncode == 0, retried.stderr
    assert entries(client) == ["dead-1"]
    again = receive(standin)
    assert again.task_id == "dead-1"
    run(standin, again)
    wait_for(lambda: orchestrator.spool.result_path(W, "dead-1").exists(), 20, 0.1, "the retried task's result")
    assert json.loads(orchestrator.cli("show", "dead-1", "--json").stdout)["state"] == "done"


def test_status_shows_each_replica_and_redis_down_is_one_line_and_an_honest_status(orchestrator, client, redis_server):
    for name in ("standin-a", "standin-b"):
        replica(client, name).beat({"worker": W, "state": "running", "current_task": None, "queue_size": 0}, ttl=60)
    shown = orchestrator.cli("status")
    assert "replica standin-a: running" in shown.stdout and "replica standin-b: running" in shown.stdout
    status, answer = call(api(orchestrator), "GET", "/status")
    assert sorted(answer["streams"]["replicas"][W]) == ["standin-a", "standin-b"]
    assert orchestrator.cli("check", W).returncode == 0

    redis_server.stop()
    wait_for(lambda: "redis unreachable" in orchestrator.log.read_text(), 20, 0.1, "the outage logged")
    status, answer = call(api(orchestrator), "GET", "/status")
    assert status == 200 and answer["streams"]["redis"].startswith("unreachable")
    assert answer["unhealthy"] == [W]
    checked = orchestrator.cli("check", W)
    assert checked.returncode == 1 and "redis unreachable" in checked.stderr and "Traceback" not in checked.stderr
    down = orchestrator.cli("status")
    assert down.returncode == 1 and "redis unreachable" in down.stdout and "Traceback" not in down.stderr

    redis_server.start()  # the same port, empty
    wait_for(lambda: "redis reachable again" in orchestrator.log.read_text(), 30, 0.1, "the orchestrator to recover")
    log = orchestrator.log.read_text()
    assert log.count("redis unreachable") == 1
    assert "Traceback" not in log


HOSTILE_STATES = {
    "list": "[1, 2]",
    "torn": '{"state": "runn',
    "typed": '{"current_task": 5, "queue_size": "many", "programs": ["listener"]}',
    "huge": '{"queue_size": ' + str(10**40) + "}",
    "deep": "[" * 50_000 + "]" * 50_000,
}


def test_status_of_replicas_with_hostile_states_in_redis_is_one_line_each_and_no_traceback(orchestrator, client):
    """Any Redis client can write a replica's key: each hostile state is one replica whose state is
    unreadable, in `status` (text and JSON) and in GET /status, and the good one is shown as it is."""
    replica(client, "good").beat({"worker": W, "state": "running", "current_task": "t9", "queue_size": 1}, ttl=60)
    for name, raw in HOSTILE_STATES.items():
        replica(client, name).beat({}, ttl=60)
        client.set(KEYS.replica(name), raw)
    shown = orchestrator.cli("status")
    assert "Traceback" not in shown.stderr, shown.stderr
    assert "replica good: running task=t9 queue=1" in shown.stdout, shown.stdout
    for name in HOSTILE_STATES:
        [line] = [line for line in shown.stdout.splitlines() if f"replica {name}: unreadable" in line]
        assert len(line) < 400, line
    assert f"{len(HOSTILE_STATES)} replica state(s) unreadable" in shown.stdout
    as_json = orchestrator.cli("status", "--json")
    assert "Traceback" not in as_json.stderr, as_json.stderr
    [role] = [s for s in json.loads(as_json.stdout) if s["worker"] == W]
    assert {n: s["state"] for n, s in role["replicas"].items()} == {
        "good": "running",
        **dict.fromkeys(HOSTILE_STATES, "unreadable"),
    }
    status, answer = call(api(orchestrator), "GET", "/status")
    assert status == 200 and answer["streams"]["replicas"][W]["typed"]["state"] == "unreadable", answer
    assert "Traceback" not in orchestrator.log.read_text()


def test_an_id_redis_knows_as_done_is_refused_even_when_the_spool_forgot_it(orchestrator, client):
    """The spool's result was purged, Redis still records the id: one run, and the second call says so."""
    sent = orchestrator.cli("dispatch", W, "once", "--task-id", "once-1")
    assert sent.returncode == 0, sent.stderr
    standin = replica(client)
    run(standin, receive(standin))
    result = orchestrator.spool.result_path(W, "once-1")
    wait_for(result.exists, 20, 0.1, "the result mirrored")
    result.unlink()  # as `results purge` would, while Redis keeps the id for ACTIVATION_STREAM_RETENTION
    again = orchestrator.cli("dispatch", W, "once", "--task-id", "once-1")
    assert again.returncode == 1
    assert "was already dispatched to marie (done); nothing was sent again" in again.stderr
    assert orchestrator.spool.inbox_names(W) == []  # no outbox file left waiting for a result that never comes
    assert entries(client) == [] and standin.receive(0) is None


def test_cancel_over_the_api_and_the_cli_in_streams_mode(orchestrator, client):
    # Not received yet: cancelled at once by the API, and the entry is gone from the stream.
    status, _ = call(api(orchestrator), "POST", "/tasks", {"worker": W, "description": "x", "task_id": "c-1"})
    assert status == 202
    status, answer = call(api(orchestrator), "POST", "/tasks/c-1/cancel")
    assert status == 200 and answer["status"] == "cancelled", answer
    assert entries(client) == []
    status, task = call(api(orchestrator), "GET", "/tasks/c-1")
    assert task["state"] == "done" and task["result"]["status"] == "cancelled"
    # Held by a replica: the CLI asks it through Redis; the holder's cancelled result comes back.
    assert orchestrator.cli("dispatch", W, "long", "--task-id", "c-2").returncode == 0
    standin = replica(client)
    delivery = receive(standin)
    asked = orchestrator.cli("cancel", "c-2", "--no-wait")
    assert asked.returncode == 0 and "cancel requested" in asked.stdout, asked.stderr
    request = standin.cancel_requested("c-2")  # what the holder's executor polls for
    assert request is not None and request["by"] == "api"  # the CLI went through the orchestrator
    # Finished ones are refused, in one line.
    run(standin, delivery, stdout="")
    wait_for(lambda: orchestrator.spool.result_path(W, "c-2").exists(), 20, 0.05, "c-2's result mirrored")
    late = orchestrator.cli("cancel", "c-2")
    assert late.returncode == 1 and "already finished" in late.stderr and len(late.stderr.splitlines()) == 1


def test_a_dispatch_that_redis_failed_is_sent_at_the_relays_next_pass(make_settings, spool, client, redis_server):
    from activation.errors import StreamsError, Unavailable
    from activation.orchestrator.adaptive import Decision
    from activation.orchestrator.relay import StreamsRelay
    from activation.orchestrator.submit import Dispatcher

    settings = make_settings(worker_name=None, transport="streams", redis_url=redis_server.url)
    spool.init([W])
    relay = StreamsRelay(spool, settings)
    try:
        relay.step()  # the start's pass: the outbox (empty) is sent, the marker set

        def failing(worker: str) -> StreamsTransport:
            transport = relay.transport(worker)

            def refuse(*args: Any, **kwargs: Any) -> Any:
                raise StreamsError("redis blinked")  # a failure the relay's own passes never see

            transport.dispatch = refuse  # type: ignore[method-assign]
            return transport

        dispatcher = Dispatcher(
            spool,
            settings,
            decide=lambda w: Decision("streams", "streams", ""),
            streams=failing,
            unsent=relay.resend_soon,
        )
        with pytest.raises(Unavailable, match="waits in the outbox"):
            dispatcher.submit({"worker": W, "description": "x", "task_id": "blink-1"})
        assert spool.task_path(W, "blink-1").exists() and entries(client) == []
        relay._transports.clear()  # the next pass gets a sound transport, as after the blink
        relay.step()
        assert entries(client) == ["blink-1"]  # sent by the pass, with nobody restarting anything
    finally:
        relay.close()


def test_the_cli_cancels_on_the_outbox_itself_when_no_orchestrator_answers(tmp_path, client, redis_server):
    tree = new_orchestrator(tmp_path, ACTIVATION_TRANSPORT="streams", REDIS_URL=redis_server.url)  # never started
    tree.spool.init([W])
    leftover = tree.spool.root / "orchestrator" / "api.json"  # what a crashed orchestrator leaves
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_text('{"url": "http://127.0.0.1:1", "pid": 1}')
    sent = tree.cli("dispatch", W, "x", "--task-id", "solo-1")
    assert sent.returncode == 0, sent.stderr
    done = tree.cli("cancel", "solo-1")
    assert done.returncode == 0 and "cancelled (was pending" in done.stdout, done.stderr
    assert json.loads(tree.spool.result_path(W, "solo-1").read_text())["cancelled"]["by"] == "cli"
    assert entries(client) == []
