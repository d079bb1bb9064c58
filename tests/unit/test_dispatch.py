import threading

import pytest

from activation.errors import DispatchError
from activation.orchestrator.dispatch import build_task, dispatch, new_task_id, wait_for_outcome
from activation.spool.atomic import read_json

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


def subscribe(url: str, channel: str):
    import redis

    client = redis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel)
    return client, pubsub


def next_message(pubsub, timeout: float = 5.0):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.1)
        if message:
            return message["data"].decode()
    return None


def test_events_write_the_file_then_publish_the_id(spool, redis_server):
    from activation.orchestrator.dispatch import EventPublisher

    client, pubsub = subscribe(redis_server.url, "activate:w1")
    publisher = EventPublisher(redis_server.url)
    try:
        sent = dispatch(spool, W, build_task("x"), transport="events", publisher=publisher)
        assert sent.transport == "events" and sent.receivers == 1 and sent.fallback is None
        assert next_message(pubsub) == sent.task_id
        assert sent.path.exists()
    finally:
        publisher.close()
        pubsub.close()
        client.close()


def test_publish_to_no_subscriber_is_logged_and_the_file_still_delivers(spool, redis_server, caplog):
    from activation.orchestrator.dispatch import EventPublisher

    publisher = EventPublisher(redis_server.url)
    try:
        sent = dispatch(spool, W, build_task("x"), transport="events", publisher=publisher)
    finally:
        publisher.close()
    assert sent.receivers == 0 and sent.path.exists()
    assert "no worker subscribes to activate:w1" in caplog.text


def test_redis_down_falls_back_to_files_with_a_warning(spool, redis_server, caplog):
    from activation.orchestrator.dispatch import EventPublisher

    url = redis_server.url
    redis_server.stop()
    publisher = EventPublisher(url)
    try:
        sent = dispatch(spool, W, build_task("x"), transport="events", publisher=publisher)
    finally:
        publisher.close()
    assert sent.transport == "files" and sent.fallback and "connect" in sent.fallback.lower()
    assert sent.path.exists()
    assert "falling back to files" in caplog.text


def test_without_fallback_redis_down_is_an_error_before_any_write(spool, redis_server):
    from activation.orchestrator.dispatch import EventPublisher

    url = redis_server.url
    redis_server.stop()
    publisher = EventPublisher(url)
    try:
        with pytest.raises(DispatchError, match="FALLBACK_TO_FILES=false"):
            dispatch(
                spool,
                W,
                build_task("x", task_id="nope"),
                transport="events",
                publisher=publisher,
                fallback_to_files=False,
            )
    finally:
        publisher.close()
    assert spool.locate("nope") is None


def test_wait_wakes_on_the_done_event(spool, redis_server):
    import redis

    sent = dispatch(spool, W, build_task("x"))
    client = redis.Redis.from_url(redis_server.url)

    def finish():
        spool.claim(W, sent.task_id)
        spool.write_result(W, {"task_id": sent.task_id, "status": "completed"})
        client.publish("done:w1", sent.task_id)

    timer = threading.Timer(0.3, finish)
    timer.start()
    try:
        location = wait_for_outcome(spool, W, sent.task_id, timeout=10, redis_url=redis_server.url)
    finally:
        timer.join()
        client.close()
    assert location.state == "done"


def test_the_password_never_shows_in_a_fallback(spool, tmp_path):
    from activation.orchestrator.dispatch import EventPublisher

    publisher = EventPublisher("redis://:hunter2@127.0.0.1:1/0")
    try:
        sent = dispatch(spool, W, build_task("x"), transport="events", publisher=publisher)
    finally:
        publisher.close()
    assert sent.fallback and "hunter2" not in sent.fallback
