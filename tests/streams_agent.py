#!/usr/bin/env python3
"""An agent for the streams worker tests: says which task and attempt it runs, and can be slow.

``STREAMS_AGENT_SLEEP`` (seconds, in the tree's environment) makes every run of one replica slow,
so that a test can stop that replica mid-task while the other runs its tasks at once.
``STREAMS_AGENT_GATE`` (a path) makes each run wait until that file exists (at most 300 s): the test
says when the run ends, however slowly a loaded machine lets it look. Description words:
``kill-parent`` SIGKILLs the executor (a poison task), ``exit=N`` exits with N.
Usage: ``streams_agent.py -p -- DESCRIPTION``.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def main() -> int:
    description = sys.argv[-1]
    print(f"ran {os.environ.get('ACTIVATION_TASK_ID')} attempt {os.environ.get('ACTIVATION_ATTEMPT')}", flush=True)
    words = description.split()
    if "kill-parent" in words:
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(5)
    time.sleep(float(os.environ.get("STREAMS_AGENT_SLEEP") or 0))
    gate = os.environ.get("STREAMS_AGENT_GATE")
    deadline = time.monotonic() + 300
    while gate and not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.02)
    for word in words:
        if word.startswith("exit="):
            return int(word.partition("=")[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
