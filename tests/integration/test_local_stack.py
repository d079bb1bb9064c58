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


def test_up_says_ready_writes_var_log_and_the_cli_works_from_any_folder(tmp_path):
    env = _env()
    up = subprocess.Popen(
        [str(BIN / "activation"), "up", "--workers", "w1"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert up.stderr is not None
        seen: list[str] = []
        deadline = time.monotonic() + 90
        while not any("activation: ready:" in line for line in seen):
            assert time.monotonic() < deadline and up.poll() is None, "".join(seen[-30:])
            if select.select([up.stderr], [], [], 1)[0]:
                seen.append(up.stderr.readline().decode(errors="replace"))
        ready = next(line for line in seen if "activation: ready:" in line)
        assert "w1 RUNNING" in ready and env["ACTIVATION_ADMIN_BIND"] in ready and "var/log" in ready
        assert any(line.startswith("[w1] ") for line in seen), "supervisord's lines name the worker"
        assert (tmp_path / "var" / "log" / "w1.log").stat().st_size > 0
        # From a folder below the project, without ACTIVATION_SPOOL, the CLI finds var/spool.
        below = tmp_path / "src" / "deep"
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
        assert str(tmp_path / "var" / "spool") in where.stdout and "walking up" in where.stdout
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
