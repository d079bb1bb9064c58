"""The worker's supervisord over its XML-RPC Unix socket: program states, pids, configuration.

The heartbeat reports the states (and judges the executor's beat against its pid and start); a
restarting executor tells its siblings from the orphans a killed predecessor left with
supervisord; the executor checks that its drain fits in the ``stopwaitsecs`` it will really get.
The transport is our own, with a timeout on each connection (no process-wide socket timeout).
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

from activation.config import check_stop_margin

SUPERVISOR_SOCKET = "supervisor.sock"


def supervisor_socket(run_dir: Path) -> Path:
    return Path(run_dir) / SUPERVISOR_SOCKET


def program_infos(sock: Path, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
    """``{program: getProcessInfo()}`` (statename, pid, start, …); raises OSError."""
    infos: list[dict[str, Any]] = _call(sock, timeout, lambda proxy: proxy.supervisor.getAllProcessInfo())
    return {str(info["name"]): info for info in infos}


def program_states(sock: Path, timeout: float = 2.0) -> dict[str, str]:
    """``{program: state}`` from supervisord, e.g. ``{"executor": "RUNNING"}``; raises OSError."""
    return {name: str(info["statename"]) for name, info in program_infos(sock, timeout).items()}


def supervisor_state(sock: Path, timeout: float = 2.0) -> str:
    """supervisord's own state (``RUNNING``, ``SHUTDOWN``, ...); raises OSError, also for SHUTDOWN_STATE."""
    state: dict[str, Any] = _call(sock, timeout, lambda proxy: proxy.supervisor.getState())
    return str(state["statename"])


def supervisord_pid(sock: Path, timeout: float = 2.0) -> int:
    """The pid of the supervisord behind ``sock``; raises OSError."""
    return int(_call(sock, timeout, lambda proxy: proxy.supervisor.getPID()))


def program_config(sock: Path, program: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """supervisord's configuration of ``program`` (stopwaitsecs, …), None if it has none; raises OSError."""
    configs: list[dict[str, Any]] = _call(sock, timeout, lambda proxy: proxy.supervisor.getAllConfigInfo())
    for info in configs:
        if info.get("name") == program:
            return info
    return None


def check_drain_fits(run_dir: Path, program: str, drain: float, grace: float) -> None:
    """ConfigError when supervisord's real ``stopwaitsecs`` for ``program`` cannot hold drain + grace.

    The settings check the variables against ACTIVATION_EXECUTOR_STOPWAITSECS; this checks them
    against what supervisord was actually given, in case its configuration was edited.
    """
    sock = supervisor_socket(run_dir)
    if not sock.exists():
        return
    try:
        config = program_config(sock, program)
    except OSError:
        return  # not our supervisord, or not answering: the settings' own check stands
    if config is not None and config.get("stopwaitsecs") is not None:
        where = f", from supervisord's [program:{program}]"
        check_stop_margin(drain, grace, float(config["stopwaitsecs"]), where=where)


class _UnixConnection(http.client.HTTPConnection):
    """HTTP over supervisord's Unix socket, with a timeout on this connection only."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except BaseException:
            sock.close()
            raise
        self.sock = sock


class _UnixTransport(xmlrpc.client.Transport):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__()
        self._path, self._timeout = path, timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        return _UnixConnection(self._path, self._timeout)


def _call(sock: Path, timeout: float, call: Callable[[Any], Any]) -> Any:
    proxy = xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=_UnixTransport(str(sock), timeout))
    try:
        return call(proxy)
    except xmlrpc.client.Fault as exc:
        raise OSError(f"supervisord refused: {exc.faultString}") from None
    except (http.client.HTTPException, xmlrpc.client.ProtocolError) as exc:
        raise OSError(f"supervisord answered badly: {exc}") from None
    finally:
        proxy("close")()
