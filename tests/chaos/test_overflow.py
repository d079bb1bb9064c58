"""A burst far past the inotify queue: every task still gets exactly one result, thanks to the rescan."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from activation.spool.task import is_task_name
from tests.conftest import wait_for
from tests.harness import new_tree


def _queue_size() -> int:
    try:
        return int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    except (OSError, ValueError):
        return 16384  # the kernel's default


# As many files as the kernel's inotify queue holds events: each file makes two (measured here:
# 8,000 files never overflowed a 16,384-event queue, 10,000 did), so the burst is twice the queue.
# It was 30,000 files, 200 s of the suite's longest worker, proving no more.
BURST = int(os.environ.get("ACTIVATION_OVERFLOW_BURST", str(_queue_size())))


@pytest.mark.slow
@pytest.mark.timeout(1600)  # its own wait is 1,500 s: under a loaded make test the burst took over 600
def test_a_burst_twice_the_inotify_queue_overflows_it_and_loses_nothing(tmp_path: Path) -> None:
    tree = new_tree(tmp_path, agent="true -- {description}", ACTIVATION_HEARTBEAT_INTERVAL="2")
    try:
        tree.start()
        inbox = tree.spool.inbox(tree.worker)
        payload = '{"task_id": "%s", "description": "x"}'
        # A listener that keeps up never overflows; a paused one surely does, as a busy or
        # swapped-out one would: the burst makes twice the events the kernel queue holds.
        listener = tree.pid("listener")
        os.kill(listener, signal.SIGSTOP)
        try:
            for i in range(BURST):
                task_id = f"o{i:06d}"
                tmp = inbox / f".tmp_{task_id}.json"
                tmp.write_text(payload % task_id)
                os.rename(tmp, inbox / f"{task_id}.json")
        finally:
            os.kill(listener, signal.SIGCONT)
        results = tree.spool.results(tree.worker)
        began = time.monotonic()

        def names() -> list[str]:
            return [name for name in os.listdir(results) if is_task_name(name)]  # not the tasks' logs

        # The bound only ends a hung run: beside three other xdist workers and an image build the
        # executor once managed 18,000 of them in 500 s.
        wait_for(lambda: len(names()) >= BURST, 1500, 0.5, lambda: f"{BURST} results\n{tree.log_tail()}")
        elapsed = time.monotonic() - began
        time.sleep(1)
        found = names()
        assert len(found) == BURST == len(set(found))
        assert tree.spool.count_inbox(tree.worker) == 0
        assert not os.listdir(tree.spool.processing(tree.worker))
        log = tree.log_tail(100000)
        overflows = log.count("overflow")
        print(f"{BURST} tasks, {overflows} overflow log lines, drained in {elapsed:.1f}s after the writes")
        assert overflows >= 1, "the burst did not overflow inotify: the test proves nothing"
        beat = json.loads(tree.spool.heartbeat_path(tree.worker).read_text())
        assert beat["listener"]["overflows"] >= 1
    finally:
        tree.kill_everything()
