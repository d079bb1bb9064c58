"""Containment: no descendant of an agent outlives its timeout by more than the kill grace.

Each escape runs under each mechanism this machine offers: a cgroup v2 per agent, and the
subreaper sweep that every executor falls back to.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from activation.errors import ConfigError
from activation.worker import agent
from activation.worker.containment import (
    STRAY_MARKER,
    TaskCgroups,
    cgroup2_mount,
    choose_containment,
    containment_id,
    kill_strays,
    own_cgroup,
)
from tests.conftest import ROOT, wait_for

ESCAPE_AGENT = ROOT / "tests" / "escape_agent.py"
TIMEOUT = 1.0
GRACE = 0.5
SLACK = 10.0  # the bound of the poll, past timeout + grace: generous, as the machine is shared


def cgroups_or_skip(ident: str | None = None) -> TaskCgroups:
    """The executor's cgroups, entered by this test process as the executor enters them."""
    try:
        groups = TaskCgroups.probe(ident or f"test-{uuid.uuid4().hex[:8]}")
    except OSError as exc:
        pytest.skip(f"no usable cgroup v2 here: {exc}")
    groups.enter()
    return groups


@pytest.fixture(params=["cgroup", "subreaper"])
def mechanism(request: pytest.FixtureRequest) -> Iterator[TaskCgroups | None]:
    """The executor's setting for each mechanism: it is always a subreaper, with or without cgroups."""
    groups = cgroups_or_skip() if request.param == "cgroup" else None
    assert agent.become_subreaper(True)
    try:
        yield groups
    finally:
        agent.become_subreaper(False)
        if groups is not None:
            groups.close()
            assert not groups.root.exists(), "the executor's cgroup subtree is left behind"


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def escapees(pidfile: Path) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for line in pidfile.read_text().splitlines():
        kind, pid = line.split()
        found.setdefault(kind, []).append(int(pid))
    return found


def run_escape(groups: TaskCgroups | None, tmp_path: Path, *escapes: str) -> tuple[float, dict[str, list[int]]]:
    """Run the hostile agent to its timeout; when it started, and every pid it wrote."""
    pidfile = tmp_path / "pids"
    began = time.monotonic()
    run = agent.run_agent(
        [sys.executable, str(ESCAPE_AGENT), str(pidfile), *escapes],
        env={"PATH": os.environ.get("PATH", ""), STRAY_MARKER: "test"},
        timeout=TIMEOUT,
        kill_grace=GRACE,
        output_limit=4096,
        cgroups=groups,
    )
    assert run.exit_code != 0 or "--exit" in escapes, run.stderr
    return began, escapees(pidfile)


def assert_none_survives(began: float, pids: dict[str, list[int]], pidfile: Path) -> None:
    bound = TIMEOUT + GRACE + SLACK
    deadline = began + bound

    def all_gone() -> bool:
        every = [pid for found in escapees(pidfile).values() for pid in found]  # a chain may have grown
        return not any(alive(pid) for pid in every)

    wait_for(all_gone, max(deadline - time.monotonic(), 0.1), 0.05, f"every descendant gone within {bound}s")


@pytest.mark.parametrize("escape", ["env-i", "setsid", "double-fork", "fork-chain"])
@pytest.mark.parametrize("agent_exits", [False, True], ids=["agent-runs", "agent-exits"])
def test_no_descendant_survives_the_timeout(
    mechanism: TaskCgroups | None, tmp_path: Path, escape: str, agent_exits: bool
) -> None:
    args = [escape, "--exit"] if agent_exits else [escape]
    began, pids = run_escape(mechanism, tmp_path, *args)
    assert escape in pids, f"the agent never made its {escape} descendant: {pids}"
    assert_none_survives(began, pids, tmp_path / "pids")
    if mechanism is not None:
        assert list(mechanism.leftovers()) == [], "an agent cgroup is left behind"


def test_every_escape_at_once(mechanism: TaskCgroups | None, tmp_path: Path) -> None:
    began, pids = run_escape(mechanism, tmp_path, "env-i", "setsid", "double-fork", "fork-chain")
    assert {"agent", "env-i", "setsid", "double-fork", "fork-chain"} <= set(pids), pids
    assert_none_survives(began, pids, tmp_path / "pids")


def test_an_agent_that_leaves_its_cgroup_is_still_killed_by_the_sweep(tmp_path: Path) -> None:
    groups = cgroups_or_skip()
    assert agent.become_subreaper(True)
    try:
        began, pids = run_escape(groups, tmp_path, "cgroup-escape")
        assert "cgroup-escape" in pids, pids
        assert_none_survives(began, pids, tmp_path / "pids")
    finally:
        agent.become_subreaper(False)
        groups.close()


def test_the_sweep_ends_what_a_killed_executor_left_in_its_cgroups(tmp_path: Path) -> None:
    """A restarted executor finds its predecessor's agents by their cgroups, env -i or not."""
    ident = f"test-{uuid.uuid4().hex[:8]}"
    before = cgroups_or_skip(ident)
    pidfile = tmp_path / "pids"
    argv = [sys.executable, str(ESCAPE_AGENT), str(pidfile), "env-i", "setsid", "double-fork", "fork-chain"]
    orphan = subprocess.Popen(argv, env={}, start_new_session=True)  # born in the cgroup we wait in
    before.close()  # this "executor" leaves, as if SIGKILLed: it never looks at its agent again
    try:
        wait_for(lambda: pidfile.exists() and len(escapees(pidfile)) == 5, 10, what="every escape started")
        after = TaskCgroups.probe(ident)  # what the restarted executor sets up first
        killed = after.sweep(grace=GRACE)
        assert orphan.pid in killed
        assert_none_survives(time.monotonic() - TIMEOUT, escapees(pidfile), pidfile)
        assert list(after.leftovers()) == []
        after.close()
        assert not after.root.exists()
    finally:
        orphan.kill()
        orphan.wait(5)
        for group in TaskCgroups(before.root, before.home).leftovers():
            group.kill()
            group.wait_empty(5)
        before.close()


# -- choosing the mechanism -------------------------------------------------------------------


def test_subreaper_is_chosen_when_asked() -> None:
    groups, how = choose_containment("subreaper", "x")
    assert groups is None and "subreaper" in how


def test_cgroup_insisted_on_but_unavailable_is_a_one_line_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> TaskCgroups:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(TaskCgroups, "probe", refuse)
    with pytest.raises(ConfigError, match=r"^ACTIVATION_CONTAINMENT: .*Read-only file system$"):
        choose_containment("cgroup", "x")
    groups, how = choose_containment("auto", "x")
    assert groups is None and "Read-only file system" in how


def test_the_mount_and_own_cgroup_are_parsed_from_a_hybrid_host() -> None:
    mountinfo = (
        "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
        "31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "40 30 0:35 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"
    )
    assert cgroup2_mount(mountinfo) == Path("/sys/fs/cgroup/unified")
    assert cgroup2_mount("31 30 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n") is None
    assert own_cgroup("4:memory:/x\n0::/system.slice/a.service\n") == "/system.slice/a.service"
    assert own_cgroup("4:memory:/x\n") is None


def test_the_containment_id_names_no_path_and_tells_trees_apart() -> None:
    one = containment_id("w1", Path("/run/activation"))
    assert one == containment_id("w1", Path("/run/activation"))
    assert one != containment_id("w1", Path("/run/other"))
    assert "run" not in one and "/" not in one


def test_the_marker_sweep_ends_a_fork_chain_whose_executor_is_gone(tmp_path: Path) -> None:
    """Without cgroups: a chain that forks while it is being killed is ended round after round."""
    marker = f"test-{uuid.uuid4().hex[:8]}"
    pidfile = tmp_path / "pids"
    argv = [sys.executable, str(ESCAPE_AGENT), str(pidfile), "--exit", "fork-chain", "setsid", "double-fork"]
    subprocess.run(argv, env={STRAY_MARKER: marker}, check=True, timeout=30)  # the agent exits: orphans only
    wait_for(lambda: {"fork-chain", "setsid", "double-fork"} <= set(escapees(pidfile)), 10, what="the escapes")
    killed = kill_strays(marker, grace=GRACE)
    assert killed
    assert_none_survives(time.monotonic() - TIMEOUT, escapees(pidfile), pidfile)
