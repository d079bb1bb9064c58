"""From a stream delivery to an inbox task file and back."""

from __future__ import annotations

import json

import pytest

from activation.errors import BadTask
from activation.spool.task import load_task
from activation.transport.streams.client import Delivery, Token
from activation.transport.streams.inbox import delivery_of, task_of, write_to_inbox
from tests.conftest import WORKER


def delivery(task: dict | str, deliveries: int = 2) -> Delivery:
    payload = task if isinstance(task, str) else json.dumps(task)
    return Delivery("1700000000000-0", "t1", payload, Token("host/boot/1-2", deliveries), "old-owner")


def test_a_delivery_becomes_a_valid_inbox_file_carrying_its_token(spool):
    path = write_to_inbox(spool, WORKER, delivery({"task_id": "t1", "description": "go", "metadata": {"k": 1}}))
    assert path == spool.task_path(WORKER, "t1")
    task = load_task(path)
    assert task["description"] == "go" and task["metadata"]["k"] == 1
    assert task["attempts"] == 1  # deliveries before this one
    back = delivery_of(task)
    assert (back.entry_id, back.task_id, back.token) == ("1700000000000-0", "t1", Token("host/boot/1-2", 2))


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("{not json", "invalid_json"),
        ("", "invalid_json"),  # not "not ready yet", as an empty file is: it crashed the executor
        (" \n", "invalid_json"),
        (json.dumps({"task_id": "t1"}), "missing_field"),
        (json.dumps({"task_id": "t2", "description": "x"}), "id_mismatch"),
        (json.dumps({"task_id": "t1", "description": "x", "timeout": 10**9}), "invalid_field"),
        (json.dumps({"task_id": "t1", "description": "x" * (1024 * 1024)}), "too_large"),
    ],
)
def test_a_payload_that_is_no_valid_task_is_bad_input_with_a_reason(spool, payload, reason):
    with pytest.raises(BadTask) as caught:
        write_to_inbox(spool, WORKER, delivery(payload), max_timeout=86400)
    assert caught.value.reason == reason
    assert not spool.task_path(WORKER, "t1").exists()


def test_a_task_file_without_a_stream_token_is_refused():
    with pytest.raises(BadTask, match=r"metadata\.stream"):
        delivery_of({"task_id": "t1", "description": "x"})


def test_the_token_survives_the_round_trip_for_a_first_delivery():
    task = task_of(delivery({"task_id": "t1", "description": "x"}, deliveries=1))
    assert task["attempts"] == 0 and delivery_of(task).attempt == 1
