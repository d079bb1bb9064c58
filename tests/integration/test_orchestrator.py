"""The orchestrator over real HTTP: auth, modes and the auto rules, recovery, tasks, the dead letter, errors.

Most tests run the real `Orchestrator` program in a thread on a free port; the last ones run
``activation orchestrator`` as a process of its own, and under supervisord with the repo's conf.
"""

from __future__ import annotations

import datetime as dt
import http.client
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import pytest
from click.testing import CliRunner

from activation.cli.admin import config_group, dlq_group, orchestrator_command, recover_command
from activation.clock import SYSTEM_CLOCK, Clock, iso_now
from activation.errors import ConfigError
from activation.orchestrator.service import Orchestrator, state_path
from activation.spool import ownership
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool
from tests.conftest import wait_for
from tests.harness import BIN, ROOT, ManualClock, free_port, wait_until

W = "w1"
TOKEN = "s3cret-token"
RUNNING = {"listener": "RUNNING", "executor": "RUNNING", "heartbeat": "RUNNING"}


class OrchestratorThread:
    """The real program, driven as run_program drives it, on a free loopback port."""

    def __init__(self, program: Orchestrator) -> None:
        self.program = program
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="orchestrator-under-test")

    def _run(self) -> None:
        program = self.program
        try:
            program.initialize()
            self.ready.set()
            while not program.stopping.is_set():
                program.loop()
        except BaseException as exc:
            self.error = exc
        finally:
            program.shutdown()
            self.ready.set()

    def start(self) -> OrchestratorThread:
        self.thread.start()
        assert self.ready.wait(20), "the orchestrator did not start"
        if self.error is not None:
            raise self.error
        return self

    def stop(self) -> None:
        self.program.stopping.set()
        self.thread.join(20)
        assert not self.thread.is_alive(), "the orchestrator did not stop"

    @property
    def url(self) -> str:
        assert self.program.api is not None
        return self.program.api.url

    def call(self, method: str, path: str, body: Any = None, **kwargs: Any) -> tuple[int, Any]:
        return call(self.url, method, path, body, **kwargs)

    def config(self) -> dict[str, Any]:
        status, config = self.call("GET", "/config")
        assert status == 200, config
        return dict(config)


def call(
    url: str,
    method: str,
    path: str,
    body: Any = None,
    *,
    token: str | None = None,
    raw: bytes | None = None,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request; the status and the decoded JSON (or the text, for /metrics)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        sent = dict(headers or {})
        if data is not None:
            sent["Content-Type"] = content_type
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        conn.request(method, path, body=data, headers=sent)
        response = conn.getresponse()
        payload = response.read()
        if response.getheader("Content-Type") == "application/json":
            return response.status, json.loads(payload)
        return response.status, payload.decode()
    finally:
        conn.close()


@pytest.fixture
def start(make_settings: Callable[..., Any]) -> Iterator[Callable[..., OrchestratorThread]]:
    """Start orchestrators (settings overrides as keywords); every one is stopped and joined."""
    started: list[OrchestratorThread] = []

    def run(clock: Clock = SYSTEM_CLOCK, **overrides: Any) -> OrchestratorThread:
        settings = make_settings(worker_name=None, **overrides)
        program = Orchestrator(settings, bind=("127.0.0.1", 0), refresh_interval=0.05, clock=clock)
        running = OrchestratorThread(program)
        started.append(running)
        return running.start()

    yield run
    for running in started:
        if running.thread.is_alive():
            running.stop()


def beat(spool: Spool, worker: str = W, *, age: float = 0.0, **fields: Any) -> None:
    spool.heartbeats_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        spool.heartbeat_path(worker),
        {"worker": worker, "state": "running", "epoch": time.time() - age, "timestamp": iso_now(), **fields},
    )


def results(spool: Spool, count: int, response_ms: float, worker: str = W) -> None:
    now = time.time()
    created = dt.datetime.fromtimestamp(now - response_ms / 1000, dt.UTC).isoformat()
    for i in range(count):
        task_id = f"r-{response_ms:g}-{i}"
        finished = dt.datetime.fromtimestamp(now, dt.UTC).isoformat()
        atomic_write_json(
            spool.result_path(worker, task_id),
            {"task_id": task_id, "status": "completed", "created_at": created, "finished_at": finished},
            durable=False,
        )


def task_file(spool: Spool, task_id: str, *, claim: bool = False, **fields: Any) -> Path:
    path = spool.task_path(W, task_id)
    atomic_write_json(path, {"task_id": task_id, "description": "do it", **fields})
    if claim:
        claimed = spool.claim(W, task_id)
        assert claimed is not None
        return claimed
    return path


# -- auth and modes ------------------------------------------------------------------------------


def test_writes_need_the_token_and_reads_do_not(start):
    orch = start(admin_token=TOKEN)
    status, body = orch.call("POST", "/config", {"mode": "events"})
    assert status == 401 and "Bearer" in body["error"]
    assert orch.call("POST", "/config", {"mode": "events"}, headers={"Authorization": "Basic eDp5"})[0] == 401
    status, body = orch.call("POST", "/config", {"mode": "events"}, token="wrong")
    assert (status, body) == (403, {"error": "wrong admin token"})
    assert orch.call("POST", "/tasks", {"worker": W, "description": "x"})[0] == 401
    assert orch.call("POST", "/dlq/anything/retry")[0] == 401
    assert orch.config()["mode"] == "files"  # nothing changed
    status, body = orch.call("POST", "/config", {"mode": "events"}, token=TOKEN)
    assert status == 200 and body["mode"] == "events" and body["current_decision"] == "events"


def test_the_seeds_curl_command_works_as_written(start):
    orch = start(orchestrator_mode="auto")
    port = urlsplit(orch.url).port
    # curl -X POST http://localhost:8000/config -d '{"mode": "events"}' sends exactly this:
    status, body = call(
        f"http://localhost:{port}",
        "POST",
        "/config",
        raw=b'{"mode": "events"}',
        content_type="application/x-www-form-urlencoded",
        headers={"Accept": "*/*", "User-Agent": "curl/8.5.0"},
    )
    assert status == 200 and body["mode"] == "events"
    if shutil.which("curl"):  # and the real thing, when this machine has it
        out = subprocess.run(
            ["curl", "-s", "-X", "POST", f"http://localhost:{port}/config", "-d", '{"mode": "files"}'],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert json.loads(out.stdout)["mode"] == "files"
    assert orch.config()["mode"] == read_json(state_path(orch.program.spool))["mode"]


def test_get_config_has_the_seeds_shape_plus_per_worker_decisions(start, spool):
    spool.init(["w2"])
    config = start(orchestrator_mode="auto").config()
    assert {"mode", "current_decision", "metrics"} <= set(config)
    assert config["mode"] == "auto" and config["current_decision"] == "files"
    assert set(config["per_worker"]) == {W, "w2"}
    assert config["per_worker"][W] == {"transport": "files", "rule": "default", "detail": "no rule for events fired"}
    assert {"avg_response_time_ms", "task_rate_per_min", "queue_sizes"} <= set(config["metrics"])


def test_the_mode_survives_a_restart(start):
    first = start(orchestrator_mode="files")
    assert first.call("POST", "/config", {"mode": "auto"})[0] == 200
    first.stop()
    assert read_json(state_path(first.program.spool))["mode"] == "auto"
    second = start(orchestrator_mode="files")
    assert second.config()["mode"] == "auto"
    status, text = second.call("GET", "/metrics")
    assert status == 200 and "orchestrator_mode 2.0" in text


# -- the auto rules, from synthetic results and heartbeats ------------------------------------------


def wait_decision(orch: OrchestratorThread, rule: str, worker: str | None = None) -> dict[str, Any]:
    def decided() -> dict[str, Any] | None:
        config = orch.config()
        decision = config["per_worker"][worker] if worker else {"rule": config["rule"]}
        return config if decision["rule"] == rule else None

    return dict(wait_for(decided, 10, 0.05, f"rule {rule}"))


def test_auto_slow_responses_switch_to_events(start, spool):
    orch = start(orchestrator_mode="auto")
    results(spool, 3, 2000)
    config = wait_decision(orch, "response_time")
    assert config["current_decision"] == "events"
    assert config["metrics"]["avg_response_time_ms"] == pytest.approx(2000, abs=5)
    assert config["per_worker"][W]["transport"] == "events"


def test_auto_a_high_task_rate_switches_to_events(start, spool):
    orch = start(orchestrator_mode="auto")
    results(spool, 11, 10)
    config = wait_decision(orch, "task_rate")
    assert config["current_decision"] == "events" and config["metrics"]["task_rate_per_min"] == 11


def test_auto_a_long_queue_switches_that_worker_to_events(start, spool):
    spool.init(["w2"])
    beat(spool, "w2", queue_size=1)
    orch = start(orchestrator_mode="auto")
    beat(spool, W, queue_size=6)
    config = wait_decision(orch, "queue_size", W)
    assert config["per_worker"][W]["transport"] == "events"
    assert config["per_worker"]["w2"]["transport"] == "files"
    assert config["metrics"]["queue_sizes"] == {W: 6, "w2": 1}


def test_auto_in_development_uses_files(start, spool):
    orch = start(orchestrator_mode="auto", node_env="development")
    results(spool, 2, 10)
    config = wait_for(lambda: (c := orch.config())["metrics"]["response_samples"] == 2 and c, 10, 0.05, "samples")
    assert (config["current_decision"], config["rule"]) == ("files", "development")


def test_auto_uses_files_by_default_and_dispatch_follows_the_decision(start, spool):
    orch = start(orchestrator_mode="auto")
    results(spool, 2, 10)
    config = wait_for(lambda: (c := orch.config())["metrics"]["response_samples"] == 2 and c, 10, 0.05, "samples")
    assert (config["current_decision"], config["rule"]) == ("files", "default")
    status, sent = orch.call("POST", "/tasks", {"worker": W, "description": "quick"})
    assert status == 202 and sent["transport"] == "files" and sent["rule"] == "default"


def test_events_dispatch_publishes_on_redis(start, spool, redis_server):
    import redis

    orch = start(orchestrator_mode="events", redis_url=redis_server.url)
    client = redis.Redis.from_url(redis_server.url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(f"activate:{W}")
    try:
        wait_for(lambda: client.pubsub_numsub(f"activate:{W}")[0][1] == 1, 5, what="subscribed")
        status, sent = orch.call("POST", "/tasks", {"worker": W, "description": "wake", "task_id": "ev-1"})
        assert status == 202 and sent["transport"] == "events" and "fallback" not in sent
        message = wait_for(lambda: pubsub.get_message(timeout=0.1), 5, what="the activate message")
        assert message["data"] == b"ev-1"
        assert spool.task_path(W, "ev-1").exists()  # the file always goes first
        redis_server.stop()
        status, sent = orch.call("POST", "/tasks", {"worker": W, "description": "wake", "task_id": "ev-2"})
        assert status == 202 and sent["transport"] == "files" and sent["fallback"]
    finally:
        pubsub.close()
        client.close()
    _, text = orch.call("GET", "/metrics")
    assert 'dispatch_total{transport="events",worker="w1"} 1.0' in text
    assert 'dispatch_total{transport="files",worker="w1"} 1.0' in text


# -- recovery and health ------------------------------------------------------------------------------


def passes_after(orch: OrchestratorThread, count: int = 2) -> None:
    """Wait until the orchestrator has run ``count`` more recovery passes than it has now."""
    target = orch.program.recovery_passes + count
    wait_for(lambda: orch.program.recovery_passes >= target, 20, 0.02, f"{count} recovery passes")


def test_a_task_of_a_silent_worker_is_orphaned_once_the_orchestrator_saw_it_silent_that_long(start, spool):
    task_file(spool, "ancient", created_at="1970-01-01T00:00:00+00:00")
    clock = ManualClock()
    orch = start(clock=clock, recovery_interval=0.05)
    passes_after(orch)
    assert spool.task_path(W, "ancient").exists()  # a first look knows of no silence, whatever created_at says
    clock.now += 601
    wait_for(lambda: spool.dead_letter_path("ancient").exists(), 20, 0.05, "the orphan dead-lettered")
    record = read_json(spool.dead_letter_path("ancient"))
    assert record["reason"] == "orphaned" and record["worker"] == W
    status, body = orch.call("GET", "/tasks/ancient")
    assert status == 200 and body["state"] == "dead" and body["dead_letter"]["reason"] == "orphaned"


def test_a_gone_executors_claim_is_requeued_and_a_live_ones_is_untouched(start, spool, run_dir):
    spool.init(["w2"])
    beat(spool, W, age=600, programs=RUNNING)
    beat(spool, "w2", programs=RUNNING)
    task_file(spool, "stale", claim=True, attempts=1, created_at=iso_now())
    live = spool.task_path("w2", "live")
    atomic_write_json(live, {"task_id": "live", "description": "x", "created_at": "1970-01-01T00:00:00Z"})
    live_claim = spool.claim("w2", "live")
    assert live_claim is not None
    before = live_claim.read_bytes()
    lock = ownership.acquire(spool, "w2", "executor", run_dir)  # w2's executor runs
    try:
        passes_after(start(recovery_interval=0.05))
    finally:
        lock.release()
    assert read_json(spool.task_path(W, "stale"))["attempts"] == 2
    assert spool.claimed_ids(W) == []
    assert live_claim.read_bytes() == before


def test_recovery_runs_again_every_interval(start, spool):
    start(recovery_interval=0.1)
    task_file(spool, "later", claim=True, created_at=iso_now())
    wait_for(lambda: spool.task_path(W, "later").exists(), 10, 0.05, "the stale claim requeued")
    assert read_json(spool.task_path(W, "later"))["attempts"] == 1


def test_status_flags_stale_heartbeats_and_programs_not_running(start, spool):
    spool.init(["w2", "w3"])
    beat(spool, W, programs=RUNNING, queue_size=0)
    beat(spool, "w2", age=600, programs=RUNNING)  # the age it claims is not what makes it stale
    beat(spool, "w3", programs={**RUNNING, "executor": "FATAL"})
    clock = ManualClock()
    orch = start(clock=clock, recovery_interval=0.05)
    passes_after(orch)
    clock.now += 31  # past ACTIVATION_HEARTBEAT_TIMEOUT on the orchestrator's clock
    beat(spool, W, programs=RUNNING, queue_size=0)  # w1 and w3 beat again, w2 does not
    beat(spool, "w3", programs={**RUNNING, "executor": "FATAL"})
    passes_after(orch)
    status, body = orch.call("GET", "/status")
    assert status == 200
    health = {w["worker"]: w for w in body["workers"]}
    assert health[W]["healthy"] and health[W]["problems"] == []
    assert any("stale" in p for p in health["w2"]["problems"])
    assert health["w3"]["problems"] == ["executor FATAL"]
    assert sorted(body["unhealthy"]) == ["w2", "w3"]


def test_status_over_the_api_is_the_spools_live_view_not_the_last_heartbeat(start, spool):
    beat(spool, W, programs=RUNNING, queue_size=0, current_task=None)  # an idle worker, as it last said
    orch = start()
    task_file(spool, "now-running", claim=True)
    task_file(spool, "waiting-1")
    task_file(spool, "waiting-2")
    results(spool, 3, 50.0)
    status, body = orch.call("GET", "/status")
    assert status == 200
    [worker] = [w for w in body["workers"] if w["worker"] == W]
    assert worker["current_task"] == "now-running" and worker["running"] == ["now-running"]
    assert worker["queue_size"] == 2 and worker["results_total"] == 3
    assert worker["heartbeat_current_task"] is None and worker["heartbeat_queue_size"] == 0


def test_metrics_expose_heartbeat_ages_and_the_mode(start, spool):
    beat(spool, W, age=500)
    clock = ManualClock()
    orch = start(clock=clock, orchestrator_mode="events", recovery_interval=0.05)
    passes_after(orch)
    beat(spool, W, age=500)  # once it has seen the heartbeat change, the age is what it saw, not what it says
    wait_for(lambda: orch.program.watch.heartbeat_age(W) is not None, 10, 0.02, "the heartbeat seen changing")
    clock.now += 5

    def age() -> float | None:
        _, text = orch.call("GET", "/metrics")
        lines = [line for line in text.splitlines() if line.startswith('worker_heartbeat_age_seconds{worker="w1"}')]
        return float(lines[0].split()[-1]) if lines else None

    assert wait_for(lambda: age() == 5.0, 10, 0.05, "the heartbeat age of 5 s")
    assert "orchestrator_mode 1.0" in orch.call("GET", "/metrics")[1]


# -- tasks and the dead letter ---------------------------------------------------------------------------


def test_a_task_through_every_state(start, spool):
    orch = start()
    status, sent = orch.call("POST", "/tasks", {"worker": W, "description": "go", "metadata": {"k": "v"}})
    assert status == 202 and set(sent) >= {"task_id", "transport"}
    task_id = sent["task_id"]
    assert orch.call("GET", f"/tasks/{task_id}")[1] == {"task_id": task_id, "state": "pending", "worker": W}
    spool.claim(W, task_id)
    assert orch.call("GET", f"/tasks/{task_id}")[1]["state"] == "processing"
    spool.write_result(W, {"task_id": task_id, "worker": W, "status": "completed", "stdout": "ok"})
    status, body = orch.call("GET", f"/tasks/{task_id}")
    assert status == 200 and body["state"] == "done" and body["result"]["stdout"] == "ok"
    claim = task_file(spool, "doomed", claim=True)
    spool.dead_letter(claim, reason="max_attempts", detail="three strikes", worker=W, task=read_json(claim))
    status, body = orch.call("GET", "/tasks/doomed")
    assert (status, body["state"], body["dead_letter"]["reason"]) == (200, "dead", "max_attempts")


def test_dead_letter_retry_round_trip_over_the_api(start, spool):
    claim = task_file(spool, "again", claim=True, created_at="1970-01-01T00:00:00Z", attempts=2)
    spool.dead_letter(claim, reason="orphaned", detail="for the test", worker=W, task=read_json(claim))
    orch = start()
    status, listing = orch.call("GET", "/dlq")
    assert status == 200 and [d["id"] for d in listing["dead_letters"]] == ["again"]
    status, retried = orch.call("POST", "/dlq/again/retry")
    assert status == 200 and retried["worker"] == W
    task = read_json(spool.task_path(W, "again"))
    assert task["attempts"] == 0 and task["history"][0]["reason"] == "orphaned" and task["history"][0]["attempts"] == 2
    assert orch.call("GET", "/dlq")[1]["count"] == 0
    assert orch.call("GET", "/tasks/again")[1]["state"] == "pending"
    bad = spool.task_path(W, "rawbad")
    bad.write_text("{oops")
    spool.dead_letter(bad, reason="invalid_json", detail="x", worker=W)
    status, body = orch.call("POST", "/dlq/rawbad/retry")
    assert status == 409 and "did not parse" in body["error"]
    assert orch.call("POST", "/dlq/nothing/retry")[0] == 404


def test_every_bad_request_gets_a_json_error_and_the_server_lives_on(start, spool):
    orch = start()
    task_file(spool, "taken")
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("POST", "/config", {"raw": b"{bad json"}, 400, "not JSON"),
        ("POST", "/config", {"raw": b"[1, 2]"}, 400, "JSON object"),
        ("POST", "/config", {"body": {}}, 400, "missing field 'mode'"),
        ("POST", "/config", {"body": {"mode": "fast"}}, 400, "mode must be one of"),
        ("POST", "/tasks", {"body": {"worker": W}}, 400, "missing field 'description'"),
        ("POST", "/tasks", {"body": {"description": "x"}}, 400, "missing field 'worker'"),
        ("POST", "/tasks", {"body": {"worker": "../etc", "description": "x"}}, 400, "worker name"),
        ("POST", "/tasks", {"body": {"worker": W, "description": "x", "timeout": "soon"}}, 400, "timeout"),
        ("POST", "/tasks", {"body": {"worker": W, "description": "x", "task_id": "a/b"}}, 400, "invalid task"),
        ("POST", "/tasks", {"body": {"worker": W, "description": ""}}, 400, "description"),
        ("POST", "/tasks", {"body": {"worker": "nobody", "description": "x"}}, 404, "unknown worker"),
        ("POST", "/tasks", {"body": {"worker": W, "description": "x", "task_id": "taken"}}, 409, "already exists"),
        ("GET", "/tasks/nope", {}, 404, "no task"),
        ("GET", "/tasks/..%2F..%2Fetc", {}, 404, "no task"),
        ("GET", "/nowhere", {}, 404, "no route"),
        ("DELETE", "/config", {}, 405, "not allowed"),
        ("GET", "/dlq/x/retry", {}, 405, "not allowed"),
        ("POST", "/status", {"body": {}}, 405, "not allowed"),
        ("POST", "/tasks", {"raw": b"x" * (1024 * 1024 + 1)}, 413, "over"),
    ]
    for method, path, kwargs, expected, message in cases:
        status, body = orch.call(method, path, kwargs.get("body"), raw=kwargs.get("raw"))
        assert status == expected, (method, path, body)
        assert message in body["error"], (method, path, body)
    assert orch.call("DELETE", "/config")[0] == 405
    # a huge declared length is refused from the headers alone, before any body byte is read
    with socket.create_connection(("127.0.0.1", urlsplit(orch.url).port), timeout=10) as sock:
        sock.sendall(b"POST /tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 104857600\r\n\r\n")
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.0 413") and b'{"error":' in answer
    with socket.create_connection(("127.0.0.1", urlsplit(orch.url).port), timeout=10) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        answer = sock.makefile("rb").read()
    assert answer.startswith(b"HTTP/1.0 400") and b'{"error":' in answer
    assert orch.config()["mode"] == "files" and orch.thread.is_alive()
    assert spool.count_inbox(W) == 1  # none of it wrote a task


def test_refuses_a_public_bind_without_a_token(make_settings):
    with pytest.raises(ConfigError, match="ACTIVATION_ADMIN_TOKEN"):
        Orchestrator(make_settings(admin_bind="0.0.0.0:8000"))
    Orchestrator(make_settings(admin_bind="0.0.0.0:8000", admin_token=TOKEN))  # allowed with one


# -- the CLI over the API ----------------------------------------------------------------------------


def activation_cli() -> click.Group:
    """cli.py's `main` with this issue's commands added, without changing the real `main`."""
    from activation.cli import Group, main

    commands = {**main.commands}
    for command in (config_group, dlq_group, recover_command, orchestrator_command):
        commands[command.name or ""] = command
    return Group("activation", callback=main.callback, params=main.params, commands=commands)


def test_config_get_and_set_mode_over_the_api(start, spool, monkeypatch):
    orch = start(admin_token=TOKEN)
    monkeypatch.setenv("ACTIVATION_SPOOL", str(spool.root))
    monkeypatch.setenv("ACTIVATION_ADMIN_BIND", f"127.0.0.1:{urlsplit(orch.url).port}")
    runner = CliRunner()
    monkeypatch.setenv("ACTIVATION_ADMIN_TOKEN", "wrong")
    refused = runner.invoke(activation_cli(), ["config", "set-mode", "events"])
    assert refused.exit_code == 1 and "403 wrong admin token" in refused.output
    assert len(refused.output.strip().splitlines()) == 1
    monkeypatch.setenv("ACTIVATION_ADMIN_TOKEN", TOKEN)
    changed = runner.invoke(activation_cli(), ["config", "set-mode", "EVENTS"])
    assert changed.exit_code == 0, changed.output
    assert "mode events" in changed.output
    shown = runner.invoke(activation_cli(), ["config", "get", "--url", orch.url, "--json"])
    assert shown.exit_code == 0 and json.loads(shown.output)["current_decision"] == "events"
    human = runner.invoke(activation_cli(), ["config", "get"])
    assert human.exit_code == 0 and "current decision events" in human.output
    bad = runner.invoke(activation_cli(), ["config", "set-mode", "sometimes"])
    assert bad.exit_code == 2
    gone = runner.invoke(activation_cli(), ["config", "get", "--url", f"http://127.0.0.1:{free_port()}"])
    assert gone.exit_code == 1 and "cannot reach the orchestrator" in gone.output


# -- the real program, in its own process ---------------------------------------------------------


def orchestrator_argv() -> list[str]:
    return [str(BIN / "activation"), "orchestrator"]


def program_env(spool: Spool, run_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTIVATION_", "ORCHESTRATOR_", "REDIS_"))}
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        ACTIVATION_SPOOL=str(spool.root),
        ACTIVATION_RUN_DIR=str(run_dir),
        PYTHONUNBUFFERED="1",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def test_activation_orchestrator_runs_as_a_process(spool, run_dir, tmp_path):
    port = free_port()
    task_file(spool, "stale", claim=True, attempts=1)
    env = program_env(spool, run_dir, ACTIVATION_ADMIN_BIND=f"127.0.0.1:{port}", ORCHESTRATOR_MODE="auto")
    log = tmp_path / "orchestrator.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(orchestrator_argv(), env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        config = wait_for(lambda: _get_config(url), 30, 0.1, lambda: f"the API; log:\n{log.read_text()}")
        assert config["mode"] == "auto"
        assert read_json(spool.task_path(W, "stale"))["attempts"] == 2  # recovered at start
        status, sent = call(url, "POST", "/tasks", {"worker": W, "description": "from a process"})
        assert status == 202 and spool.task_path(W, sent["task_id"]).exists()
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
    assert "orchestrator stopped" in log.read_text()


def _get_config(url: str) -> dict[str, Any] | None:
    try:
        status, body = call(url, "GET", "/config")
    except OSError:
        return None
    return dict(body) if status == 200 else None


def test_the_process_refuses_a_public_bind_without_a_token(spool, run_dir):
    env = program_env(spool, run_dir, ACTIVATION_ADMIN_BIND=f"0.0.0.0:{free_port()}")
    done = subprocess.run(orchestrator_argv(), env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "ACTIVATION_ADMIN_TOKEN" in done.stderr, done.stderr


def test_orchestrator_conf_runs_it_under_supervisord(spool, run_dir, tmp_path):
    port = free_port()
    env = program_env(spool, run_dir, ACTIVATION_ADMIN_BIND=f"127.0.0.1:{port}")
    conf = ROOT / "supervisor_conf" / "orchestrator.conf"
    log = tmp_path / "supervisord.log"
    with open(log, "wb") as out:
        supervisord = subprocess.Popen(
            [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: _get_config(f"http://127.0.0.1:{port}"), 30, 0.1, lambda: log.read_text())

        def state() -> str:
            ctl = subprocess.run(
                [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), "status", "orchestrator"],
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )
            return ctl.stdout

        wait_until(lambda: "RUNNING" in state(), 30, 0.2, lambda: f"orchestrator RUNNING; log:\n{log.read_text()}")
        supervisord.send_signal(signal.SIGTERM)
        assert supervisord.wait(30) == 0
    finally:
        if supervisord.poll() is None:
            supervisord.kill()
            supervisord.wait(10)


def test_get_root_lists_the_routes(start):
    orch = start()
    status, body = orch.call("GET", "/")
    assert status == 200
    routes = {(r["method"], r["path"]) for r in body["routes"]}
    assert {("GET", "/status"), ("POST", "/tasks"), ("GET", "/tasks/<id>"), ("POST", "/dlq/<id>/retry")} <= routes


def test_set_mode_events_without_redis_says_why(start, spool, monkeypatch):
    orch = start()
    monkeypatch.setenv("ACTIVATION_SPOOL", str(spool.root))
    runner = CliRunner()
    out = runner.invoke(activation_cli(), ["config", "set-mode", "events", "--url", orch.url])
    assert out.exit_code == 0, out.output
    assert "events cannot be used: the orchestrator has no REDIS_URL" in out.output
    assert orch.config()["events_available"] is False
    files = runner.invoke(activation_cli(), ["config", "set-mode", "files", "--url", orch.url])
    assert "cannot be used" not in files.output


def test_config_get_blames_an_unreachable_redis_not_a_missing_url(start, spool, monkeypatch):
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    orch = start(redis_url=f"redis://127.0.0.1:{port}/0")
    monkeypatch.setenv("ACTIVATION_SPOOL", str(spool.root))
    out = CliRunner().invoke(activation_cli(), ["config", "get", "--url", orch.url])
    assert out.exit_code == 0, out.output
    assert "events           unavailable: REDIS_URL is set but Redis does not answer" in out.output
    assert "no REDIS_URL" not in out.output and f"127.0.0.1:{port}" in out.output


def test_cancel_a_pending_task_over_the_api(start, spool):
    orch = start(admin_token=TOKEN)
    task_file(spool, "wait-1")
    assert orch.call("POST", "/tasks/wait-1/cancel")[0] == 401
    status, body = orch.call("POST", "/tasks/wait-1/cancel", token=TOKEN)
    assert status == 200 and body["status"] == "cancelled"
    status, body = orch.call("GET", "/tasks/wait-1")
    assert body["state"] == "done" and body["result"]["status"] == "cancelled"
    status, body = orch.call("POST", "/tasks/wait-1/cancel", token=TOKEN)
    assert status == 409 and "already finished" in body["error"]
    assert orch.call("POST", "/tasks/nobody/cancel", token=TOKEN)[0] == 404


def test_the_orchestrator_applies_the_result_ttl(start, spool):
    spool.init([W])
    old = spool.result_path(W, "old-1")
    atomic_write_json(old, {"task_id": "old-1", "status": "completed"})
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    atomic_write_json(spool.result_path(W, "new-1"), {"task_id": "new-1", "status": "completed"})
    start(result_ttl=3600.0)
    wait_for(lambda: not old.exists(), 20, 0.05, "the expired result deleted")
    assert spool.has_result(W, "new-1")
