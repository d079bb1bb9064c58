"""prctl(2) for the two process attributes activation sets on itself.

- child subreaper (the executor): orphaned agent descendants are re-parented to it, not to PID 1;
- not dumpable (every program that holds a secret, and supervisord): another process of the
  same uid, such as the agent, can then neither read its ``/proc/<pid>/environ`` or memory nor
  ptrace it. The kernel resets this at execve, so each program sets it again for itself.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("activation")

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> None:
    """Call prctl(option, value); OSError when the kernel (or libc) refuses."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        call = libc.prctl
    except (OSError, AttributeError) as exc:
        raise OSError(f"no prctl here: {exc}") from None
    # Explicit types: prctl is variadic, and a bare Python int is passed as a 32-bit int.
    call.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    call.restype = ctypes.c_int
    if call(option, value, 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def make_undumpable() -> bool:
    """Hide this process's environment and memory from other processes of its uid; False if not possible.

    It does nothing against root, or against a process with CAP_SYS_PTRACE.
    """
    try:
        prctl(PR_SET_DUMPABLE, 0)
    except OSError as exc:
        log.warning("cannot make this process non-dumpable (%s): its environment is readable by its uid", exc)
        return False
    return True


def is_dumpable() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    except (OSError, AttributeError):
        return True
