"""Fixtures for the end-to-end tests: the real Claude Code CLI in a real worker tree, against a fake API.

The CLI is the pinned npm package that ``tests/e2e/install_claude.sh`` puts in ``<repo>/.claude-cli``;
without it (or with another version there) these tests are skipped and say how to install it.
Claude talks only to the loopback fake (``tests/fake_anthropic.py``), with everything non-essential off.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest

from tests.fake_anthropic import FakeAnthropic, reply
from tests.harness import ROOT, WorkerTree, new_tree

INSTALL_SCRIPT = ROOT / "tests" / "e2e" / "install_claude.sh"
CLAUDE = ROOT / ".claude-cli" / "node_modules" / ".bin" / "claude"
CANNED_REPLY = "The fake API says: task understood, nothing to do."
INSTALL_HINT = (
    f"run {INSTALL_SCRIPT.relative_to(ROOT)} (installs the pinned @anthropic-ai/claude-code into .claude-cli/)"
)

# Inherited variables that would point claude elsewhere (a real key, a proxy, another config).
_DROPPED = re.compile(r"^(ANTHROPIC_|CLAUDE|AWS_|GOOGLE_|VERTEX_)|^(https?|all|no)_proxy$", re.IGNORECASE)


def pinned_version() -> str:
    match = re.search(r"^CLAUDE_CODE_VERSION=(\S+)", INSTALL_SCRIPT.read_text(), re.MULTILINE)
    assert match, f"no CLAUDE_CODE_VERSION= line in {INSTALL_SCRIPT}"
    return match.group(1)


@pytest.fixture(scope="session")
def claude_bin() -> Path:
    """The installed claude entry point, if it is the pinned version; otherwise skip."""
    if not CLAUDE.exists():
        pytest.skip(f"Claude Code CLI not installed: {INSTALL_HINT}")
    pin = pinned_version()
    try:
        out = subprocess.run(
            [str(CLAUDE), "--version"], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"{CLAUDE} does not run ({exc}): {INSTALL_HINT}")
    if out != f"{pin} (Claude Code)":
        pytest.skip(f"{CLAUDE} says {out!r}, the pin is {pin}: {INSTALL_HINT}")
    return CLAUDE


@pytest.fixture
def fake_api() -> Iterator[FakeAnthropic]:
    """The loopback fake Anthropic API, answering CANNED_REPLY unless the test scripts otherwise."""
    fake = FakeAnthropic(reply(CANNED_REPLY)).start()
    yield fake
    fake.stop()


def agent_command(claude: Path) -> str:
    """ACTIVATION_AGENT_COMMAND as a production worker would set it.

    A worker has nobody to approve tool use, hence --dangerously-skip-permissions; claude refuses
    that flag as root unless IS_SANDBOX=1 (see claude_environment).
    """
    return f"{shlex.quote(str(claude))} --output-format json --dangerously-skip-permissions -p -- {{description}}"


def claude_environment(fake: FakeAnthropic, home: Path) -> dict[str, str]:
    env = {
        "ANTHROPIC_BASE_URL": fake.url,
        "ANTHROPIC_API_KEY": "sk-ant-e2e-dummy-key",
        "HOME": str(home),  # claude writes ~/.claude.json, sessions and shell snapshots there
        "DISABLE_TELEMETRY": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # claude retries 5xx with exponential backoff for minutes by default; one retry is enough here
        "CLAUDE_CODE_MAX_RETRIES": "1",
        "NO_PROXY": "127.0.0.1,localhost",
    }
    if os.geteuid() == 0:
        env["IS_SANDBOX"] = "1"
    return env


@pytest.fixture
def claude_tree(
    claude_bin: Path, fake_api: FakeAnthropic, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[WorkerTree]:
    """A started worker tree whose agent is the real claude, talking to ``fake_api``."""
    home = tmp_path / "home"
    workdir = tmp_path / "workdir"
    home.mkdir()
    workdir.mkdir()
    # The agent inherits supervisord's working directory (the executor sets none): keep claude,
    # and any tool it runs, out of the repo.
    monkeypatch.chdir(workdir)
    tree = new_tree(tmp_path, "claude", agent=agent_command(claude_bin))
    for key in [k for k in tree.env if _DROPPED.match(k)]:
        del tree.env[key]
    tree.env.update(claude_environment(fake_api, home))
    url = fake_api.url
    try:
        tree.start()
        yield tree
    finally:
        tree.kill_everything()
        kill_matching(lambda proc: uses_fake(proc, url))


def cmdline(proc: psutil.Process) -> str:
    with contextlib.suppress(psutil.Error):
        return " ".join(proc.cmdline())
    return ""


def is_claude(proc: psutil.Process, claude: Path) -> bool:
    """A process running the CLI: by argv (the .bin symlink) or by executable (its target)."""
    line = cmdline(proc)
    if str(claude) in line or str(claude.resolve()) in line:
        return True
    with contextlib.suppress(psutil.Error):
        return proc.exe() == str(claude.resolve())
    return False


def of_task(proc: psutil.Process, task_id: str) -> bool:
    """A process that the executor started for ``task_id`` (the agent and all it spawned)."""
    with contextlib.suppress(psutil.Error):
        return proc.environ().get("ACTIVATION_TASK_ID") == task_id
    return False


def uses_fake(proc: psutil.Process, url: str) -> bool:
    """A process of one test's agents: claude and its tools inherit ANTHROPIC_BASE_URL (a unique port)."""
    with contextlib.suppress(psutil.Error):
        return proc.environ().get("ANTHROPIC_BASE_URL") == url
    return False


def processes(predicate: Callable[[psutil.Process], bool]) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.status() != psutil.STATUS_ZOMBIE and predicate(proc):
                found.append(proc)
    return found


def kill_matching(predicate: Callable[[psutil.Process], bool]) -> None:
    """Last-resort cleanup, so that a failed test leaves nothing running on the machine."""
    procs = processes(predicate)
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    psutil.wait_procs(procs, timeout=5)
