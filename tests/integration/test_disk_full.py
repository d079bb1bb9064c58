"""A full disk: dispatch says so in one line, a result that cannot be written is retried, never lost."""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.harness import BIN, WorkerTree, listener_rescans, new_tree


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, mounted for this test and unmounted after it."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip() or 'not permitted'}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path) -> Path:
    """Take every free byte of the filesystem under ``folder``."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)
    with pytest.raises(OSError) as caught:
        (folder / "probe").write_bytes(b"x" * 4096)
    assert caught.value.errno == errno.ENOSPC
    return filler


def test_a_full_disk_loses_nothing_and_recovers(small_disk: Path, tmp_path: Path) -> None:
    tree: WorkerTree = new_tree(small_disk, ACTIVATION_HEARTBEAT_INTERVAL="0.5")
    tree.log = tmp_path / "supervisord.log"  # the log must not need the full disk
    try:
        tree.start()
        tree.ctl("stop", "executor")
        tree.write_task("before-full", "x")
        filler = fill(small_disk)

        dispatched = subprocess.run(
            [str(BIN / "activation"), "dispatch", "w1", "hello"], env=tree.env, capture_output=True, text=True
        )
        assert dispatched.returncode == 1
        assert dispatched.stderr.count("\n") == 1 and "no space left" in dispatched.stderr, dispatched.stderr

        tree.ctl("start", "executor")
        wait_for(lambda: "cannot write the result of before-full" in tree.log_tail(200), 30, 0.1, "a failed write")
        assert tree.result("before-full") is None
        assert tree.spool.locate("before-full") is not None  # still pending or claimed: not lost

        os.unlink(filler)
        result = tree.wait_result("before-full", 30)
        assert result["status"] == "completed"
        assert tree.result_ids() == ["before-full"]
        sent = subprocess.run(
            [str(BIN / "activation"), "dispatch", "w1", "after", "--wait", "--wait-timeout", "30"],
            env=tree.env,
            capture_output=True,
            text=True,
        )
        assert sent.returncode == 0, sent.stderr
    finally:
        tree.kill_everything()


def test_a_full_disk_never_runs_a_finished_agent_again(small_disk: Path, tmp_path: Path) -> None:
    """Class 4: the run's outcome is kept while the write fails; the agent ran once, attempts stays 1."""
    tree: WorkerTree = new_tree(small_disk, ACTIVATION_HEARTBEAT_INTERVAL="0.5")
    tree.log = tmp_path / "supervisord.log"
    record = tmp_path / "runs"  # outside the full disk: it counts the agent's runs
    try:
        tree.start()
        tree.ctl("stop", "executor")
        tree.write_task("paid-once", f"record={record}")
        filler = fill(small_disk)
        tree.ctl("start", "executor")

        def check_names_it() -> bool:
            done = tree.cli("check", "w1")
            return done.returncode == 1 and "spool full" in done.stderr

        # The heartbeat cannot write on a full disk either: check looks at the spool itself.
        wait_for(check_names_it, 30, 0.2, lambda: f"check to name the full spool; log:\n{tree.log_tail()}")
        wait_for(lambda: "cannot write the result of paid-once" in tree.log_tail(200), 30, 0.2, "the failed write")
        rescans = listener_rescans(tree)
        wait_for(lambda: listener_rescans(tree) >= rescans + 3, 30, 0.2, "three rescans while the write fails")
        assert len(record.read_text().splitlines()) == 1, "the agent ran once, whatever the rescans queued"
        assert tree.spool.claim_path("w1", "paid-once").exists()

        os.unlink(filler)
        result = tree.wait_result("paid-once", 60)
        assert result["status"] == "completed" and result["attempts"] == 1
        assert len(record.read_text().splitlines()) == 1
        wait_for(lambda: tree.cli("check", "w1").returncode == 0, 30, 0.2, "healthy once the write went through")
    finally:
        tree.kill_everything()
