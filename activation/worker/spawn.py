"""Whether, and how, the OS can start the agent: argv limits, a long description on stdin, spawn errors.

A task may be valid and still not start. This module tells the two kinds apart:
- *this task cannot start*: its description does not fit in argv and the template cannot take
  it on stdin. The task gets a terminal outcome (a dead letter with reason ``argv_too_long``).
- *no task can start*: the agent binary is missing or not executable, the workdir is gone, the
  system is out of processes or memory. The task is not to blame: it goes back to the inbox and
  the executor reports itself degraded, with the reason, until a task starts again.

A description longer than one argv word can hold (MAX_ARG_STRLEN, 128 KiB) still reaches the
agent: when the template has ``{description}`` as a word of its own, that word is left out and
the description becomes the agent's stdin, read to its end (Claude Code's ``-p`` with no prompt
argument reads the prompt from stdin).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass

from activation.errors import ActivationError
from activation.worker.agent_inputs import build_argv, template_words

DESCRIPTION_WORD = "{description}"

# The kernel's limits on what execve() takes. One word: 32 pages including its NUL.
MAX_ARG_STRLEN = 32 * os.sysconf("SC_PAGESIZE")
ARG_MAX = os.sysconf("SC_ARG_MAX")
POINTER = 8
ARG_MAX_MARGIN = 4096  # the kernel also counts the file name and the auxv: stay clear of the edge

# Machine-readable reasons; the first is a task's own, the others are the worker's.
ARGV_TOO_LONG = "argv_too_long"
AGENT_NOT_FOUND = "agent_not_found"
AGENT_NOT_EXECUTABLE = "agent_not_executable"
WORKDIR_MISSING = "workdir_missing"
SPAWN_FAILED = "spawn_failed"


class CannotStart(ActivationError):
    """The agent could not be started. ``whole_worker``: no task could, it is not this task's fault."""

    def __init__(self, reason: str, detail: str, *, whole_worker: bool) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail
        self.whole_worker = whole_worker


@dataclass(frozen=True)
class Launch:
    """What to execute: the argv, and the bytes to give as stdin (None: /dev/null)."""

    argv: list[str]
    stdin: bytes | None = None


def _encoded(word: str) -> int:
    return len(os.fsencode(word))


def argv_problem(argv: list[str], env: Mapping[str, str]) -> str | None:
    """Why execve() would refuse this argv and environment with E2BIG, or None when it fits."""
    for index, word in enumerate(argv):
        size = _encoded(word)
        if size >= MAX_ARG_STRLEN:
            return f"argv word {index} is {size} bytes, the kernel takes at most {MAX_ARG_STRLEN - 1} per word"
    total = sum(_encoded(w) + 1 + POINTER for w in argv)
    total += sum(_encoded(k) + _encoded(v) + 2 + POINTER for k, v in env.items())
    if total > ARG_MAX - ARG_MAX_MARGIN:
        return f"argv and environment take {total} bytes, the kernel takes at most {ARG_MAX} (ARG_MAX)"
    return None


def plan_launch(template: str, description: str, env: Mapping[str, str], **fields: object) -> Launch:
    """The argv for this task, with the description on stdin when it cannot travel in argv.

    Raises CannotStart(argv_too_long) when it fits neither way.
    """
    argv = build_argv(template, description, **fields)
    problem = argv_problem(argv, env)
    if problem is None:
        return Launch(argv)
    words = template_words(template)
    if DESCRIPTION_WORD not in words:
        raise CannotStart(
            ARGV_TOO_LONG,
            f"{problem}; the description cannot go on stdin because ACTIVATION_AGENT_COMMAND has no "
            f"{DESCRIPTION_WORD} word of its own",
            whole_worker=False,
        )
    # build_argv fills the template word by word: word i of the argv is word i of the template.
    without = [w for w, t in zip(build_argv(template, "", **fields), words, strict=True) if t != DESCRIPTION_WORD]
    rest = argv_problem(without, env)
    if rest is not None:  # too long even without the description: no task can start
        raise CannotStart(ARGV_TOO_LONG, rest, whole_worker=True)
    return Launch(without, description.encode("utf-8", "surrogateescape"))


def resolve(program: str, env: Mapping[str, str], cwd: str | None = None) -> str | None:
    """Where exec would find ``program`` with this environment's PATH, as execvpe searches it.

    A path with a slash is taken from the agent's workdir, where exec runs (after the chdir).
    """
    if "/" in program:
        return os.path.join(cwd, program) if cwd is not None else program
    for folder in env.get("PATH", os.defpath).split(os.pathsep):
        candidate = os.path.join(folder or ".", program)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def preflight(program: str, env: Mapping[str, str], cwd: str | None) -> CannotStart | None:
    """What stops every task from starting, seen without starting anything (a few stat calls)."""
    if cwd is not None and not os.path.isdir(cwd):
        return CannotStart(WORKDIR_MISSING, f"the agent's workdir {cwd} is not a folder", whole_worker=True)
    path = resolve(program, env, cwd)
    if path is None or not os.path.exists(path):
        where = program if "/" in program else f"{program} on PATH"
        return CannotStart(AGENT_NOT_FOUND, f"the agent {where} does not exist", whole_worker=True)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        return CannotStart(AGENT_NOT_EXECUTABLE, f"the agent {path} is not executable", whole_worker=True)
    return None


def classify(exc: OSError, argv: list[str], cwd: str | None) -> CannotStart:
    """A Popen failure as a reason. subprocess names the workdir when chdir() failed."""
    text = exc.strerror or str(exc)
    if cwd is not None and exc.filename == cwd:
        return CannotStart(WORKDIR_MISSING, f"cannot enter the agent's workdir {cwd}: {text}", whole_worker=True)
    program = argv[0] if argv else "?"
    if exc.errno == errno.E2BIG:
        return CannotStart(ARGV_TOO_LONG, f"the kernel refused the argv: {text}", whole_worker=False)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return CannotStart(AGENT_NOT_FOUND, f"cannot start the agent {program}: {text}", whole_worker=True)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.EISDIR):
        return CannotStart(AGENT_NOT_EXECUTABLE, f"cannot start the agent {program}: {text}", whole_worker=True)
    return CannotStart(SPAWN_FAILED, f"cannot start the agent {program}: {text}", whole_worker=True)
