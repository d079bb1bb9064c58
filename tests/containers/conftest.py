"""Fixtures of the container tests: podman, the images, its Docker API socket, the compose stack.

The session builds the images (cached by podman between runs); a module starts `podman system
service` on a private socket for Debian's docker-compose (1.29), and brings the stack up from
docker-compose.yml plus tests/containers/docker-compose.test.yml. At the end of the module,
failed or not, every container, network and volume of the stack goes, and the service stops; the
images stay, as the cache of the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from filelock import FileLock

from tests.containers.engine import (
    IMAGE_TAG,
    IMAGES,
    ApiService,
    EngineUnavailable,
    Podman,
    provide_extra_ca,
)
from tests.harness import ROOT, free_port, wait_until

OVERRIDE = Path(__file__).resolve().parent / "docker-compose.test.yml"
STREAMS_VARIANT = ROOT / "docker-compose.streams.yml"  # merged after docker-compose.yml, before OVERRIDE
ENV_FILE = ".env.production"  # events over Redis, files when Redis fails
SERVICES = ("redis", "orchestrator", "marie", "anga", "fabien", "prometheus")
WORKERS = ("marie", "anga", "fabien")
# Inherited variables that must not reach compose: a real key would give claude credentials.
_DROPPED = re.compile(r"^(ANTHROPIC_|CLAUDE|DOCKER_|COMPOSE_)")


@pytest.fixture(scope="session")
def workdir() -> Iterator[Path]:
    """A short private folder (the API socket path must stay under 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="actc-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def podman(workdir: Path) -> Podman:
    engine = Podman(workdir)
    try:
        engine.check_usable()
    except EngineUnavailable as exc:
        pytest.skip(f"podman cannot run here: {exc}")
    if shutil.which("docker-compose") is None:
        pytest.skip("docker-compose is not installed (`make docker-compose` installs Debian's)")
    return engine


class Builds:
    """The session's builds: each image's id, and how long making it took."""

    def __init__(self) -> None:
        self.ids: dict[str, str] = {}
        self.seconds: dict[str, float] = {}
        self.base_made = False


# The images and their tags are the machine's, not the session's: one session builds at a time
# (another pytest-xdist worker, another checkout's run), and the base is debootstrapped once.
BUILD_LOCK = Path(tempfile.gettempdir()) / "activation-test-images.lock"


@pytest.fixture(scope="session")
def images(podman: Podman) -> Builds:
    builds = Builds()
    with FileLock(BUILD_LOCK):
        provide_extra_ca()
        started = time.monotonic()
        try:
            builds.base_made = podman.ensure_base()
        except EngineUnavailable as exc:
            pytest.skip(f"podman cannot run here: {exc}")
        builds.seconds["base"] = time.monotonic() - started
        for image in IMAGES:
            started = time.monotonic()
            podman.build(image)
            builds.seconds[image.name] = time.monotonic() - started
            image_id = podman.image_id(image.tag)
            assert image_id, image.tag
            builds.ids[image.name] = image_id
    with podman.log.open("a") as log:
        log.write(json.dumps({"seconds": builds.seconds, "base_made": builds.base_made}) + "\n")
    return builds


# The service and the stack live for one module: the rest of the suite runs with neither (its
# no_leaks check would take the service for a leak), and no CPU goes to an idle stack.
@pytest.fixture(scope="module")
def api(podman: Podman, workdir: Path) -> Iterator[ApiService]:
    service = ApiService(podman, workdir).start()
    yield service
    service.stop()


class Stack:
    """docker-compose (Debian's 1.29) on the podman API, with the test override (and a variant, if given)."""

    def __init__(self, podman: Podman, api: ApiService, workdir: Path, *, variant: Path | None = None) -> None:
        self.podman = podman
        # The streams variant gets a project of its own: it may come up beside the files stack.
        self.project = f"acttest{os.getpid()}" + ("streams" if variant is not None else "")
        self.files = ["docker-compose.yml", *([str(variant)] if variant is not None else []), str(OVERRIDE)]
        self.admin_port = free_port()
        self.prometheus_port = free_port()
        # The secrets, as the README says: random hex from the shell, never a file of the repo.
        self.token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not _DROPPED.match(k)}
        self.env.update(
            DOCKER_HOST=api.docker_host,
            COMPOSE_HTTP_TIMEOUT="300",  # `stop` may take the whole 60 s grace
            REDIS_PASSWORD=secrets.token_hex(24),
            ACTIVATION_ADMIN_TOKEN=self.token,
            GRAFANA_ADMIN_PASSWORD=secrets.token_hex(16),
            IMAGE_TAG=IMAGE_TAG,
            ADMIN_PORT=str(self.admin_port),
            PROMETHEUS_PORT=str(self.prometheus_port),
        )
        self.log = workdir / f"{self.project}.log"

    def __call__(self, *args: str, timeout: float = 240, check: bool = True) -> subprocess.CompletedProcess[str]:
        argv = ["docker-compose", "--env-file", ENV_FILE, "-p", self.project]
        argv += [arg for path in self.files for arg in ("-f", path)] + list(args)
        done = subprocess.run(
            argv, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(args)}: exit {done.returncode}\n{done.stdout}{done.stderr}\n")
        if check and done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}")
        return done

    def container(self, service: str, index: int = 1) -> str:
        """The container of ``service``; ``index`` picks a replica of a scaled one (compose counts from 1)."""
        return f"{self.project}_{service}_{index}"

    def exec(self, service: str, *argv: str, timeout: float = 60, index: int = 1) -> subprocess.CompletedProcess[str]:
        return self("exec", "-T", "--index", str(index), service, *argv, timeout=timeout, check=False)

    def inspect(self, service: str) -> dict[str, Any]:
        done = self.podman.run("container", "inspect", self.container(service))
        return dict(json.loads(done.stdout)[0])

    def healthcheck(self, service: str, index: int = 1) -> subprocess.CompletedProcess[str]:
        return self.podman.run("healthcheck", "run", self.container(service, index), timeout=60, check=False)

    def wait_healthy(self, service: str, timeout: float = 120, index: int = 1) -> None:
        """Run the container's HEALTHCHECK (podman does not schedule it without systemd) until it passes."""
        wait_until(
            lambda: self.healthcheck(service, index).returncode == 0,
            timeout,
            1.0,
            lambda: f"{service} healthy: {self.healthcheck(service, index).stdout}\n{self.logs(service)}",
        )

    def logs(self, service: str, lines: int = 60) -> str:
        done = self("logs", "--no-color", "--tail", str(lines), service, check=False, timeout=60)
        return done.stdout + done.stderr

    def down(self) -> None:
        """Remove every container, network and volume of the project, whatever state it is in."""
        with contextlib.suppress(AssertionError, subprocess.TimeoutExpired):
            self("down", "--volumes", "--remove-orphans", "--timeout", "10", timeout=300, check=False)
        remove_project(self.podman, self.project)


def remove_project(podman: Podman, project: str) -> None:
    """Every container, network and volume that compose labelled with ``project``."""
    label = f"label=com.docker.compose.project={project}"
    for kind, listing in (
        ("container", ["ps", "-a", "-q", "--filter", label]),
        ("network", ["network", "ls", "-q", "--filter", label]),
        ("volume", ["volume", "ls", "-q", "--filter", label]),
    ):
        left = podman.run(*listing, check=False).stdout.split()
        if left:
            podman.run(kind, "rm", "-f", *left, check=False, timeout=120)


def remove_stale_projects(podman: Podman) -> None:
    """The stacks of earlier sessions that died before their teardown (acttest<pid>, pid gone)."""
    listed = podman.run("ps", "-a", "--format", '{{index .Labels "com.docker.compose.project"}}', check=False)
    for project in set(listed.stdout.split()):
        match = re.fullmatch(r"acttest(\d+)(?:streams)?", project)
        if match and not psutil.pid_exists(int(match[1])):
            remove_project(podman, project)


@pytest.fixture(scope="module")
def stack(images: Builds, api: ApiService, podman: Podman, workdir: Path) -> Iterator[Stack]:
    remove_stale_projects(podman)
    compose = Stack(podman, api, workdir)
    try:
        compose("up", "-d", "--no-build", timeout=300)
        for service in SERVICES:
            if service != "prometheus":  # the only service without a healthcheck
                compose.wait_healthy(service)
        yield compose
    finally:
        compose.down()


STREAMS_REPLICAS = 2


@pytest.fixture
def streams_stack(images: Builds, api: ApiService, podman: Podman, workdir: Path) -> Iterator[Stack]:
    """The streams variant (docker-compose.streams.yml): Redis, the orchestrator and marie scaled to
    STREAMS_REPLICAS, each replica on its own spool; down with its volumes after the test."""
    remove_stale_projects(podman)
    compose = Stack(podman, api, workdir, variant=STREAMS_VARIANT)
    try:
        scale = f"marie={STREAMS_REPLICAS}"
        compose("up", "-d", "--no-build", "--scale", scale, "redis", "orchestrator", "marie", timeout=300)
        compose.wait_healthy("redis")
        compose.wait_healthy("orchestrator")
        for index in range(1, STREAMS_REPLICAS + 1):
            compose.wait_healthy("marie", index=index)
        yield compose
    finally:
        compose.down()


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """As tests/conftest.py's, except for the podman API service, which lives for the whole session."""
    threads_before = set(threading.enumerate())
    yield
    me = psutil.Process()

    def strays() -> list[psutil.Process]:
        keep: set[int] = set()
        for service in ApiService.running:
            with contextlib.suppress(psutil.Error):
                keep |= {service, *(p.pid for p in psutil.Process(service).children(recursive=True))}
        found = []
        for child in me.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if child.pid not in keep and child.status() != psutil.STATUS_ZOMBIE:
                    found.append(child)
        return found

    with contextlib.suppress(TimeoutError):
        wait_until(lambda: not strays(), 10, 0.1)
    left = [f"process {p.pid} {p.name()}" for p in strays()]
    left += [f"thread {t.name}" for t in threading.enumerate() if t not in threads_before and t.is_alive()]
    assert not left, "test leaked " + ", ".join(left)
