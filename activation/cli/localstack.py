"""``activation up``: a local stack in the foreground, state under ./var/.

One supervisord per worker, and one for the orchestrator, as the containers would run them.
Each supervisord runs the repo's own ``supervisor_conf/`` with the environment a container
would give it. Without a ``claude`` on PATH, it runs the project's fake agent, loudly.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType

import click
import psutil

from activation.cli.stackcheck import READY_TIMEOUT, check_ports, check_socket_paths, required_ports, wait_ready
from activation.config import WORKER_NAME_PATTERN, Settings
from activation.errors import ConfigError
from activation.spool.layout import Spool

PACKAGE_DIR = Path(__file__).resolve().parent.parent  # activation/
REPO_DIR = PACKAGE_DIR.parent
WORKER_CONF = REPO_DIR / "supervisor_conf" / "worker.conf"
ORCHESTRATOR_CONF = REPO_DIR / "supervisor_conf" / "orchestrator.conf"
FAKE_AGENT = PACKAGE_DIR / "fake_agent.py"
DEFAULT_AGENT = "claude"


# With the real claude and no ACTIVATION_AGENT_COMMAND of the user's: the JSON envelope (cost,
# turns, is_error in the result), options first, the description after `--`.
CLAUDE_JSON_COMMAND = "claude --output-format json -p -- {description}"


def agent_command(settings: Settings) -> tuple[str, bool]:
    """The agent command to run, and whether it is the fake stand-in for a missing ``claude``."""
    program = shlex.split(settings.agent_command)[0]
    if shutil.which(program):
        if program == DEFAULT_AGENT and "ACTIVATION_AGENT_COMMAND" not in settings.environ:
            return CLAUDE_JSON_COMMAND, False
        return settings.agent_command, False
    if program != DEFAULT_AGENT:
        raise ConfigError(f"ACTIVATION_AGENT_COMMAND: {program!r} is not on PATH")
    if not FAKE_AGENT.exists():
        raise ConfigError(f"claude is not on PATH and the fake agent {FAKE_AGENT} is missing")
    return shlex.join([sys.executable, str(FAKE_AGENT)]) + " -p -- {description}", True


def _run_base(settings: Settings) -> Path:
    return settings.run_dir.parent if settings.worker_name else settings.run_dir


def _environment(settings: Settings, run_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(settings.environ)
    env.update(
        ACTIVATION_SPOOL=str(settings.spool),
        ACTIVATION_RUN_DIR=str(run_dir),
        # supervisord finds `activation` on PATH: put this interpreter's scripts first.
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


def worker_environment(settings: Settings, worker: str, index: int, agent: str) -> dict[str, str]:
    extra = {}
    if "ACTIVATION_AGENT_WORKDIR" not in settings.environ:
        # Each worker's agent works in a folder of its own under var/, not in the checkout.
        workdir = _run_base(settings).parent / "work" / worker
        workdir.mkdir(parents=True, exist_ok=True)
        extra["ACTIVATION_AGENT_WORKDIR"] = str(workdir)
    return _environment(
        settings,
        _run_base(settings) / worker,
        WORKER_NAME=worker,
        ACTIVATION_AGENT_COMMAND=agent,
        ACTIVATION_METRICS_PORT=str(settings.metrics_port + index) if settings.metrics_port else "0",
        **extra,
    )


def _already_running(run_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        pid = int((run_dir / "supervisord.pid").read_text().strip())
        # supervisord itself, or activation.supervise running it in-process
        if psutil.pid_exists(pid) and "supervise" in " ".join(psutil.Process(pid).cmdline()):
            return pid
    return None


def run_local_stack(settings: Settings, workers: list[str], *, orchestrator: bool = True) -> int:
    """Start, wait until interrupted, stop. Returns the exit code."""
    for worker in workers:
        if not WORKER_NAME_PATTERN.match(worker):
            raise ConfigError(f"invalid worker name {worker!r}")
    if not WORKER_CONF.exists():
        raise ConfigError(f"{WORKER_CONF} is missing: run `activation up` from a checkout of the repo")
    agent, fake = agent_command(settings)
    check_ports(required_ports(settings, workers, orchestrator=orchestrator))  # before anything starts
    names = [*workers, *(["orchestrator"] if orchestrator else [])]
    check_socket_paths({name: _run_base(settings) / name for name in names})
    spool = Spool(settings.spool)
    spool.init(workers)
    trees = [(w, WORKER_CONF, worker_environment(settings, w, i, agent)) for i, w in enumerate(workers)]
    if orchestrator:
        env = _environment(settings, _run_base(settings) / "orchestrator")
        env.pop("WORKER_NAME", None)
        trees.append(("orchestrator", ORCHESTRATOR_CONF, env))
    for name, _, env in trees:
        run_dir = Path(env["ACTIVATION_RUN_DIR"])
        pid = _already_running(run_dir)
        if pid:
            raise ConfigError(f"{name} already runs under supervisord pid {pid}")
        run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        shutil.rmtree(run_dir / "metrics", ignore_errors=True)  # a fresh tree starts fresh counters

    say = click.echo
    say(f"activation: local stack with workers {', '.join(workers)}; spool {spool.root}", err=True)
    if fake:
        banner = "!" * 78
        say(
            f"{banner}\n!! claude is not on PATH: the workers run the project's FAKE agent\n!!   {agent}\n{banner}",
            err=True,
        )
    say(f'activation: try `activation dispatch {workers[0]} "hello" --wait` and `activation status`', err=True)
    if orchestrator:
        say(f"activation: admin API on http://{settings.admin_bind} (`activation config get`)", err=True)

    from activation.cli.logs import stack_log_dir

    log_dir = stack_log_dir(settings.spool)  # where `activation logs --worker` reads them
    log_dir.mkdir(parents=True, exist_ok=True)
    children = []
    for name, conf, env in trees:
        child = subprocess.Popen(
            [sys.executable, "-m", "activation.supervise", "-n", "-c", str(conf)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        children.append(child)
        threading.Thread(target=_tee, args=(name, child, log_dir / f"{name}.log"), daemon=True).start()
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    from activation.cli.admin import default_url

    api = default_url(settings.admin_bind) if orchestrator else None
    missing = wait_ready(
        spool,
        workers,
        api_url=api,
        heartbeat_timeout=settings.heartbeat_timeout,
        still_running=lambda: not stopping and all(c.poll() is None for c in children),
    )
    if not stopping:
        metrics = (
            f"metrics :{settings.metrics_port}-{settings.metrics_port + len(workers) - 1}"
            if settings.metrics_port
            else "metrics off"
        )
        if missing:
            say(f"activation: not ready after {READY_TIMEOUT:g}s: {', '.join(missing)}; logs in {log_dir}", err=True)
        else:
            say(
                f"activation: ready: {', '.join(workers)} RUNNING; API {api or 'off'}; {metrics}; logs in {log_dir}",
                err=True,
            )
    code = 0
    told = False
    while any(child.poll() is None for child in children):
        if not stopping and any(child.returncode is not None for child in children):
            say("activation: a supervisord exited; stopping the stack", err=True)
            code = 1
            forward(signal.SIGTERM, None)
        if stopping and not told:  # said here, not in the handler: handlers only set flags
            told = True
            say(f"activation: stopping: {_draining(spool, workers, settings.drain_timeout)}", err=True)
        time.sleep(0.2)
    left = {w: spool.count_inbox(w) for w in workers}
    pending = sum(left.values())
    detail = ", ".join(f"{w} {n}" for w, n in left.items() if n)
    say(
        "activation: stopped; "
        + (
            f"{pending} task(s) left pending ({detail}): they run at the next start"
            if pending
            else "no task left pending"
        ),
        err=True,
    )
    return code


def _draining(spool: Spool, workers: list[str], drain_timeout: float) -> str:
    """What the stop waits for: each running task, and how long it may still take."""
    running = [f"{w}'s task {task_id}" for w in workers for task_id in spool.claimed_ids(w)]
    if not running:
        return "no task is running; the programs stop in a few seconds"
    return f"draining {', '.join(running)}, up to {drain_timeout:g} s"


# supervisord's CRIT at every start, for a socket without a password. Ours is a Unix socket in the
# private run folder (chmod 0700), reachable only by its own uid, so the terminal is spared it.
UNAUTHENTICATED_SOCKET = b"running without any HTTP authentication checking"


def _tee(name: str, child: subprocess.Popen[bytes], log: Path) -> None:
    """Copy a supervisord's output to the terminal, each line naming its tree, and to var/log/."""
    assert child.stdout is not None
    prefix = f"[{name}] ".encode()
    with open(log, "ab") as file:
        for line in iter(child.stdout.readline, b""):
            file.write(line)
            file.flush()
            if UNAUTHENTICATED_SOCKET in line:
                continue  # the log keeps it; supervisor_conf says why the socket needs no password
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.buffer.write(prefix + line)
                sys.stderr.buffer.flush()
