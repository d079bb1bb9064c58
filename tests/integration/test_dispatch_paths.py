"""`activation dispatch` and `POST /tasks` are one dispatch path (orchestrator/submit.py).

At the boundary: the CLI as a subprocess, the API over HTTP, a real orchestrator program under
supervisord. Both give the same record, the same refusal for the same bad input, and move the
same metric; without an orchestrator the CLI runs the same path itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from activation.orchestrator.endpoint import ENDPOINT_FILE, write_endpoint
from activation.spool.layout import Spool
from tests.conftest import wait_for
from tests.harness import WorkerTree, free_port, new_orchestrator
from tests.integration.conftest import api
from tests.integration.test_orchestrator import call

W = "w1"


@pytest.fixture
def orchestrator(start_orchestrator: Callable[..., WorkerTree]) -> WorkerTree:
    return start_orchestrator(W, ORCHESTRATOR_MODE="files")


def dispatched_count(tree: WorkerTree, transport: str = "files") -> float:
    status, text = call(api(tree), "GET", "/metrics")
    assert status == 200
    found = re.search(rf'^dispatch_total{{transport="{transport}",worker="{W}"}} (\S+)$', text, re.M)
    if found is None:
        found = re.search(rf'^dispatch_total{{worker="{W}",transport="{transport}"}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


def task_file(spool: Spool, task_id: str) -> dict[str, Any]:
    record = dict(json.loads(spool.task_path(W, task_id).read_text()))
    record.pop("created_at")
    record.pop("task_id")
    return record


def test_the_cli_and_the_api_give_the_same_record_and_move_the_same_metric(orchestrator):
    before = dispatched_count(orchestrator)
    argv = ["dispatch", W, "hello", "--task-id", "by-cli", "--timeout", "30", "--meta", "k=v", "--json"]
    by_cli = orchestrator.cli(*argv)
    assert by_cli.returncode == 0, by_cli.stderr
    answer_cli = json.loads(by_cli.stdout)
    status, answer_api = call(
        api(orchestrator),
        "POST",
        "/tasks",
        {"worker": W, "description": "hello", "task_id": "by-api", "timeout": 30, "metadata": {"k": "v"}},
    )
    assert status == 202, answer_api
    assert answer_cli.pop("via") == api(orchestrator)  # it went through the orchestrator
    assert {**answer_cli, "task_id": "-"} == {**answer_api, "task_id": "-"}
    assert answer_cli["rule"] == answer_api["rule"]  # the orchestrator's decision, for both
    assert task_file(orchestrator.spool, "by-cli") == task_file(orchestrator.spool, "by-api")
    wait_for(lambda: dispatched_count(orchestrator) == before + 2, 10, 0.1, "both dispatches counted")


BAD_INPUTS = [
    ("an unknown worker", ["nobody", "x"], {"worker": "nobody", "description": "x"}),
    ("a bad worker name", ["no/such", "x"], {"worker": "no/such", "description": "x"}),
    ("a bad task id", [W, "x", "--task-id", "../up"], {"worker": W, "description": "x", "task_id": "../up"}),
    ("a timeout over the maximum", [W, "x", "--timeout", "1e9"], {"worker": W, "description": "x", "timeout": 1e9}),
]


@pytest.mark.parametrize(("case", "argv", "body"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_the_same_bad_input_gets_the_same_refusal_by_cli_and_by_api(orchestrator, case, argv, body):
    before = dispatched_count(orchestrator)
    by_cli = orchestrator.cli("dispatch", *argv)
    status, answer = call(api(orchestrator), "POST", "/tasks", body)
    assert status in (400, 404), answer
    assert by_cli.returncode == 1
    assert by_cli.stderr.strip() == f"activation: {answer['error']}"
    assert "Traceback" not in by_cli.stderr
    assert dispatched_count(orchestrator) == before
    assert orchestrator.spool.inbox_names(W) == []


def test_a_task_id_in_use_gets_the_same_conflict_by_cli_and_by_api(orchestrator):
    first = orchestrator.cli("dispatch", W, "x", "--task-id", "taken")
    assert first.returncode == 0, first.stderr
    by_cli = orchestrator.cli("dispatch", W, "again", "--task-id", "taken")
    body = {"worker": W, "description": "again", "task_id": "taken"}
    status, answer = call(api(orchestrator), "POST", "/tasks", body)
    assert status == 409
    assert by_cli.returncode == 1
    assert by_cli.stderr.strip() == f"activation: {answer['error']}"
    assert "already exists" in answer["error"]
    assert json.loads(orchestrator.spool.task_path(W, "taken").read_text())["description"] == "x"


def test_without_an_orchestrator_the_cli_runs_the_same_path_itself(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.init([W])
    write_endpoint(spool, "127.0.0.1", free_port())  # left by a crashed orchestrator: nothing answers
    tree = new_orchestrator(tmp_path)  # only for its environment and CLI; never started
    sent = tree.cli("dispatch", W, "hello", "--task-id", "local-1", "--json")
    assert sent.returncode == 0, sent.stderr
    answer = json.loads(sent.stdout)
    assert answer["via"] == "cli" and answer["transport"] == "files"
    assert spool.task_path(W, "local-1").exists()
    refused = tree.cli("dispatch", "nobody", "x")
    assert refused.returncode == 1
    assert refused.stderr.strip() == "activation: unknown worker 'nobody': it has no inbox (activation init nobody)"
    assert (spool.root / ENDPOINT_FILE).exists()
