"""What ``activation up`` checks around the start: every port it needs is free and every tree's
sockets fit in a Unix socket address (before), and every program is RUNNING (after), so that a
newcomer gets one line either way."""

from __future__ import annotations

import contextlib
import errno
import socket
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from activation.config import Settings
from activation.errors import ActivationError, ConfigError
from activation.spool.health import worker_health
from activation.spool.layout import Spool

READY_TIMEOUT = 60.0
# A Unix socket path must fit in sun_path (108 bytes on Linux, with the NUL); the longest socket
# a tree makes in its run folder is supervisord's (worker.conf, orchestrator.conf).
MAX_SOCKET_PATH = 107
LONGEST_SOCKET = "supervisor.sock"


class PortTaken(ActivationError):
    """A port ``up`` needs is in use: the message names it and the variable that moves it."""


@dataclass(frozen=True)
class Port:
    host: str
    port: int
    what: str  # "the admin API", "marie's metrics"
    variable: str  # the variable that moves it


def required_ports(settings: Settings, workers: list[str], *, orchestrator: bool = True) -> list[Port]:
    from activation.orchestrator.http import parse_bind

    ports = []
    if settings.metrics_port:
        for index, worker in enumerate(workers):
            port = settings.metrics_port + index
            ports.append(Port("0.0.0.0", port, f"{worker}'s metrics", "ACTIVATION_METRICS_PORT"))
    if orchestrator:
        host, port = parse_bind(settings.admin_bind)
        ports.append(Port(host, port, "the admin API", "ACTIVATION_ADMIN_BIND"))
    return ports


def check_ports(ports: list[Port]) -> None:
    """Raise PortTaken for the first port that cannot be bound (the programs bind it the same way)."""
    for port in ports:
        family = socket.AF_INET6 if ":" in port.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            try:
                probe.bind((port.host, port.port))
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                    same = [p.port for p in ports if p.variable == port.variable]
                    if len(same) > 1:
                        how = f"set {port.variable} to move the range {min(same)}-{max(same)}"
                    else:
                        example = (
                            port.port + 1
                            if port.variable == "ACTIVATION_METRICS_PORT"
                            else f"{port.host}:{port.port + 1}"
                        )
                        how = f"set {port.variable} to move it (e.g. {example})"
                    reason = "is taken" if exc.errno == errno.EADDRINUSE else "is not allowed"
                    raise PortTaken(f"port {port.port} ({port.what}) {reason}: {how}") from None
                raise


def check_socket_paths(run_dirs: dict[str, Path]) -> None:
    """Raise ConfigError for the first tree whose sockets would not fit in a Unix socket address:
    its supervisord would exit at once with "AF_UNIX path too long" (a checkout deep in the tree)."""
    for name, run_dir in run_dirs.items():
        path = run_dir / LONGEST_SOCKET
        size = len(str(path).encode())
        if size > MAX_SOCKET_PATH:
            raise ConfigError(
                f"{name}'s socket {path} would be {size} bytes, over the {MAX_SOCKET_PATH} a Unix socket "
                "path may have: set ACTIVATION_RUN_DIR to a shorter folder (e.g. /tmp/activation-run)"
            )


def _api_answers(url: str) -> bool:
    with contextlib.suppress(OSError, ValueError), urllib.request.urlopen(url + "/", timeout=1) as response:
        return bool(response.status == 200)
    return False


def wait_ready(
    spool: Spool,
    workers: list[str],
    *,
    api_url: str | None,
    heartbeat_timeout: float,
    still_running: Callable[[], bool],
    timeout: float = READY_TIMEOUT,
) -> list[str]:
    """Wait until every worker's heartbeat shows all its programs RUNNING and the API answers.

    Returns what is still not ready at the deadline (empty when all is), or early when
    ``still_running`` says the stack is going down.
    """
    deadline = time.monotonic() + timeout
    while True:
        missing = []
        for worker in workers:
            health = worker_health(spool, worker, timeout=heartbeat_timeout)
            if not health.healthy or health.programs is None:
                missing.append(f"{worker} ({'; '.join(health.problems) or 'starting'})")
        if api_url is not None and not _api_answers(api_url):
            missing.append(f"the admin API at {api_url}")
        if not missing or time.monotonic() > deadline or not still_running():
            return missing
        time.sleep(0.25)
