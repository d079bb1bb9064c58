"""The worker's streams wiring without Redis: tokens in task files, late records, the executor's
condition while Redis is away, the replica name its programs share, the attempt the agent gets."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from activation.config import Settings
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool
from activation.transport.streams.client import REFUSED, Delivery, Token, Verdict
from activation.transport.streams.inbox import task_of
from activation.transport.streams.keys import replica_name
from activation.worker import liveness
from activation.worker.executor import Executor
from activation.worker.stream_feed import refused_copy as late_record
from activation.worker.stream_feed import streamed
from tests.conftest import WORKER, fake_agent_command


def delivered(task_id: str, consumer: str = "box/1/2-3", deliveries: int = 2) -> dict:
    payload = json.dumps({"task_id": task_id, "description": "x", "metadata": {"team": "a"}})
    return task_of(Delivery("1-0", task_id, payload, Token(consumer, deliveries)))


def test_a_task_file_from_the_stream_names_its_delivery_and_a_local_one_names_none() -> None:
    delivery = streamed(delivered("t1"))
    assert delivery is not None
    assert (delivery.entry_id, delivery.task_id, delivery.token) == ("1-0", "t1", Token("box/1/2-3", 2))
    assert streamed({"task_id": "t2", "description": "written by hand"}) is None


def test_a_task_whose_stream_token_is_damaged_runs_as_a_local_task() -> None:
    assert streamed({"task_id": "t3", "description": "x", "metadata": {"stream": {"consumer": "c"}}}) is None
    assert streamed({"task_id": "t3", "description": "x", "metadata": {"stream": "nonsense"}}) is None


def test_a_late_result_keeps_its_record_marked_refused_and_the_original_is_left_alone() -> None:
    result = {"task_id": "t1", "status": "completed", "metadata": delivered("t1")["metadata"]}
    late = late_record(result, Verdict(REFUSED, "worker-b holds 1-0 at delivery 3", "not_holder"))  # type: ignore[arg-type]
    assert late["metadata"]["stream"]["refused"] == "not_holder: worker-b holds 1-0 at delivery 3"
    assert late["metadata"]["team"] == "a" and late["status"] == "completed"
    assert "refused" not in result["metadata"]["stream"]


def test_a_dependency_outage_reports_degraded_without_gating_and_a_trouble_does_not_hide_it(tmp_path: Path) -> None:
    pulse = liveness.ExecutorBeat(tmp_path, 0.5)
    condition = liveness.Condition(pulse, logging.getLogger("test"), WORKER)
    condition.dependency_down("streams_unreachable", "the task stream is unreachable")
    assert condition.trouble is None  # the loop is not gated: the stream's own backoff paces it
    assert read_json(pulse.path)["reason"] == "streams_unreachable"
    condition.degrade("spool_error", "disk full")
    assert read_json(pulse.path)["reason"] == "spool_error"
    condition.recovered()  # the disk is fine again, Redis is still away
    assert read_json(pulse.path)["state"] == "degraded" and read_json(pulse.path)["reason"] == "streams_unreachable"
    condition.dependency_up()
    assert read_json(pulse.path)["state"] == "ok"


def test_the_programs_of_one_tree_share_one_replica_name_and_another_tree_gets_another() -> None:
    code = "from activation.transport.streams.keys import replica_name; print(replica_name(host='box'))"
    siblings = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout for _ in "ab"}
    assert len(siblings) == 1  # children of one parent, as listener, executor and heartbeat are
    [sibling] = siblings
    assert f"/{os.getpid()}-" in sibling  # named after their parent, this process
    assert replica_name(host="box") != sibling.strip()  # this process's own parent is another start


def test_two_trees_whose_supervisord_has_the_same_pid_and_start_differ_by_their_run_folder(tmp_path: Path) -> None:
    one, other = tmp_path / "one", tmp_path / "other"
    assert replica_name(host="box", run_dir=one) == replica_name(host="box", run_dir=one)
    assert replica_name(host="box", run_dir=one) != replica_name(host="box", run_dir=other)


def test_the_agent_gets_its_attempt_number_in_files_mode_too(
    spool: Spool, make_settings: Callable[..., Settings], tmp_path: Path
) -> None:
    dump = tmp_path / "env.json"
    atomic_write_json(
        spool.task_path(WORKER, "again"), {"task_id": "again", "description": f"env={dump}", "attempts": 1}
    )
    executor = Executor(make_settings(agent_command=fake_agent_command(), kill_grace=0.5))
    result = executor.process("again")
    assert result is not None and result["attempts"] == 2
    seen = json.loads(dump.read_text())
    assert seen["ACTIVATION_ATTEMPT"] == "2" and seen["ACTIVATION_TASK_ID"] == "again"
