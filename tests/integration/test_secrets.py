"""Secrets stay secret from the agent, which runs as the worker's own uid.

The whole tree runs as an unprivileged user (as in the containers: uid 1000). A hostile agent
reads every ancestor's and every other process's ``/proc/<pid>/environ`` and every file of the
run folder; none of the admin token, the Redis password or the work-queue key may be in what
it read. (As root, nothing of this holds: root reads any process's memory. See the README.)
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from activation.spool.layout import Spool
from tests.conftest import ROOT
from tests.harness import RedisServer, WorkerTree, tree_environment

SNOOP_AGENT = ROOT / "tests" / "snoop_agent.py"
REDIS_PASSWORD = "redis-pw-4be1d07c93"
ADMIN_TOKEN = "admin-token-5e2a90f1c8"
UID = 1000


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder the unprivileged user owns (pytest's tmp_path is root's, and private)."""
    path = Path(tempfile.mkdtemp(prefix="acts-"))
    os.chown(path, UID, UID)
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def checkout_reachable() -> Iterator[None]:
    """Let UID walk to the checkout and its virtualenv: a clone in a private folder (``mktemp -d``
    makes one 0700) would hide the package from the tree. Only the search bit (o+x) is added,
    to the folders on the way that lack it (not under /root: see as_unprivileged_user), and
    taken back afterwards."""
    changed: list[tuple[Path, int]] = []
    for place in (ROOT, Path(sys.prefix)):
        for folder in [place, *place.parents]:
            if folder.is_relative_to("/root"):
                continue
            mode = folder.stat().st_mode
            if not mode & 0o001 and (folder, mode) not in changed:
                changed.append((folder, mode))
                folder.chmod((mode & 0o7777) | 0o001)
    try:
        yield
    finally:
        for folder, mode in reversed(changed):
            folder.chmod(mode & 0o7777)


def chown_tree(path: Path) -> None:
    os.chown(path, UID, UID)
    for child in path.rglob("*"):
        os.chown(child, UID, UID, follow_symlinks=False)


def as_unprivileged_user(base: Path) -> list[str]:
    """The command prefix that runs the tree as UID, in a mount namespace of its own.

    This machine's interpreter lives under /root (mode 0700), where UID cannot reach it; in a
    private mount namespace, which ends with the tree, /root becomes a world-readable tmpfs that
    holds only a bind of the interpreter's folder.
    """
    interpreter = Path(sys.executable).resolve()
    if not interpreter.is_relative_to("/root"):
        return ["setpriv", f"--reuid={UID}", f"--regid={UID}", "--clear-groups"]
    top = Path("/root") / interpreter.relative_to("/root").parts[0]  # e.g. /root/.pyenv
    stash = base / "stash"
    script = (
        f"mkdir -p {stash} && mount --bind {top} {stash} && mount -t tmpfs -o mode=0755 tmpfs /root"
        f" && mkdir {top} && mount --bind {stash} {top}"
        f' && exec setpriv --reuid={UID} --regid={UID} --clear-groups "$@"'
    )
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"]


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to start the tree as an unprivileged user")
def test_the_agent_reads_no_secret_from_any_process_or_the_run_folder(
    tmp_path: Path, base: Path, checkout_reachable: None
) -> None:
    redis = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD).start()
    spool = Spool(base / "spool")
    spool.init(["w1"])
    chown_tree(spool.root)
    run_dir = base / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, UID, UID)
    report_path = base / "report.json"
    agent = shlex.join([sys.executable, str(SNOOP_AGENT), str(run_dir), str(report_path)]) + " -p -- {description}"
    env = tree_environment(
        spool,
        run_dir,
        "w1",
        agent,
        REDIS_URL=redis.url,
        ACTIVATION_MODE="inotify,redis",
        ACTIVATION_ADMIN_TOKEN=ADMIN_TOKEN,
        HOME=str(base),
    )
    tree = WorkerTree(spool, run_dir, "w1", env, tmp_path / "supervisord-w1.log")
    tree.prefix = as_unprivileged_user(base)
    tree.log.touch()
    os.chown(tree.log, UID, UID)  # supervisord reopens its stdout (/dev/stdout) as that user
    try:
        tree.start()
        executor = tree.pid("executor")
        queue_key = environ_of(executor).get("ACTIVATION_QUEUE_KEY")  # root may look; the agent may not
        assert queue_key, "activation.supervise gives the programs a queue key in their environment"
        tree.write_task("snoop", "look around")
        result = tree.wait_result("snoop")
        assert result["status"] == "completed", result["stderr"]
        report = json.loads(report_path.read_text())
        assert report["uid"] == UID
        assert "ACTIVATION_TASK_ID=snoop" in report["self_environ"], "the agent can read an environ: its own"
        assert str(executor) in report["ancestors"] and str(tree.process.pid) in report["ancestors"]
        for pid in (executor, tree.process.pid):
            assert report["ancestors"][str(pid)].startswith("ERROR PermissionError"), report["ancestors"]
            assert report["ancestor_maps"][str(pid)].startswith("ERROR PermissionError")
        assert not (run_dir / "queue.key").exists()
        seen = json.dumps(report)
        for name, secret in (
            ("the Redis password", REDIS_PASSWORD),
            ("the admin token", ADMIN_TOKEN),
            ("the queue key", queue_key),
            ("the run folder's name in the agent's own environment", f"={run_dir}"),
        ):
            assert secret not in seen, f"the agent read {name}"
    finally:
        tree.kill_everything()
        redis.stop()
