"""A hostile fake agent: it leaves descendants behind by every escape it is told to try.

    escape_agent.py PIDFILE [--exit] ESCAPE... [-p -- DESCRIPTION]

ESCAPE is one of:
- ``env-i``: a child started through ``env -i``, with no environment at all (no marker);
- ``setsid``: a child in a session of its own;
- ``double-fork``: a grandchild whose parent exited at once (re-parented);
- ``fork-chain``: a process that keeps forking and letting its parent exit, so its pid moves;
- ``cgroup-escape``: a child that moves itself into its grandparent cgroup (when it may).

Every such process ignores SIGINT and SIGTERM, appends ``<escape> <pid>`` to PIDFILE, and sleeps.
Then the agent itself sleeps too (ignoring SIGINT), or with ``--exit`` exits at once. Everything
from ``-p`` on (the shape of an agent command template) is ignored.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

ESCAPES = ("env-i", "setsid", "double-fork", "fork-chain", "cgroup-escape")


def note(pidfile: str, kind: str) -> None:
    fd = os.open(pidfile, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{kind} {os.getpid()}\n".encode())
    finally:
        os.close(fd)


def stubborn() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def hold(pidfile: str, kind: str) -> None:
    stubborn()
    note(pidfile, kind)
    while True:
        time.sleep(60)


def chain(pidfile: str) -> None:
    stubborn()
    while True:
        note(pidfile, "fork-chain")
        time.sleep(0.02)
        if os.fork() != 0:
            os._exit(0)  # the parent goes; its child carries on under a new pid


def leave_cgroup() -> None:
    """Move this process two levels up its cgroup v2 tree, out of the agent's own cgroup."""
    try:
        cgroups = Path("/proc/self/cgroup").read_text().splitlines()
        own = next(line[3:].strip() for line in cgroups if line.startswith("0::"))
        mounts = [line.split(" - ") for line in Path("/proc/self/mountinfo").read_text().splitlines()]
        mount = next(left.split()[4] for left, right in mounts if right.startswith("cgroup2 "))
        target = os.path.join(mount, os.path.dirname(os.path.dirname(own)).lstrip("/"), "cgroup.procs")
        with open(target, "w") as procs:
            procs.write("0")
    except (OSError, StopIteration):
        pass  # not allowed here: it stays where it is, and is killed like the others


def spawn(pidfile: str, kind: str) -> None:
    if kind == "env-i":
        pid = os.fork()
        if pid == 0:
            os.execv("/usr/bin/env", ["env", "-i", sys.executable, __file__, "--hold", pidfile, kind])
        return
    pid = os.fork()
    if pid != 0:
        if kind == "double-fork":
            os.waitpid(pid, 0)  # the middle process exits at once; its child is an orphan
        return
    if kind == "setsid":
        os.setsid()
    elif kind == "double-fork":
        if os.fork() != 0:
            os._exit(0)
    elif kind == "fork-chain":
        chain(pidfile)
    elif kind == "cgroup-escape":
        leave_cgroup()
    hold(pidfile, kind)


def main(argv: list[str]) -> int:
    if argv[:1] == ["--hold"]:
        hold(argv[1], argv[2])
    if "-p" in argv:
        argv = argv[: argv.index("-p")]
    pidfile, rest = argv[0], argv[1:]
    exit_at_once = "--exit" in rest
    kinds = [word for word in rest if word != "--exit"]
    unknown = [kind for kind in kinds if kind not in ESCAPES]
    if unknown:
        print(f"unknown escapes {unknown}; expected {ESCAPES}", file=sys.stderr)
        return 2
    stubborn()
    note(pidfile, "agent")
    for kind in kinds:
        spawn(pidfile, kind)
    if exit_at_once:
        return 0
    while True:
        time.sleep(60)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
