"""Reading the worker's supervisord over its XML-RPC socket: program states, pids, configuration.

The heartbeat reports the states (and judges the executor's beat against its pid and start);
the executor checks that its drain fits in the ``stopwaitsecs`` supervisord will really give it.
"""

from __future__ import annotations

import contextlib
import socket
import xmlrpc.client
from pathlib import Path
from typing import Any

from activation.config import check_stop_margin

SUPERVISOR_SOCKET = "supervisor.sock"


def supervisor_socket(run_dir: Path) -> Path:
    return Path(run_dir) / SUPERVISOR_SOCKET


def _call(sock: Path, method: str, timeout: float) -> list[dict[str, Any]]:
    from supervisor.xmlrpc import SupervisorTransport

    transport = SupervisorTransport(None, None, serverurl=f"unix://{sock}")
    proxy = xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)  # SupervisorTransport opens its own sockets
    try:
        answer: list[dict[str, Any]] = getattr(proxy.supervisor, method)()
    except xmlrpc.client.Fault as exc:
        raise OSError(f"supervisord refused: {exc.faultString}") from None
    except xmlrpc.client.Error as exc:
        raise OSError(f"supervisord: {exc}") from None
    finally:
        socket.setdefaulttimeout(previous)
        with contextlib.suppress(Exception):
            transport.close()
    return answer


def program_infos(sock: Path, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
    """``{program: getProcessInfo()}`` (statename, pid, start, …); raises OSError."""
    return {str(info["name"]): info for info in _call(sock, "getAllProcessInfo", timeout)}


def program_states(sock: Path, timeout: float = 2.0) -> dict[str, str]:
    """``{program: state}`` from supervisord, e.g. ``{"executor": "RUNNING"}``; raises OSError."""
    return {name: str(info["statename"]) for name, info in program_infos(sock, timeout).items()}


def program_config(sock: Path, program: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """supervisord's configuration of ``program`` (stopwaitsecs, …), None if it has none; raises OSError."""
    for info in _call(sock, "getAllConfigInfo", timeout):
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
