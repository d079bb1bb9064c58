"""supervisord with activation's secrets out of the agent's reach: ``python -m activation.supervise ARGS``.

ARGS are supervisord's own (``-n -c supervisor_conf/worker.conf``). supervisord runs in this very
process, not through exec, because the kernel makes a process dumpable again at execve: this one
is made non-dumpable first, so a process of the same uid (the agent) cannot read the secrets in
its ``/proc/<pid>/environ``. It also gives the programs a fresh work-queue key in their environment
(ACTIVATION_QUEUE_KEY), so that no key file lies in the run folder for the agent to read, and
makes supervisord a child subreaper, so that orphans stay its children.
Imports stay few: this process lives as long as the container, and its memory counts.
"""

from __future__ import annotations

import sys

# supervisord never needs OpenSSL: its only socket is a Unix one, with no TLS, and the sha1 of its
# optional password is in Python's own hashes. Left free to load, hashlib and http.client pull in
# libcrypto and libssl: 4.6 MB of this process, which lives as long as the container. hashlib
# then falls back to its built-in hashes and http.client to no HTTPS. The programs supervisord
# starts are fresh interpreters and load what they need.
for _library in ("_hashlib", "_ssl"):
    sys.modules.setdefault(_library, None)  # type: ignore[arg-type]

import contextlib  # noqa: E402
import os  # noqa: E402
import secrets  # noqa: E402

from activation.procctl import PR_SET_CHILD_SUBREAPER, make_undumpable, prctl  # noqa: E402

QUEUE_KEY_VARIABLE = "ACTIVATION_QUEUE_KEY"


def main(argv: list[str]) -> int:
    make_undumpable()
    # Orphans come here, not to the host's init: what a SIGKILLed executor's agent left running
    # stays in reach of the executor's next start (containment.kill_supervisor_orphans).
    with contextlib.suppress(OSError):
        prctl(PR_SET_CHILD_SUBREAPER, 1)
    if not os.environ.get(QUEUE_KEY_VARIABLE):
        os.environ[QUEUE_KEY_VARIABLE] = secrets.token_hex(32)  # every program gets it from supervisord
    if os.getuid() == 0 and not any(arg in ("-u", "--user") or arg.startswith("--user=") for arg in argv):
        # Naming the user it already runs as drops nothing, and spares every start supervisord's
        # CRIT "running as root" line: a container's PID 1 runs as root on purpose.
        argv = ["--user=root", *argv]
    from supervisor import supervisord

    supervisord.main(args=argv)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
