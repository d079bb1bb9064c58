"""The executor against the real Claude Code CLI (`claude -p … --output-format json`) in a real worker tree.

Claude talks to the loopback fake API of tests/fake_anthropic.py, which each test scripts by a
marker in the task's description. What these tests pin down, as observed with the pinned version:
success is rc 0 with an envelope ``is_error: false``; an API error is rc 1 with ``is_error: true``
(subtype still "success"), on stdout; SIGINT makes claude stop its tools (which run in sessions
of their own) and exit rc 0 with ``is_error: true``, subtype "error_during_execution" -- except
within about half a second of its first request, when it exits 0 and prints nothing at all.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.e2e.conftest import CANNED_REPLY, cmdline, is_claude, of_task, processes, uses_fake
from tests.fake_anthropic import Behaviour, FakeAnthropic, error, reply, slow, tool_use
from tests.harness import WorkerTree, wait_until

SETTLE = 1.0  # seconds after its first API request before an interrupt gets claude's envelope


def envelope(result: dict[str, Any]) -> dict[str, Any]:
    agent = result.get("agent")
    assert isinstance(agent, dict), f"no parsed envelope in the result; stdout was {result.get('stdout')!r}"
    assert agent.get("type") == "result", agent
    return agent


def gone(proc: psutil.Process) -> bool:
    try:
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def assert_nothing_left(fake: FakeAnthropic, task_id: str, claude: Path) -> None:
    """No process of the task survives: not claude, not anything claude started."""
    url = fake.url

    def survivors() -> list[str]:
        procs = processes(lambda p: uses_fake(p, url) and (of_task(p, task_id) or is_claude(p, claude)))
        return [f"{p.pid} {cmdline(p)[:100]}" for p in procs if not gone(p)]

    # Bounded poll: the result is written after the executor's last kill round, so this is quick.
    try:
        wait_until(lambda: not survivors(), 5, 0.05)
    except TimeoutError:
        pytest.fail(f"processes of {task_id} outlived it: {survivors()}")


@pytest.mark.slow
def test_task_completes_with_the_envelope(claude_tree: WorkerTree, fake_api: FakeAnthropic) -> None:
    # Quotes, a semicolon and $HOME: the description must reach claude as one argv word, untouched.
    description = "e2e-ok: say hello; echo $HOME 'single' \"double\" && exit 3"
    fake_api.on("e2e-ok", reply(CANNED_REPLY))

    claude_tree.write_task("ok-1", description)
    result = claude_tree.wait_result("ok-1", timeout=30)

    assert result["status"] == "completed", result
    assert result["exit_code"] == 0
    agent = envelope(result)
    assert agent["is_error"] is False
    assert agent["subtype"] == "success"
    assert agent["result"] == CANNED_REPLY
    assert isinstance(result["activation_latency_ms"], int | float)
    assert result["activation_latency_ms"] >= 0
    # What claude sent: one streamed messages call carrying the description verbatim, with our key.
    calls = fake_api.messages("e2e-ok")
    assert len(calls) == 1, fake_api.paths()
    assert description in calls[0].prompt
    assert calls[0].body["stream"] is True
    assert calls[0].headers.get("x-api-key") == "sk-ant-e2e-dummy-key"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("behaviour", "requests"),
    [
        pytest.param(error(401, "invalid x-api-key"), 1, id="401-not-retried"),
        # No x-should-retry header: claude retries once (CLAUDE_CODE_MAX_RETRIES=1), then gives up.
        pytest.param(error(529, "Overloaded", retry=None), 2, id="529-retried-then-failed"),
    ],
)
def test_api_error_fails_the_task(
    claude_tree: WorkerTree, fake_api: FakeAnthropic, behaviour: Behaviour, requests: int
) -> None:
    fake_api.on("e2e-error", behaviour)

    claude_tree.write_task("err-1", "e2e-error: say hello")
    result = claude_tree.wait_result("err-1", timeout=30)

    assert result["status"] == "failed", result
    assert result["exit_code"] == 1  # claude reports API errors with rc 1 …
    agent = envelope(result)  # … and the envelope on stdout
    assert agent["is_error"] is True
    assert agent["api_error_status"] == behaviour.status
    assert isinstance(agent["result"], str) and agent["result"]  # claude's own wording, e.g. "Invalid API key"
    assert len(fake_api.messages("e2e-error")) == requests, fake_api.paths()


def interrupt(tree: WorkerTree, fake: FakeAnthropic, claude: Path, task_id: str) -> dict[str, Any]:
    """Run a task whose API call hangs, SIGINT its claude from outside the executor, return the result."""
    seen = len(fake.messages("e2e-interrupted"))
    tree.write_task(task_id, f"e2e-interrupted: take your time ({task_id})", timeout=60)
    wait_until(lambda: len(fake.messages("e2e-interrupted")) > seen, 20, 0.05, "claude's request")
    (agent_proc,) = processes(lambda p: of_task(p, task_id) and is_claude(p, claude))
    # Interrupted within about half a second of its first request, the pinned claude exits 0 and
    # prints nothing at all (almost always once ~/.claude.json exists); nothing observable says
    # when that window closes, so wait it out.
    time.sleep(SETTLE)
    agent_proc.send_signal(signal.SIGINT)
    return tree.wait_result(task_id, timeout=20)


@pytest.mark.slow
def test_is_error_with_exit_code_zero_is_failed(
    claude_tree: WorkerTree, fake_api: FakeAnthropic, claude_bin: Path
) -> None:
    """SIGINT from outside the executor: claude exits 0 but says is_error, so the task failed."""
    fake_api.on("e2e-interrupted", slow(30))
    for attempt in range(1, 4):
        result = interrupt(claude_tree, fake_api, claude_bin, f"int-{attempt}")
        assert result["exit_code"] == 0
        if result["agent"] is not None:
            break
        # Claude said nothing (see interrupt); the executor then reports "completed". Not this test's case.
    agent = envelope(result)
    assert agent["is_error"] is True
    assert agent["subtype"] == "error_during_execution"
    assert result["status"] == "failed", result


# Task timeouts for the tests that need the timeout to strike mid-run: claude (node) can take
# longer than the first to start on a loaded machine, and then it is killed before it gets there.
TIMEOUTS = (3, 6, 12, 24)


def time_out_mid_run(tree: WorkerTree, name: str, description: str, reached: Callable[[], Any]) -> tuple[str, int, Any]:
    """Run the task with growing timeouts until claude gets as far as ``reached`` before the timeout.

    A try that times out earlier must still be a clean timeout, with nothing left behind. Returns
    the task id of the try that got there, its timeout, and what ``reached`` returned.
    """
    for timeout in TIMEOUTS:
        task_id = f"{name}-{timeout}"
        tree.write_task(task_id, description, timeout=timeout)

        def progress(task_id: str = task_id) -> tuple[str, Any] | None:
            if got := reached():
                return "reached", got
            if result := tree.result(task_id):
                return "ended", result
            return None

        what, got = wait_until(progress, timeout + 20, 0.05, f"{task_id} to get there or end")
        if what == "reached":
            return task_id, timeout, got
        assert got["status"] == "timeout", got  # killed before it got there: still a clean timeout
    pytest.fail(f"claude never got there within a timeout of {TIMEOUTS[-1]} s")


@pytest.mark.slow
def test_timeout_kills_claude(claude_tree: WorkerTree, fake_api: FakeAnthropic, claude_bin: Path) -> None:
    fake_api.on("e2e-slow", slow(60))

    task_id, timeout, _ = time_out_mid_run(
        claude_tree, "slow", "e2e-slow: take your time", lambda: fake_api.messages("e2e-slow")
    )
    result = claude_tree.wait_result(task_id, timeout=20)

    assert result["status"] == "timeout", result
    assert timeout <= result["duration_s"] < timeout + 1 + 5  # the timeout, the kill grace (1 s), some slack
    assert_nothing_left(fake_api, task_id, claude_bin)
    if result["agent"] is not None:  # claude heeded the SIGINT in time and said so
        assert result["agent"]["is_error"] is True


@pytest.mark.slow
def test_timeout_kills_the_tools_claude_started(
    claude_tree: WorkerTree, fake_api: FakeAnthropic, claude_bin: Path
) -> None:
    """Claude's Bash tool runs its command in a new session; the timeout must still reach it."""
    tag = f"e2e-tool-{os.getpid()}"
    sleeper = f"{shlex.quote(sys.executable)} -c 'import time; time.sleep(120)' {tag}"
    fake_api.on("e2e-tool", tool_use("Bash", command=sleeper, description="wait a while"))
    url = fake_api.url

    def sleeper_running() -> tuple[psutil.Process, list[str], int, int] | None:
        """The tool, its command line and both sessions, read while the tool and claude both live.

        Read at once: the timeout may kill them a moment later. If it already has, this try is not
        the one, and time_out_mid_run sees its timeout result instead.
        """
        # The python itself, not the bash wrapper whose command line also carries the tag.
        tools = processes(lambda p: uses_fake(p, url) and p.cmdline()[:2] == [sys.executable, "-c"])
        agents = processes(lambda p: uses_fake(p, url) and is_claude(p, claude_bin))
        if not tools or len(agents) != 1:
            return None
        try:
            return tools[0], tools[0].cmdline(), os.getsid(tools[0].pid), os.getsid(agents[0].pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            return None

    task_id, _, seen = time_out_mid_run(claude_tree, "tool", "e2e-tool: run the sleeper", sleeper_running)
    asked = len(fake_api.messages())  # a try killed before the tool ran may have asked too
    tool, tool_cmdline, tool_sid, agent_sid = seen
    assert tag in tool_cmdline
    assert tool_sid != agent_sid  # DESIGN.md's trap: the tool has its own session
    result = claude_tree.wait_result(task_id, timeout=40)

    assert result["status"] == "timeout", result
    assert gone(tool)
    assert_nothing_left(fake_api, task_id, claude_bin)
    assert len(fake_api.messages()) == asked  # the tool never finished, so claude never came back


# -- the fake itself, without claude: these run even where the CLI is not installed ------------


def _post(url: str, body: dict[str, Any], timeout: float = 10) -> tuple[int, dict[str, str], str]:
    request = urllib.request.Request(
        f"{url}/v1/messages?beta=true", json.dumps(body).encode(), {"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, dict(response.headers.items()), response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, dict(exc.headers.items()), exc.read().decode()


def test_fake_api_streams_and_fails_as_scripted(fake_api: FakeAnthropic) -> None:
    fake_api.on("boom", error(529, "Overloaded"))
    question = {"model": "m", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}

    status, _, text = _post(fake_api.url, {**question, "stream": True})
    events = [line.removeprefix("event: ") for line in text.splitlines() if line.startswith("event: ")]
    assert status == 200
    assert events == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert CANNED_REPLY in text

    status, _, text = _post(fake_api.url, question)
    assert status == 200
    assert json.loads(text)["content"] == [{"type": "text", "text": CANNED_REPLY}]

    boom = {**question, "messages": [{"role": "user", "content": [{"type": "text", "text": "boom"}]}]}
    status, headers, text = _post(fake_api.url, boom)
    assert status == 529
    assert headers.get("x-should-retry") == "false"
    assert json.loads(text)["error"]["type"] == "overloaded_error"
    assert [r.prompt for r in fake_api.messages()] == ["hi", "hi", "boom"]


def test_fake_api_stop_releases_a_held_response() -> None:
    fake = FakeAnthropic(slow(60)).start()
    question = {"model": "m", "max_tokens": 10, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as conn:
            body = json.dumps(question).encode()
            head = f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            conn.sendall(head + body)
            received = b""
            while b"message_start" not in received:  # headers and message_start come, then it holds
                chunk = conn.recv(65536)
                assert chunk, f"connection closed early: {received!r}"
                received += chunk
            started = time.monotonic()
            fake.stop()  # the leak check fails this test if a handler thread outlives stop()
            assert time.monotonic() - started < 3
    finally:
        fake.stop()


@pytest.mark.slow
def test_a_description_too_long_for_argv_reaches_claude_on_stdin(
    claude_tree: WorkerTree, fake_api: FakeAnthropic
) -> None:
    """Issue 10, class 2: past MAX_ARG_STRLEN (128 KiB) the description is claude's stdin, whole."""
    from activation.worker.spawn import MAX_ARG_STRLEN

    head, tail = "e2e-long-head --version", "e2e-long-tail"  # a leading option-like word stays prompt text
    description = f"{head} {'w' * (MAX_ARG_STRLEN + 4096)} {tail}"
    fake_api.on("e2e-long-head", reply(CANNED_REPLY))

    claude_tree.write_task("long-1", description)
    result = claude_tree.wait_result("long-1", timeout=60)

    assert result["status"] == "completed", result
    assert envelope(result)["result"] == CANNED_REPLY
    prompts = [r.prompt for r in fake_api.requests if r.is_messages and "e2e-long-head" in r.prompt]
    assert prompts, "claude never sent the description to the API"
    assert head in prompts[0] and tail in prompts[0], "the whole description, from its first word to its last"
    assert "w" * (MAX_ARG_STRLEN + 4096) in prompts[0]
