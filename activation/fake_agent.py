#!/usr/bin/env python3
"""The project's fake agent: a stand-in for ``claude -p`` whose description says what it does.

Usage: ``fake_agent.py [--output-format json|stream-json] -p -- "<description>"``; with ``-p`` and no description
it reads the description from stdin, as Claude Code does. The description is a list of
space-separated directives; any other word is only echoed. By default it prints
``done: <description>`` and exits 0. Directives (acted on in this order, whatever their order):

  ignore-term, ignore-int  ignore SIGTERM / SIGINT (otherwise either one kills it, by signal)
  record=PATH              append "<pid> <time>" to PATH: one line per run
  pidfile=PATH             append its own pid to PATH
  env=PATH                 dump its environment as JSON to PATH
  stdin-check              print "stdin: empty" when stdin reads EOF at once, else "stdin: open"
  grandchild=S             start a setsid grandchild that sleeps S s ignoring SIGTERM and SIGINT,
                           holding stdout open, and append its pid to the pidfile; never wait for it
  kill-parent              SIGKILL its parent (the executor), then sleep (sleep=S, default 5)
  flood=BYTES              write BYTES bytes to stdout; flood-err=BYTES: to stderr
  sleep=S                  sleep S seconds
  json / json-error        print a Claude Code style result envelope (is_error false / true); also
                           the default with --output-format json. json-error still exits 0.
  stream=N                 print Claude Code's --output-format stream-json, one event per line:
                           system init, then N turns (assistant text + a Bash tool_use, then the
                           user's tool_result), one every gap=S seconds (default 0.3), then the
                           final result event (cost, usage, duration). --output-format
                           stream-json alone means stream=1. With json-error the result is_error.
  gate=PATH                wait until PATH exists (at most 60 s) before the result (with stream:
                           after the first turn), so a test can look at a run that has not ended
  exit=N                   exit with status N

Only the standard library, and only the modules a directive needs, so that it starts fast.
"""

from __future__ import annotations

import os
import signal
import sys
import time

USAGE = "usage: fake_agent.py [--output-format json] -p [--] DESCRIPTION"


def parse_args(argv: list[str]) -> tuple[str | None, str]:
    """Parse like claude (commander.js): ``-p`` is a flag, the description is the first word that is
    not an option, and everything after ``--`` is a word, even one that starts with ``-``."""
    description: str | None = None
    output_format = "text"
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            if description is None and i + 1 < len(argv):
                description = argv[i + 1]
            break
        if arg == "--output-format" and i + 1 < len(argv):
            output_format = argv[i + 1]
            i += 2
            continue
        if arg.startswith("--output-format="):
            output_format = arg.split("=", 1)[1]
        elif not arg.startswith("-") and description is None:
            description = arg
        # other options (-p, --print, --dangerously-skip-permissions, ...) are accepted and ignored
        i += 1
    return description, output_format


def append(path: str, line: str) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def die_by(signum: int, frame: object) -> None:
    """Die by the signal itself, like a real CLI would, without a Python traceback."""
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def spawn_grandchild(seconds: str) -> int:
    import subprocess

    # SIG_IGN survives exec, so the grandchild ignores both signals from its first instruction.
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        child = subprocess.Popen(
            [sys.executable, "-S", "-c", "import sys, time; time.sleep(float(sys.argv[1]))", seconds],
            start_new_session=True,
        )
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    child.returncode = 0  # never waited for: keep Popen from warning or reaping at exit
    return child.pid


def flood(stream: object, size: int) -> None:
    chunk = b"x" * 65536
    out = stream.buffer  # type: ignore[attr-defined]
    try:
        while size > 0:
            piece = chunk if size >= len(chunk) else chunk[:size]
            out.write(piece)
            size -= len(piece)
        out.flush()
    except BrokenPipeError:
        os._exit(141)


def wait_for(path: str, bound: float = 60.0) -> None:
    give_up = time.monotonic() + bound
    while not os.path.exists(path) and time.monotonic() < give_up:
        time.sleep(0.02)


def stream_json(turns: int, gap: float, result: str, flags: set[str], started: float, gate: str | None) -> None:
    """Claude Code's stream-json: the events a real session prints, slowly, each flushed at once."""
    import json

    def emit(event: dict[str, object]) -> None:
        print(json.dumps(event), flush=True)

    session = "fake-session"

    def say(role: str, *content: dict[str, object]) -> None:
        """One conversation message (an ``assistant`` or ``user`` event), as Claude Code prints it."""
        emit({"type": role, "session_id": session, "message": {"role": role, "content": list(content)}})

    emit(
        {
            "type": "system",
            "subtype": "init",
            "session_id": session,
            "model": "fake-model",
            "cwd": os.getcwd(),
            "tools": ["Bash", "Read"],
        }
    )
    for turn in range(1, turns + 1):
        tool_id = f"toolu_{turn:04d}"
        say(
            "assistant",
            {"type": "text", "text": f"Turn {turn}: let me look."},
            {"type": "tool_use", "id": tool_id, "name": "Bash", "input": {"command": f"echo turn {turn}"}},
        )
        time.sleep(gap)
        if gate and turn == 1:
            wait_for(gate)
        say("user", {"type": "tool_result", "tool_use_id": tool_id, "content": f"turn {turn}", "is_error": False})
    say("assistant", {"type": "text", "text": result})
    emit(
        {
            "type": "result",
            "subtype": "success",
            "is_error": "json-error" in flags,
            "result": result,
            "session_id": session,
            "num_turns": turns,
            "duration_ms": int((time.monotonic() - started) * 1000),
            "total_cost_usd": 0.0123 * turns,
            "usage": {"input_tokens": 100 * turns, "output_tokens": 20 * turns, "cache_read_input_tokens": 5000},
        }
    )


def main(argv: list[str]) -> int:
    started = time.monotonic()
    description, output_format = parse_args(argv)
    if description is None and ("-p" in argv or "--print" in argv):
        description = sys.stdin.read()  # like claude: -p with no prompt argument reads it from stdin
    if not description:
        print(USAGE, file=sys.stderr)
        return 2
    options: dict[str, str] = {}
    flags: set[str] = set()
    for word in description.split():
        key, sep, value = word.partition("=")
        if sep:
            options[key] = value
        else:
            flags.add(word)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if "ignore-term" in flags else die_by)
    signal.signal(signal.SIGINT, signal.SIG_IGN if "ignore-int" in flags else die_by)
    if "record" in options:
        append(options["record"], f"{os.getpid()} {time.time():.6f}")
    if "pidfile" in options:
        append(options["pidfile"], str(os.getpid()))
    if "env" in options:
        import json

        with open(options["env"], "w", encoding="utf-8") as handle:
            json.dump(dict(os.environ), handle)
    if "stdin-check" in flags:
        import select

        ready, _, _ = select.select([0], [], [], 0.2)
        empty = bool(ready) and os.read(0, 1) == b""
        print("stdin: empty" if empty else "stdin: open", flush=True)
    if "grandchild" in options:
        pid = spawn_grandchild(options["grandchild"])
        if "pidfile" in options:
            append(options["pidfile"], str(pid))
    if "kill-parent" in flags:
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(float(options.get("sleep", "5")))
        return 0
    if "flood" in options:
        flood(sys.stdout, int(options["flood"]))
    if "flood-err" in options:
        flood(sys.stderr, int(options["flood-err"]))
    if "sleep" in options:
        time.sleep(float(options["sleep"]))
    if "gate" in options and "stream" not in options and output_format != "stream-json":
        wait_for(options["gate"])

    result = f"done: {description}"
    if "stream" in options or output_format == "stream-json":
        gap = float(options.get("gap", "0.3"))
        stream_json(int(options.get("stream", "1")), gap, result, flags, started, options.get("gate"))
    elif "json" in flags or "json-error" in flags or output_format == "json":
        import json

        envelope = {
            "type": "result",
            "subtype": "success",
            "is_error": "json-error" in flags,
            "result": result,
            "session_id": "fake",
            "duration_ms": int((time.monotonic() - started) * 1000),
            "num_turns": 1,
            "total_cost_usd": 0,
        }
        print(json.dumps(envelope), flush=True)
    else:
        print(result, flush=True)
    return int(options.get("exit", "0"))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
