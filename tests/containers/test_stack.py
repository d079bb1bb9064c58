"""The images built and the compose stack run for real, with podman (issue 14).

Redis, the orchestrator, marie, anga, fabien and Prometheus come up from docker-compose.yml plus
tests/containers/docker-compose.test.yml, driven by Debian's docker-compose through podman's
Docker API, and are used the way a user uses them: the admin API on the host's loopback,
`docker-compose exec|stop|kill|start`, Prometheus' HTTP API. marie and anga run the project's
fake agent; fabien runs the real, pinned Claude Code CLI with no credentials.
"""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
from collections import Counter
from typing import Any

import pytest

from activation.transport.streams.keys import StreamKeys
from tests.conftest import wait_for
from tests.containers.conftest import STREAMS_REPLICAS, WORKERS, Builds, Stack
from tests.containers.engine import BASE_IMAGE, IMAGES, Podman
from tests.harness import PROGRAMS, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the first test pays for a cold build

CLAUDE_PIN = re.search(r"^CLAUDE_CODE_VERSION=(\S+)", (ROOT / "tests/e2e/install_claude.sh").read_text(), re.M)
WORKER_IMAGE = next(i for i in IMAGES if i.name == "activation-worker")
ORCHESTRATOR_IMAGE = next(i for i in IMAGES if i.name == "activation-orchestrator")


def http_json(port: int, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        connection.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = connection.getresponse()
        return response.status, json.loads(response.read() or b"null")
    finally:
        connection.close()


def submit(stack: Stack, worker: str, description: str, task_id: str) -> None:
    task = {"worker": worker, "description": description, "task_id": task_id}
    status, answer = http_json(stack.admin_port, "POST", "/tasks", task, stack.token)
    assert status == 202, answer


def task_state(stack: Stack, task_id: str) -> dict[str, Any]:
    status, answer = http_json(stack.admin_port, "GET", f"/tasks/{task_id}")
    return dict(answer) if status == 200 else {"state": f"HTTP {status}"}


def wait_state(stack: Stack, task_id: str, state: str, timeout: float = 90) -> dict[str, Any]:
    return dict(
        wait_for(
            lambda: (found := task_state(stack, task_id))["state"] == state and found,
            timeout,
            0.2,
            lambda: f"{task_id} {state}: {task_state(stack, task_id)}",
        )
    )


def prometheus(stack: Stack, query: str) -> list[dict[str, Any]]:
    path = "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    status, answer = http_json(stack.prometheus_port, "GET", path)
    assert status == 200 and answer["status"] == "success", answer
    return list(answer["data"]["result"])


def layers(podman: Podman, tag: str) -> list[str]:
    return list(json.loads(podman.run("image", "inspect", "--format", "{{json .RootFS.Layers}}", tag).stdout))


# -- 1. the images ------------------------------------------------------------------------------


def test_both_images_build_from_the_local_base_and_the_worker_runs_the_pinned_claude(podman: Podman, images: Builds):
    assert CLAUDE_PIN is not None
    base = layers(podman, BASE_IMAGE)
    for image in (WORKER_IMAGE, ORCHESTRATOR_IMAGE):
        assert layers(podman, image.tag)[: len(base)] == base, f"{image.tag} is not built on {BASE_IMAGE}"
    version = podman.run("run", "--rm", WORKER_IMAGE.tag, "claude", "--version", timeout=120)
    assert version.stdout.strip() == f"{CLAUDE_PIN[1]} (Claude Code)"
    # Both run as the same non-root uid: both rename files in the spool volume.
    for image, user in ((WORKER_IMAGE, "agent"), (ORCHESTRATOR_IMAGE, "activation")):
        whoami = podman.run("run", "--rm", image.tag, "id", "-un", timeout=60).stdout.strip()
        uid = podman.run("run", "--rm", image.tag, "id", "-u", timeout=60).stdout.strip()
        assert (whoami, uid) == (user, "1000"), image.tag


# -- 2. the stack -------------------------------------------------------------------------------


def test_the_stack_comes_up_healthy_with_every_program_running(stack: Stack):
    for service in ("redis", "orchestrator", *WORKERS):
        stack.wait_healthy(service)  # podman runs no healthcheck by itself without systemd
        assert stack.inspect(service)["State"]["Health"]["Status"] == "healthy", service
    # Compose lists each of them. By id: its table wraps a long name to the terminal's width.
    listed = set(stack("ps", "-q").stdout.split())
    for service in ("redis", "orchestrator", *WORKERS):
        assert stack.inspect(service)["Id"] in listed, (service, listed)
    ps = stack("ps").stdout
    assert stack.inspect("prometheus")["State"]["Status"] == "running"
    assert "grafana" not in ps  # left out by the override: no image of it here

    for worker in WORKERS:
        status = stack.exec(worker, "supervisorctl", "status")
        assert status.returncode == 0, status.stdout + status.stderr
        states = {line.split()[0]: line.split()[1] for line in status.stdout.splitlines() if line.strip()}
        assert states == {program: "RUNNING" for program in PROGRAMS}, (worker, status.stdout)


# -- 3. work ------------------------------------------------------------------------------------


def test_a_task_posted_from_the_host_gets_its_result(stack: Stack):
    status, _ = http_json(stack.admin_port, "POST", "/tasks", {"worker": "anga", "description": "x"})
    assert status == 401  # writes need the token
    submit(stack, "anga", "hello from the host", "host-1")
    result = wait_state(stack, "host-1", "done")["result"]
    assert result["status"] == "completed" and result["worker"] == "anga", result
    assert result["agent"]["result"] == "done: hello from the host"
    assert result["attempts"] == 1


def test_the_real_claude_without_credentials_gives_an_is_error_result(stack: Stack):
    env = stack.exec("fabien", "printenv", "ANTHROPIC_API_KEY")
    assert env.returncode == 1 and not env.stdout, "no key in the shell: none in the container"
    submit(stack, "fabien", "Say hello.", "claude-1")
    result = wait_state(stack, "claude-1", "done", timeout=180)["result"]
    assert result["status"] == "failed", result
    assert result["agent"]["is_error"] is True, result


# -- 4. stop --------------------------------------------------------------------------------------


def test_stop_during_a_task_writes_its_result_and_supervisord_exits_0(stack: Stack):
    submit(stack, "marie", "sleep=5 drained", "stop-1")
    wait_state(stack, "stop-1", "processing", timeout=60)
    stack("stop", "marie", timeout=120)
    state = stack.inspect("marie")["State"]
    # Exit 0 is supervisord's own: a container killed at the end of its grace would show 137.
    assert state["Status"] == "exited" and state["ExitCode"] == 0, state
    result = wait_state(stack, "stop-1", "done", timeout=10)["result"]
    assert result["status"] == "completed" and result["attempts"] == 1, result
    logs = stack.logs("marie", 40)
    assert "stopped: executor (exit status 0)" in logs, logs
    stack("start", "marie")
    stack.wait_healthy("marie")


# -- 5. kill --------------------------------------------------------------------------------------


def test_kill_mid_task_then_start_runs_it_again_once(stack: Stack):
    # The run waits at a gate that opens only after the kill, so the kill lands mid-run however
    # slow docker-compose is (a 15 s sleep was not always long enough on a loaded machine).
    submit(stack, "marie", "gate=/workspace/kill-1.go record=/workspace/kill-1.runs", "kill-1")
    wait_state(stack, "kill-1", "processing", timeout=60)
    wait_for(lambda: stack.exec("marie", "test", "-s", "/workspace/kill-1.runs").returncode == 0, 30, 0.2)
    stack("kill", "marie")  # SIGKILL to supervisord: nothing gets to drain
    wait_for(lambda: stack.inspect("marie")["State"]["Status"] != "running", 30, 0.2)
    stack("start", "marie")
    assert stack.exec("marie", "touch", "/workspace/kill-1.go").returncode == 0  # the rerun may finish
    result = wait_state(stack, "kill-1", "done", timeout=120)["result"]
    assert result["status"] == "completed" and result["attempts"] == 2, result
    runs = stack.exec("marie", "cat", "/workspace/kill-1.runs").stdout.splitlines()
    assert len(runs) == 2, runs  # the killed run and the rerun: no third
    found = stack.exec("marie", "find", "/spool", "-name", "kill-1*", "-not", "-name", "*.runs")
    # The task in one place, its result; its agent log (made at the first output) moved beside it;
    # nothing left by the claim.
    result = "/spool/results/marie/kill-1.json"
    assert sorted(found.stdout.split()) in ([result], [result, result.replace(".json", ".log")]), found.stdout
    stack.wait_healthy("marie")


# -- 6. Prometheus --------------------------------------------------------------------------------


def test_prometheus_scrapes_every_worker_and_the_orchestrator(stack: Stack):
    def up() -> dict[str, str]:
        return {r["metric"].get("worker") or r["metric"]["job"]: r["value"][1] for r in prometheus(stack, "up")}

    expected = {**{w: "1" for w in WORKERS}, "activation-orchestrator": "1"}
    wait_for(lambda: up() == expected, 90, 1.0, lambda: f"up == {expected}: {up()}")

    def completed() -> float:
        return sum(float(r["value"][1]) for r in prometheus(stack, 'tasks_completed_total{worker="anga"}'))

    before = completed()
    submit(stack, "anga", "counted", "prom-1")
    assert wait_state(stack, "prom-1", "done")["result"]["status"] == "completed"
    wait_for(lambda: completed() > before, 90, 1.0, lambda: f"tasks_completed_total above {before}: {completed()}")


# -- 7. streams -----------------------------------------------------------------------------------


STREAMS_TASKS = 50


def marie_replicas(stack: Stack) -> dict[str, Any]:
    """marie's live replicas as /status shows them (each a heartbeat key in Redis), by consumer name."""
    status, answer = http_json(stack.admin_port, "GET", "/status")
    if status != 200 or not isinstance(answer.get("streams"), dict):
        return {}
    return dict((answer["streams"].get("replicas") or {}).get("marie") or {})


def result_stream(stack: Stack) -> list[dict[str, str]]:
    """The entries of marie's result stream, each as its fields (redis-cli's raw output, one value a line)."""
    done = stack.exec("redis", "redis-cli", "--raw", "XRANGE", StreamKeys("marie").results, "-", "+")
    assert done.returncode == 0, done.stdout + done.stderr
    entries: list[dict[str, str]] = []
    lines = done.stdout.splitlines()
    i = 0
    while i < len(lines):
        if re.fullmatch(r"\d+-\d+", lines[i]):  # an entry id, then its field/value pairs
            entries.append({})
        elif entries and i + 1 < len(lines):
            entries[-1][lines[i]] = lines[i + 1]
            i += 1
        i += 1
    return entries


def spool_volume(stack: Stack, service: str, index: int = 1) -> str | None:
    """The name of the volume mounted at /spool in a container of ``service``."""
    done = stack.podman.run("container", "inspect", stack.container(service, index))
    mounts = json.loads(done.stdout)[0]["Mounts"]
    return next((m.get("Name") for m in mounts if m.get("Destination") == "/spool"), None)


def test_the_streams_variant_scaled_to_two_marie_does_50_tasks_once_each(streams_stack: Stack):
    stack = streams_stack
    # Both replicas beat their own key; the orchestrator serves marie once one has (its outbox is made).
    wait_for(
        lambda: len(marie_replicas(stack)) == STREAMS_REPLICAS, 120, 1.0, lambda: f"2 replicas: {marie_replicas(stack)}"
    )
    ids = [f"streams-{n:02d}" for n in range(STREAMS_TASKS)]
    for task_id in ids:
        submit(stack, "marie", f"sleep=0.3 {task_id}", task_id)
    for task_id in ids:
        result = wait_state(stack, task_id, "done", timeout=300)["result"]
        assert result["status"] == "completed" and result["worker"] == "marie", result

    entries = result_stream(stack)
    by_task = Counter(entry["task_id"] for entry in entries)
    assert by_task == Counter(ids), f"not one result entry each: {by_task}"
    consumers = Counter(entry["consumer"] for entry in entries)
    assert len(consumers) == STREAMS_REPLICAS, consumers  # both replicas did work
    assert set(consumers) == set(marie_replicas(stack)), (consumers, marie_replicas(stack))
    # Each replica keeps its own runs on its own spool: between them, each task once.
    local: list[str] = []
    for index in range(1, STREAMS_REPLICAS + 1):
        listing = stack.exec("marie", "ls", "/spool/results/marie", index=index)
        assert listing.returncode == 0, listing.stderr
        runs = [name for name in listing.stdout.split() if name.endswith(".json")]
        assert runs, f"replica {index} ran nothing"
        local += runs
    assert sorted(local) == sorted(f"{task_id}.json" for task_id in ids)
    # No spool is shared: each replica and the orchestrator mount a /spool volume of their own.
    spools = [spool_volume(stack, "marie", i) for i in range(1, STREAMS_REPLICAS + 1)]
    spools.append(spool_volume(stack, "orchestrator"))
    assert len(set(spools)) == len(spools) and None not in spools, spools
    # Every result came back: the orchestrator's outbox is empty.
    outbox = stack.exec("orchestrator", "find", "/spool/tasks/marie", "-name", "*.json")
    assert outbox.returncode == 0 and outbox.stdout.split() == [], outbox.stdout + outbox.stderr


# -- 8. rebuilds ----------------------------------------------------------------------------------


def test_a_second_build_reuses_every_cached_layer(podman: Podman, images: Builds):
    assert podman.ensure_base() is False  # the debootstrap base is kept, not made again
    for image in IMAGES:
        output = podman.build(image)
        assert podman.image_id(image.tag) == images.ids[image.name], f"{image.name} was rebuilt:\n{output[-2000:]}"
        assert "Using cache" in output
