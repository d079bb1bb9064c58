"""What the worker's supervisord says about its programs, over its XML-RPC Unix socket.

The heartbeat reports the programs' states; a restarting executor needs their pids, to tell its
siblings apart from the orphans a killed predecessor left with supervisord.
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from collections.abc import Callable
from pathlib import Path
from typing import Any

SUPERVISOR_SOCKET = "supervisor.sock"


def supervisor_socket(run_dir: Path) -> Path:
    return Path(run_dir) / SUPERVISOR_SOCKET


def process_infos(sock: Path, timeout: float = 2.0) -> list[dict[str, Any]]:
    """supervisord's getAllProcessInfo: one dict per program (name, statename, pid, ...); raises OSError."""
    infos: list[dict[str, Any]] = _call(sock, timeout, lambda proxy: proxy.supervisor.getAllProcessInfo())
    return infos


def supervisord_pid(sock: Path, timeout: float = 2.0) -> int:
    """The pid of the supervisord behind ``sock``; raises OSError."""
    return int(_call(sock, timeout, lambda proxy: proxy.supervisor.getPID()))


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
