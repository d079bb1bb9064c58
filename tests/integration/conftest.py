"""Real worker trees: supervisord running the repo's own supervisor_conf/worker.conf."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from activation.spool import Spool, atomic_write_json, iso_now
from tests.conftest import ROOT, fake_agent_command, wait_for

WORKER_CONF = ROOT / "supervisor_conf" / "worker.conf"
BIN = Path(sys.executable).parent
PROGRAMS = ("listener", "executor", "heartbeat")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class WorkerTree:
    """One supervisord with listener, executor and heartbeat, and ways to poke at it."""

    def __init__(self, spool: Spool, run_dir: Path, worker: str, env: dict[str, str], log: Path) -> None:
        self.spool = spool
        self.run_dir = run_dir
        self.worker = worker
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> WorkerTree:
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(WORKER_CONF)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.wait_running()
        return self

    def wait_running(self, timeout: float = 20) -> None:
        def all_running() -> bool:
            states = self.states()
            return bool(states) and all(states.get(p) == "RUNNING" for p in PROGRAMS)

        wait_for(all_running, timeout, 0.1, f"all programs RUNNING (log: {self.log_tail()})")

    def stop(self, timeout: float = 70) -> int:
        """SIGTERM supervisord as `docker stop` would, and wait for it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill_everything(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(psutil.Error):
            tree = psutil.Process(self.process.pid)
            procs = [tree, *tree.children(recursive=True)]
            for proc in procs:
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            psutil.wait_procs(procs, timeout=5)
        with contextlib.suppress(Exception):
            self.process.wait(5)

    # -- looking ------------------------------------------------------------------------------

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(WORKER_CONF), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=30,
        )

    def states(self) -> dict[str, str]:
        out = self.ctl("status").stdout
        states = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) >= 2 and parts[0] in PROGRAMS:
                states[parts[0]] = parts[1]
        return states

    def pid(self, program: str) -> int:
        out = self.ctl("pid", program).stdout.strip()
        return int(out)

    def kill(self, program: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(program)
        os.kill(pid, sig)
        return pid

    def wait_restarted(self, program: str, old_pid: int, timeout: float = 20) -> int:
        def restarted() -> int | None:
            states = self.states()
            if states.get(program) != "RUNNING":
                return None
            pid = self.pid(program)
            return pid if pid not in (0, old_pid) else None

        return int(wait_for(restarted, timeout, 0.1, f"{program} restarted"))

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # -- tasks --------------------------------------------------------------------------------

    def write_task(self, task_id: str, description: str, *, atomic: bool = True, **fields: Any) -> Path:
        task = {"task_id": task_id, "description": description, "created_at": iso_now(), **fields}
        path = self.spool.task_path(self.worker, task_id)
        if atomic:
            atomic_write_json(path, task, durable=False)
        else:
            path.write_text(json.dumps(task))
        return path

    def result(self, task_id: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.spool.result_path(self.worker, task_id).read_text()))
        except (FileNotFoundError, ValueError):
            return None

    def wait_result(self, task_id: str, timeout: float = 30) -> dict[str, Any]:
        return dict(wait_for(lambda: self.result(task_id), timeout, 0.02, f"result of {task_id}\n{self.log_tail()}"))

    def result_ids(self) -> list[str]:
        return sorted(p.stem for p in self.spool.results(self.worker).glob("*.json"))

    def dead_letter(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.spool.dead_letter_path(key).read_text()))
        except (FileNotFoundError, ValueError):
            return None

    def cli(self, *args: str, check: bool = False, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "activation"), *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=check
        )


@pytest.fixture
def make_tree(tmp_path: Path) -> Iterator[Callable[..., WorkerTree]]:
    """Build (and start) worker trees; every one is torn down, with all its descendants."""
    trees: list[WorkerTree] = []

    def make(worker: str = "w1", *, start: bool = True, agent: str | None = None, **env: str) -> WorkerTree:
        spool = Spool(tmp_path / "spool")
        spool.init([worker])
        run_dir = Path(tempfile.mkdtemp(prefix="actw-"))
        environment = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "WORKER_NAME": worker,
            "ACTIVATION_SPOOL": str(spool.root),
            "ACTIVATION_RUN_DIR": str(run_dir),
            "ACTIVATION_AGENT_COMMAND": agent or fake_agent_command(),
            "ACTIVATION_HEARTBEAT_INTERVAL": "0.5",
            "ACTIVATION_RESCAN_INTERVAL": "1",
            "ACTIVATION_KILL_GRACE": "1",
            "ACTIVATION_METRICS_PORT": str(free_port()),
            "PYTHONUNBUFFERED": "1",
        }
        for key in ("REDIS_URL", "ACTIVATION_ADMIN_TOKEN", "ACTIVATION_MODE"):
            environment.pop(key, None)
        environment.update(env)
        tree = WorkerTree(spool, run_dir, worker, environment, tmp_path / f"supervisord-{worker}.log")
        trees.append(tree)
        return tree.start() if start else tree

    yield make
    for tree in trees:
        tree.kill_everything()
        with contextlib.suppress(OSError):
            import shutil

            shutil.rmtree(tree.run_dir, ignore_errors=True)
