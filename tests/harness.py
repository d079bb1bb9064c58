"""A real worker tree under supervisord, started from the repo's own supervisor_conf/worker.conf.

Shared by the integration tests, the chaos run and the benchmarks.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from activation.clock import Clock, iso_now
from activation.spool.atomic import atomic_write_json
from activation.spool.layout import Spool

ROOT = Path(__file__).resolve().parent.parent
FAKE_AGENT = ROOT / "activation" / "fake_agent.py"
BIN = Path(sys.executable).parent


def fake_agent_command(*extra: str) -> str:
    """The agent command template that runs the project's fake agent."""
    return shlex.join([sys.executable, str(FAKE_AGENT), *extra]) + " -p -- {description}"


def wait_until(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str | Callable[[], str] = ""
) -> Any:
    """Poll ``predicate`` until it returns something truthy; TimeoutError after ``timeout``.

    ``what`` says what was awaited; a callable is asked only on failure (e.g. for a log tail).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            said = what() if callable(what) else what
            raise TimeoutError(f"timed out after {timeout}s waiting for {said or predicate}")
        time.sleep(interval)


class ManualClock(Clock):
    """A program's monotonic clock, moved by the test (its wall clock stays the system's)."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


WORKER_CONF = ROOT / "supervisor_conf" / "worker.conf"
ORCHESTRATOR_CONF = ROOT / "supervisor_conf" / "orchestrator.conf"
PROGRAMS = ("listener", "executor", "heartbeat")


# Under pytest-xdist (`make test`) each worker picks its ports from a block of its own, below the
# kernel's ephemeral range (32768 and up on Linux): between the pick and the bind of the program
# it is for, no other worker and no outgoing connection can take the same port. A worker takes the
# first block whose lock file no other process holds (the lock lives as long as the worker), so
# two sessions on one machine (another checkout's `make test -n 4`) never share a block either.
PORT_BLOCKS = range(20000, 32000, 500)
PORT_STRIDE = 10
_held: dict[str, Any] = {}  # "block": this process's block (None: none free), "lock": its open lock file


def _port_block() -> range | None:
    """This xdist worker's block of ports (every PORT_STRIDE-th), or None outside xdist or when all are held."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    if "block" not in _held:
        _held["block"] = None
        for start in PORT_BLOCKS:
            lock = open(Path(tempfile.gettempdir()) / f"activation-test-ports-{start}.lock", "a")  # noqa: SIM115
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.close()
                continue
            # Every PORT_STRIDE-th port of the block: a test that uses the ports after one it was
            # given (`activation up` numbers its workers' metrics ports from the one given) finds them free.
            _held.update(block=range(start, start + PORT_BLOCKS.step, PORT_STRIDE), lock=lock, next=0)
            _held["forwarded"] = forwarded_ports()
            break
    block: range | None = _held["block"]
    return block


def forwarded_ports(rules: str | None = None) -> frozenset[int]:
    """The ports a NAT rule redirects (iptables-save -t nat), which a free bind does not show.

    A container engine that died without its teardown (netavark, a killed conmon) leaves its
    DNAT rules behind: a connection to 127.0.0.1 on such a port goes to a container that is
    gone ("No route to host"), though nothing on the host holds the port. Read once per worker:
    the rules of live stacks come with a held port, only a dead run's stay unseen.
    """
    if rules is None:
        binary = shutil.which("iptables-save")
        if binary is None or os.geteuid() != 0:
            return frozenset()
        try:
            rules = subprocess.run(
                [binary, "-t", "nat"], capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            return frozenset()
    ports: set[int] = set()
    for first, last in re.findall(r"--dports? (\d+)(?::(\d+))?", rules):
        ports.update(range(int(first), int(last or first) + 1))
    return frozenset(ports)


def free_port() -> int:
    """A loopback TCP port that nothing is bound to now."""
    block = _port_block()
    if block is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    for _ in block:
        offset = _held["next"]
        _held["next"] = (offset + 1) % len(block)
        port = block[offset]
        if port in _held["forwarded"]:
            continue
        with socket.socket() as s, contextlib.suppress(OSError):
            s.bind(("127.0.0.1", port))
            return port
    raise OSError(f"no free port in {block.start}-{block.stop - 1}, the block of this xdist worker")


class WorkerTree:
    """One supervisord with listener, executor and heartbeat, and ways to poke at it."""

    def __init__(
        self,
        spool: Spool,
        run_dir: Path,
        worker: str,
        env: dict[str, str],
        log: Path,
        *,
        conf: Path = WORKER_CONF,
        programs: tuple[str, ...] = PROGRAMS,
    ) -> None:
        self.conf = conf
        self.programs = programs
        self.spool = spool
        self.run_dir = run_dir
        self.worker = worker
        self.env = env
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.prefix: list[str] = []  # e.g. setpriv, to run the whole tree as another user

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> WorkerTree:
        self.launch()
        self.wait_running()
        return self

    def launch(self) -> WorkerTree:
        """Start supervisord without waiting for its programs (some may be meant to fail)."""
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                [*self.prefix, sys.executable, "-m", "activation.supervise", "-n", "-c", str(self.conf)],
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def wait_running(self, timeout: float = 20) -> None:
        def all_running() -> bool:
            states = self.states()
            return bool(states) and all(states.get(p) == "RUNNING" for p in self.programs)

        wait_until(all_running, timeout, 0.1, lambda: f"all programs RUNNING; log:\n{self.log_tail()}")

    def stop(self, timeout: float = 70) -> int:
        """SIGTERM supervisord as `docker stop` would, and wait for it."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill_everything(self) -> None:
        """SIGKILL supervisord and every descendant, then drop the run folder and agent cgroups."""
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.process is not None:
            kill_tree(self.process)
        remove_agent_cgroups(self.worker, self.run_dir)

    # -- looking ------------------------------------------------------------------------------

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf), *args],
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
            if len(parts) >= 2 and parts[0] in self.programs:
                states[parts[0]] = parts[1]
        return states

    def pid(self, program: str) -> int:
        out = self.ctl("pid", program).stdout.strip()
        return int(out)

    def kill(self, program: str, sig: int = signal.SIGKILL) -> int:
        pid = self.pid(program)
        os.kill(pid, sig)
        return pid

    def pause(self, program: str) -> int:
        """SIGSTOP one program (say, the executor), as a wedged process; resume(pid) lets it go on."""
        return self.kill(program, signal.SIGSTOP)

    def resume(self, pid: int) -> None:
        os.kill(pid, signal.SIGCONT)

    def wait_restarted(self, program: str, old_pid: int, timeout: float = 20) -> int:
        def restarted() -> int | None:
            states = self.states()
            if states.get(program) != "RUNNING":
                return None
            pid = self.pid(program)
            return pid if pid not in (0, old_pid) else None

        return int(wait_until(restarted, timeout, 0.1, f"{program} restarted"))

    def log_text(self) -> str:
        """Everything supervisord and its programs have logged so far."""
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

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
        return dict(
            wait_until(
                lambda: self.result(task_id), timeout, 0.02, lambda: f"result of {task_id}; log:\n{self.log_tail()}"
            )
        )

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


def remove_agent_cgroups(worker: str, run_dir: Path) -> None:
    """End and remove the cgroup subtree a killed executor of this tree leaves (cgroup mode)."""
    from activation.worker.containment import TaskCgroups, containment_id

    root = None
    with contextlib.suppress(OSError):
        mount = cgroup2_root()
        if mount is not None:
            root = mount / f"activation-{containment_id(worker, run_dir)}"
    if root is None or not root.exists():
        return
    groups = TaskCgroups(root, root.parent)
    groups.sweep(grace=0)
    groups.close()


def cgroup2_root() -> Path | None:
    """This process's own cgroup v2 folder, where an executor it starts makes its subtree."""
    from activation.worker.containment import cgroup2_mount, own_cgroup

    mount = cgroup2_mount(Path("/proc/self/mountinfo").read_text())
    own = own_cgroup(Path("/proc/self/cgroup").read_text())
    return None if mount is None or own is None else mount / own.lstrip("/")


def kill_tree(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``process`` and every descendant it has, and reap it."""
    with contextlib.suppress(psutil.Error):
        root = psutil.Process(process.pid)
        procs = [root, *root.children(recursive=True)]
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(procs, timeout=5)
    with contextlib.suppress(Exception):
        process.wait(5)


def tree_environment(spool: Spool, run_dir: Path, worker: str, agent: str | None = None, **env: str) -> dict[str, str]:
    """The environment a container would give supervisord, with quick test-friendly intervals."""
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
    for key in ("REDIS_URL", "ACTIVATION_ADMIN_TOKEN", "ACTIVATION_MODE", "PROMETHEUS_MULTIPROC_DIR"):
        environment.pop(key, None)
    environment.update(env)
    return environment


def new_tree(root: Path, worker: str = "w1", *, agent: str | None = None, **env: str) -> WorkerTree:
    """A tree (not started yet) on a spool under ``root`` with a short private run folder."""
    spool = Spool(root / "spool")
    spool.init([worker])
    run_dir = Path(tempfile.mkdtemp(prefix="actw-"))
    environment = tree_environment(spool, run_dir, worker, agent, **env)
    return WorkerTree(spool, run_dir, worker, environment, root / f"supervisord-{worker}.log")


def new_orchestrator(root: Path, **env: str) -> WorkerTree:
    """The orchestrator under its own supervisord, on the spool under ``root``, admin API on a free port."""
    spool = Spool(root / "spool")
    spool.init()
    run_dir = Path(tempfile.mkdtemp(prefix="acto-"))
    environment = tree_environment(spool, run_dir, "orchestrator")
    environment.pop("WORKER_NAME")
    environment["ACTIVATION_ADMIN_BIND"] = f"127.0.0.1:{free_port()}"
    environment.update(env)
    return WorkerTree(
        spool,
        run_dir,
        "orchestrator",
        environment,
        root / "supervisord-orchestrator.log",
        conf=ORCHESTRATOR_CONF,
        programs=("orchestrator",),
    )


class RedisServer:
    """A private redis-server on a free loopback port (never the machine's shared 6379)."""

    def __init__(
        self,
        folder: Path,
        password: str | None = None,
        *,
        bind: str = "127.0.0.1",
        port: int | None = None,
        prefix: list[str] | None = None,
        appendonly: bool = False,
        maxmemory_policy: str | None = None,
    ) -> None:
        self.folder = folder
        self.password = password
        self.bind = bind
        self.port = port or free_port()
        # e.g. a network namespace's `ip netns exec`, to run the server on another (test) host
        self.prefix = prefix or []
        self.appendonly = appendonly  # with fsync always, so a SIGKILL loses nothing acknowledged
        self.maxmemory_policy = maxmemory_policy  # None: Redis's default (noeviction)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.bind}:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [*self.prefix, binary, "--port", str(self.port), "--bind", self.bind, "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        argv += ["--maxmemory-policy", self.maxmemory_policy] if self.maxmemory_policy else []
        if self.bind != "127.0.0.1" and not self.password:
            argv += ["--protected-mode", "no"]  # a test host's private subnet: other hosts must get in
        argv += ["--dir", str(self.folder), "--daemonize", "no", "--logfile", str(self.folder / "redis.log")]
        if self.password:
            argv += ["--requirepass", self.password]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        try:
            # 30 s: a saturated machine (the image builds beside four xdist workers) took over 10.
            wait_until(self._answers, 30, 0.02, lambda: f"redis-server to answer; its log: {self._log_tail()}")
        except BaseException:
            self.stop()  # the fixture's teardown never runs for a setup that failed: no leaked server
            raise
        return self

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.folder / "redis.log").read_text(errors="replace")[-1500:]
        return "(none)"

    def _answers(self) -> bool:
        import redis

        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"redis-server exited {self.process.returncode} on {self.url}: {self._log_tail()}")
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5, socket_timeout=0.5)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    def restart(self, *, lose_data: bool = False) -> None:
        """SIGKILL and start again. With appendonly its data comes back from the AOF, unless
        ``lose_data``: then its files go first, as after a restart without persistence."""
        self.stop()
        if lose_data:
            for path in self.folder.iterdir():
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.name != "redis.log":
                    path.unlink()
        self.start()


def tree_queue_key(tree: WorkerTree) -> bytes | None:
    """The queue key activation.supervise gave the tree's programs (in their environment, where only
    root may read it), or None when they use the key file."""
    try:
        environ = Path(f"/proc/{tree.pid('listener')}/environ").read_bytes()
    except (OSError, ValueError):
        return None
    for entry in environ.split(b"\0"):
        if entry.startswith(b"ACTIVATION_QUEUE_KEY="):
            return bytes.fromhex(entry.split(b"=", 1)[1].decode())
    return None


def listener_rescans(tree: WorkerTree) -> int:
    """How many reconcile scans the tree's listener has done, asked over its queue socket (0: unknown).

    Not through the heartbeat file, which a full disk keeps from being written.
    """
    from activation.errors import QueueError
    from activation.worker.queue import QueueClient, load_authkey, socket_path

    client = QueueClient(socket_path(tree.run_dir), load_authkey(tree.run_dir, tree_queue_key(tree)))
    try:
        return int(client.stats().get("rescans") or 0)
    except QueueError:
        return 0
    finally:
        client.close()
