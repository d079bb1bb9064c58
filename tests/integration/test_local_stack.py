"""``activation up`` (what ``make up`` runs) as a newcomer meets it: a taken port is one line
before anything starts; otherwise a "ready" line, logs under var/log/, and the CLI works from
any folder below the project and refuses a folder outside it."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

from tests.harness import BIN, fake_agent_command, free_port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTIVATION_", "ORCHESTRATOR_", "REDIS_"))}
    env.pop("WORKER_NAME", None)
    env.update(
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        ACTIVATION_AGENT_COMMAND=fake_agent_command(),
        ACTIVATION_HEARTBEAT_INTERVAL="0.5",
        ACTIVATION_METRICS_PORT=str(free_port()),
        ACTIVATION_ADMIN_BIND=f"127.0.0.1:{free_port()}",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def test_make_up_with_a_taken_port_fails_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = _env(ACTIVATION_ADMIN_BIND=f"127.0.0.1:{port}")
        out = subprocess.run(
            [str(BIN / "activation"), "up", "--workers", "w1"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"activation: port {port} (the admin API) is taken: set ACTIVATION_ADMIN_BIND to move it "
        f"(e.g. 127.0.0.1:{port + 1})"
    ], out.stderr
    assert not (tmp_path / "var" / "run" / "w1" / "supervisord.pid").exists()


def read_until(up: subprocess.Popen[bytes], seen: list[str], marker: str, timeout: float) -> str:
    """Read ``up``'s stderr into ``seen`` (whole lines) until one holds ``marker``; that line.

    Straight from the pipe, with no buffer of Python's between: a line already read is never left
    waiting behind a select() that only sees the pipe, and a later communicate() reads the rest.
    """
    assert up.stderr is not None
    fd = up.stderr.fileno()
    partial = b""
    deadline = time.monotonic() + timeout
    while True:
        found = next((line for line in seen if marker in line), None)
        if found is not None:
            if partial:
                seen.append(partial.decode(errors="replace"))
            return found
        exited = up.poll() is not None
        if select.select([fd], [], [], 1)[0]:
            chunk = os.read(fd, 65536)
            *lines, partial = (partial + chunk).split(b"\n")
            seen.extend(line.decode(errors="replace") + "\n" for line in lines)
            if chunk:
                continue
        assert time.monotonic() < deadline and not exited, f"no {marker!r} line:\n" + "".join(seen[-30:])


def test_up_says_ready_writes_var_log_and_the_cli_works_from_any_folder(run_dir):
    # The project in a short folder (conftest's run_dir): its trees' sockets go under var/run/, and
    # pytest-xdist's deeper tmp_path (popen-gw<N>/) left the orchestrator's one over 107 bytes.
    project = run_dir
    env = _env()
    up = subprocess.Popen(
        [str(BIN / "activation"), "up", "--workers", "w1"],
        cwd=project,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        seen: list[str] = []
        ready = read_until(up, seen, "activation: ready:", 90)
        assert "w1 RUNNING" in ready and env["ACTIVATION_ADMIN_BIND"] in ready and "var/log" in ready
        assert any(line.startswith("[w1] ") for line in seen), "supervisord's lines name the worker"
        assert (project / "var" / "log" / "w1.log").stat().st_size > 0
        # From a folder below the project, without ACTIVATION_SPOOL, the CLI finds var/spool.
        below = project / "src" / "deep"
        below.mkdir(parents=True)
        cli_env = {k: v for k, v in env.items() if k != "ACTIVATION_SPOOL"}
        sent = subprocess.run(
            [str(BIN / "activation"), "dispatch", "w1", "hello", "--task-id", "hi-1", "--wait", "--wait-timeout", "30"],
            cwd=below,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        where = subprocess.run(
            [str(BIN / "activation"), "where"], cwd=below, env=cli_env, capture_output=True, text=True, timeout=30
        )
        assert str(project / "var" / "spool") in where.stdout and "walking up" in where.stdout
        listed = subprocess.run(
            [str(BIN / "activation"), "tasks", "--state", "done"],
            cwd=below,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert "hi-1" in listed.stdout and "done" in listed.stdout
        # From /tmp (outside any project) it refuses in one line, and creates nothing.
        outside = subprocess.run(
            [str(BIN / "activation"), "status"], cwd="/tmp", env=cli_env, capture_output=True, text=True, timeout=30
        )
        assert outside.returncode == 1 and "no spool here" in outside.stderr
        assert len(outside.stderr.strip().splitlines()) == 1 and not Path("/tmp/var/spool/tasks").exists()
        # Ctrl-C says what it waits for, and at the end what is left. The task runs until the test
        # opens its gate, once the drain is announced: a fixed sleep could end first under load.
        gate = project / "long-1.gate"
        long_task = subprocess.run(
            [str(BIN / "activation"), "dispatch", "w1", f"gate={gate}", "--task-id", "long-1"],
            cwd=below,
            env=cli_env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert long_task.returncode == 0, long_task.stderr
        claim = project / "var" / "spool" / "tasks" / "w1" / ".processing" / "long-1.json"
        deadline = time.monotonic() + 30
        while not claim.exists():
            assert time.monotonic() < deadline, "long-1 never started"
            time.sleep(0.05)
        up.send_signal(signal.SIGINT)
        stopping: list[str] = []
        draining = read_until(up, stopping, "activation: stopping:", 60)
        assert "activation: stopping: draining w1's task long-1, up to 45 s" in draining, "".join(stopping[-30:])
        gate.touch()
        rest = "".join(stopping) + up.communicate(timeout=90)[1].decode(errors="replace")
        assert "activation: stopped; no task left pending" in rest, rest[-3000:]
        # A normal start and stop (with a drain) prints no CRIT line, and no WARNING of ours.
        noise = [
            line
            for line in [*seen, *rest.splitlines()]
            if " CRIT " in line or (" WARNING " in line and "activation." in line)
        ]
        assert noise == [], "\n".join(noise)
    finally:
        up.send_signal(signal.SIGINT)
        try:
            up.wait(90)
        finally:
            if up.poll() is None:
                for proc in psutil.Process(up.pid).children(recursive=True):
                    proc.kill()
                up.kill()
                up.wait(10)


def test_make_help_lists_every_target():
    root = Path(__file__).resolve().parents[2]
    makefile = (root / "Makefile").read_text()
    import re

    targets = {m for m in re.findall(r"^([a-z][a-z_-]*):", makefile, re.M)}
    out = subprocess.run(["make", "-s", "help"], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    listed = {line.split()[1] for line in out.stdout.splitlines() if line.strip().startswith("make ")}
    assert targets <= listed, targets - listed


def test_make_up_installs_only_what_running_needs(tmp_path):
    """On a fresh clone (no .venv), `make up` installs the package alone; the dev extra comes with test."""
    root = Path(__file__).resolve().parents[2]

    def planned(target: str) -> str:
        # -n prints the recipe without running it; VENV points at a folder that does not exist.
        venv = tmp_path / "no-venv"
        out = subprocess.run(
            ["make", "-n", target, f"VENV={venv}"], cwd=root, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, out.stderr
        return out.stdout

    up = planned("up")
    assert "pip install --quiet -e ." in up
    assert "[dev]" not in up
    assert "[dev]" in planned("check")


def test_a_closed_pipe_is_no_error(tmp_path):
    from activation.spool.atomic import atomic_write_json
    from activation.spool.layout import Spool

    spool = Spool(tmp_path / "spool")
    spool.init(["w1"])
    for i in range(2000):
        atomic_write_json(spool.task_path("w1", f"t{i}"), {"task_id": f"t{i}", "description": "x" * 60}, durable=False)
    env = _env(ACTIVATION_SPOOL=str(spool.root))
    for args in (
        ["tasks", "--limit", "2000"],
        ["tasks", "--json", "--limit", "2000"],
        ["tasks", "--watch", "--limit", "2000"],
    ):
        reader = subprocess.Popen(
            [str(BIN / "activation"), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert reader.stdout is not None and reader.stderr is not None
        reader.stdout.readline()  # `| head -1`
        reader.stdout.close()
        err = reader.stderr.read().decode()
        assert reader.wait(60) in (0, 1) and err == "", (args, err)


def test_watch_on_a_terminal_redraws_a_rich_table(tmp_path):
    import pty

    from activation.spool.atomic import atomic_write_json
    from activation.spool.layout import Spool

    spool = Spool(tmp_path / "spool")
    spool.init(["w1"])
    atomic_write_json(spool.task_path("w1", "next-1"), {"task_id": "next-1", "description": "x"})
    env = _env(ACTIVATION_SPOOL=str(spool.root), COLUMNS="120", TERM="xterm")
    for args in (["tasks", "--watch", "--interval", "0.1", "--count", "2"], ["status", "--watch", "--count", "1"]):
        leader, follower = pty.openpty()
        try:
            proc = subprocess.Popen([str(BIN / "activation"), *args], env=env, stdout=follower, stderr=subprocess.PIPE)
            os.close(follower)
            output = b""
            while True:
                try:
                    chunk = os.read(leader, 65536)
                except OSError:  # EIO: the terminal's other end closed
                    break
                if not chunk:
                    break
                output += chunk
            assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        finally:
            os.close(leader)
        text = output.decode(errors="replace")
        assert "\x1b[" in text, text  # drawn with terminal control sequences, not plain lines
        assert ("next-1" in text) if args[0] == "tasks" else ("w1" in text)
        assert "-- 20" not in text  # the plain snapshot header is for pipes only
