"""Podman for the container tests: its settings, the local base image, the builds, the API socket.

No image registry is reachable where these tests run, so everything is built here: a Debian base
from ``debootstrap --variant=minbase bookworm`` (the mirror is the machine's own apt mirror),
imported as ``localhost/activation-base:bookworm``, then the project's two images and the two
test-only images (Redis and Prometheus, from Debian's packages) on top of it. Podman keeps every
image and build layer between runs, so a second run rebuilds only what changed.

The engine's two settings that this machine needs live in a ``containers.conf`` of the test
session (``CONTAINERS_CONF``), never in /etc: default rlimits within what the missing
CAP_SYS_RESOURCE allows, and runc (crun rejects the hybrid cgroup layout).
"""

from __future__ import annotations

import contextlib
import http.client
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.harness import ROOT, wait_until

BASE_IMAGE = "localhost/activation-base:bookworm"
IMAGE_TAG = "test"
HERE = Path(__file__).resolve().parent
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
EXTRA_CA = ROOT / "containers" / "ca" / "host-bundle.crt"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
LABEL = "activation.test=1"  # on every image built here, so that a user can find them

CONTAINERS_CONF = """\
# Written by tests/containers for this test session only.
[containers]
# CAP_SYS_RESOURCE is missing: podman's default rlimits (nofile 1048576) cannot be set.
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
# crun rejects the hybrid cgroup layout of these machines; runc accepts it.
runtime = "runc"

[network]
network_backend = "netavark"
"""


@dataclass(frozen=True)
class Image:
    """An image the tests build: its tag, Dockerfile and build arguments."""

    name: str
    dockerfile: Path
    args: dict[str, str] = field(default_factory=dict)

    @property
    def tag(self) -> str:
        return f"localhost/{self.name}:{IMAGE_TAG}"


IMAGES = (
    Image("activation-worker", ROOT / "containers" / "worker" / "Dockerfile", {"BASE_IMAGE": BASE_IMAGE}),
    Image("activation-orchestrator", ROOT / "containers" / "orchestrator" / "Dockerfile", {"BASE_IMAGE": BASE_IMAGE}),
    Image("activation-test-redis", HERE / "redis.Dockerfile", {"BASE_IMAGE": BASE_IMAGE}),
    Image("activation-test-prometheus", HERE / "prometheus.Dockerfile", {"BASE_IMAGE": BASE_IMAGE}),
)


class EngineUnavailable(Exception):
    """Podman cannot run here; the message says why (the tests skip with it)."""


def debian_mirror(apt_dir: Path = Path("/etc/apt"), suite: str = "bookworm") -> str:
    """The machine's Debian mirror for ``suite``: the first `deb` source of it that is not -security."""
    files = [apt_dir / "sources.list"]
    parts = apt_dir / "sources.list.d"
    if parts.is_dir():
        files += sorted(p for p in parts.iterdir() if p.suffix in (".list", ".sources"))
    for path in files:
        with contextlib.suppress(OSError, UnicodeDecodeError):
            for uri, suites in _deb_sources(path):
                if suite in suites and not uri.rstrip("/").endswith("-security"):
                    return uri.rstrip("/")
    return DEFAULT_MIRROR


def _deb_sources(path: Path) -> Iterator[tuple[str, list[str]]]:
    """(URI, suites) of each `deb` entry: one-line `.list` format or deb822 `.sources` stanzas."""
    text = path.read_text()
    if path.suffix == ".list":
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb":
                yield words[1], [words[2]]
        return
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        for line in stanza.splitlines():
            if line.startswith("#") or ":" not in line or line[:1].isspace():
                continue
            key, _, value = line.partition(":")
            fields[key.strip().lower()] = value.strip()
        if "deb" in fields.get("types", "").split() and fields.get("enabled", "yes").lower() != "no":
            for uri in fields.get("uris", "").split():
                yield uri, fields.get("suites", "").split()


class Podman:
    """The podman CLI with the session's containers.conf."""

    def __init__(self, conf_dir: Path) -> None:
        self.conf = conf_dir / "containers.conf"
        self.conf.write_text(CONTAINERS_CONF)
        self.env = {**os.environ, "CONTAINERS_CONF": str(self.conf)}
        self.log = conf_dir / "builds.log"

    def run(self, *args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if check and done.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: exit {done.returncode}\n{done.stderr[-3000:]}")
        return done

    def check_usable(self) -> None:
        """Raise EngineUnavailable unless podman is installed and runs as root here."""
        if shutil.which("podman") is None:
            raise EngineUnavailable("podman is not installed (`make podman` installs it with apt-get)")
        if os.geteuid() != 0:
            raise EngineUnavailable("these tests run podman as root (debootstrap needs it); run them as root")
        try:
            info = self.run("info", "--format", "{{.Store.GraphDriverName}}", timeout=60, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EngineUnavailable(f"podman info does not run: {exc}") from exc
        if info.returncode != 0:
            raise EngineUnavailable(f"podman info fails: {info.stderr.strip()[-500:]}")

    def image_id(self, tag: str) -> str | None:
        done = self.run("image", "inspect", "--format", "{{.Id}}", tag, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    def ensure_base(self) -> bool:
        """Import the debootstrap base unless it is there; True when it was made now."""
        if self.image_id(BASE_IMAGE):
            return False
        if shutil.which("debootstrap") is None:
            raise EngineUnavailable("debootstrap is not installed (`make podman` installs it)")
        root = Path(tempfile.mkdtemp(prefix="activation-base-", dir="/var/tmp"))
        try:
            self._logged(
                ["nice", "-n", "10", "debootstrap", "--variant=minbase", "bookworm", str(root), debian_mirror()],
                # Niced beside the other xdist workers of `make test TEST_WORKERS=4` on 2 cores, it
                # ran past 600 s (its dpkg runs get what CPU is left); the tests' timeout is 1800 s.
                timeout=1500,
            )
            for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for path in (root / leftover).glob("*"):
                    if path.is_file():
                        path.unlink()
            tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
            try:
                imported = subprocess.run(
                    ["podman", "import", "--change", f"LABEL {LABEL}", "-", BASE_IMAGE],
                    stdin=tar.stdout, env=self.env, capture_output=True, text=True, timeout=300,
                )  # fmt: skip
            finally:
                assert tar.stdout is not None
                tar.stdout.close()
                tar.wait(60)
            if imported.returncode != 0 or tar.returncode != 0:
                raise AssertionError(f"podman import {BASE_IMAGE}: {imported.stderr[-2000:]}")
        finally:
            shutil.rmtree(root, ignore_errors=True)
        return True

    def build(self, image: Image) -> str:
        """`podman build` (niced, layers cached); returns the build's output."""
        # --format docker: the OCI format has no HEALTHCHECK (or SHELL), and podman would drop them.
        args = ["nice", "-n", "10", "podman", "build", "--format", "docker", "--layers", "--label", LABEL]
        args += ["-t", image.tag]
        for key, value in image.args.items():
            args += ["--build-arg", f"{key}={value}"]
        return self._logged([*args, "-f", str(image.dockerfile), str(ROOT)], timeout=1200)

    def _logged(self, argv: Sequence[str], timeout: float) -> str:
        started = time.monotonic()
        done = subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        with self.log.open("a") as log:
            log.write(f"$ {' '.join(argv)}  # {time.monotonic() - started:.1f} s, exit {done.returncode}\n")
            log.write(done.stdout + done.stderr + "\n")
        if done.returncode != 0:
            raise AssertionError(f"{' '.join(argv)}: exit {done.returncode}\n{(done.stdout + done.stderr)[-4000:]}")
        return done.stdout + done.stderr


def provide_extra_ca() -> None:
    """The host's CA bundle as the builds' extra CA (pip and npm go through a TLS-intercepting proxy)."""
    if HOST_CA_BUNDLE.is_file():
        data = HOST_CA_BUNDLE.read_bytes()
        if not EXTRA_CA.exists() or EXTRA_CA.read_bytes() != data:
            EXTRA_CA.write_bytes(data)  # git ignores containers/ca/*.crt


class UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (the Docker API)."""

    def __init__(self, path: str, timeout: float = 10) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.path)
        self.sock = sock


class ApiService:
    """`podman system service --time=0` on a private socket: the Docker API for docker-compose."""

    running: set[int] = set()  # the pids of services started and not yet stopped (for no_leaks)

    def __init__(self, podman: Podman, folder: Path) -> None:
        self.podman = podman
        self.socket = folder / "podman.sock"
        self.log = folder / "podman-service.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def docker_host(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> ApiService:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["podman", "system", "service", "--time=0", self.docker_host],
                env=self.podman.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        ApiService.running.add(self.process.pid)
        wait_until(self._answers, 30, 0.1, lambda: f"the podman API on {self.socket}: {self._log_tail()}")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"podman system service exited {self.process.returncode}: {self._log_tail()}")
        connection = UnixHTTPConnection(str(self.socket))
        try:
            connection.request("GET", "/_ping")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def _log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log.read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 15)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait(30)
        ApiService.running.discard(self.process.pid)
        self.process = None
