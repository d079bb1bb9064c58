"""Fixtures shared by every test: a fresh spool, settings, the fake agent, and a leak check."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from activation.config import Settings, load_settings
from activation.spool.layout import Spool
from tests.harness import FAKE_AGENT, ROOT, RedisServer, fake_agent_command, wait_until

WORKER = "w1"
__all__ = ["FAKE_AGENT", "ROOT", "fake_agent_command", "wait_for"]


def wait_for(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str | Callable[[], str] = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test after ``timeout``."""
    try:
        return wait_until(predicate, timeout, interval, what)
    except TimeoutError as exc:
        pytest.fail(str(exc))


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A short private folder: Unix socket paths must stay under 108 bytes."""
    path = Path(tempfile.mkdtemp(prefix="act-"))
    path.chmod(0o700)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool")
    spool.init([WORKER])
    return spool


@pytest.fixture
def make_settings(spool: Spool, run_dir: Path) -> Callable[..., Settings]:
    """Settings for worker w1 on the test's spool; keyword arguments override fields."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "worker_name": WORKER,
            "spool": spool.root,
            "run_dir": run_dir,
            "agent_command": fake_agent_command(),
            "metrics_port": 0,
        }
        values.update(overrides)
        return load_settings(env={}, **values)

    return make


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Fail any test that leaves a child process or a thread running behind it."""
    threads_before = set(threading.enumerate())
    yield
    me = psutil.Process()
    deadline = time.monotonic() + 5
    while True:
        children = [p for p in me.children(recursive=True) if _alive(p)]
        threads = [t for t in threading.enumerate() if t not in threads_before and t.is_alive()]
        if not children and not threads:
            return
        if time.monotonic() > deadline:
            for child in children:
                child.kill()
            pytest.fail(
                "test leaked "
                + ", ".join(
                    [f"process {p.pid} {_cmdline(p)}" for p in children] + [f"thread {t.name}" for t in threads]
                )
            )
        time.sleep(0.05)


def _alive(process: psutil.Process) -> bool:
    try:
        if process.status() == psutil.STATUS_ZOMBIE:
            os.waitpid(process.pid, os.WNOHANG)
            return False
        return True
    except (psutil.NoSuchProcess, ChildProcessError):
        return False


def _cmdline(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())[:120]
    except psutil.Error:
        return "?"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free port, stopped after the test."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


# Every test that starts real process trees (supervisord, a Redis cluster, containers) lives
# outside tests/unit and is slow by that fact; `make check` runs the rest.
SLOW_FOLDERS = ("integration", "chaos", "e2e", "containers", "observability", "hosts")

# `make test` runs the suite in several pytest-xdist workers (--dist loadgroup): most slow tests
# wait on timers and processes, not on the CPU. The tests of a folder named here run one after
# the other, in one worker, because they share something of the machine's:
SERIAL_FOLDERS = (
    "containers",  # podman: the image builds, the compose stacks and the API service of a module
    "hosts",  # network namespaces: each Network takes a /24 that no route uses yet
    "chaos",  # the chaos runs and the 30,000-file burst, which take the machine's CPU and disk
)
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.relative_to(TESTS).parts if item.path.is_relative_to(TESTS) else ()
        if len(parts) > 1 and parts[0] in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """With --dist loadgroup, the groups are the SERIAL_FOLDERS (tests/xdist_groups.py says why
    not xdist_group marks)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from tests.xdist_groups import FolderGroups

    return FolderGroups(config, log, SERIAL_FOLDERS)
