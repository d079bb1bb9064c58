"""The worker's supervisord over its XML-RPC Unix socket: program states, pids, configuration.

The heartbeat reports the states (and judges the executor's beat against its pid and start); a
restarting executor tells its siblings from the orphans a killed predecessor left with
supervisord; the executor checks that its drain fits in the ``stopwaitsecs`` it will really get.
The transport is our own, with a timeout on each connection (no process-wide socket timeout).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

from activation.config import check_stop_margin

SUPERVISOR_SOCKET = "supervisor.sock"
STATES_FILE = "programs.json"  # worker.conf's states_file (activation/supervisor_loop.py writes it)
MAX_STATES = 64 << 10  # bytes; three programs' states are about 300


def supervisor_socket(run_dir: Path) -> Path:
    return Path(run_dir) / SUPERVISOR_SOCKET


def program_infos(sock: Path, timeout: float = 2.0) -> dict[str, dict[str, Any]]:
    """``{program: getProcessInfo()}`` (statename, pid, start, …); raises OSError."""
    infos: list[dict[str, Any]] = _call(sock, timeout, "supervisor.getAllProcessInfo")
    return {str(info["name"]): info for info in infos}


def told_program_infos(run_dir: Path) -> dict[str, dict[str, Any]] | None:
    """What our parent supervisord last wrote of its programs: ``{program: {statename, pid, start}}``.

    supervisord writes the file on every change of a state (supervisor_loop.py), so reading it
    is reading its answer to getAllProcessInfo without the call. None when the file is absent,
    unreadable, or not written by this process's parent (supervisord restarted, gone, or this
    program runs under another one): ask over XML-RPC then. Raises OSError when supervisord is
    not RUNNING, as its RPC answers SHUTDOWN_STATE.
    """
    try:
        with open(Path(run_dir) / STATES_FILE, "rb") as file:
            record = json.loads(file.read(MAX_STATES))
        if record["supervisord_pid"] != os.getppid():
            return None
        statename, programs = record["statename"], record["programs"]
        infos = {str(name): {**info, "name": name} for name, info in programs.items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if statename != "RUNNING":
        raise OSError(f"supervisord refused: SHUTDOWN_STATE (it is {statename})")
    return infos


def program_states(sock: Path, timeout: float = 2.0) -> dict[str, str]:
    """``{program: state}`` from supervisord, e.g. ``{"executor": "RUNNING"}``; raises OSError."""
    return {name: str(info["statename"]) for name, info in program_infos(sock, timeout).items()}


def supervisor_state(sock: Path, timeout: float = 2.0) -> str:
    """supervisord's own state (``RUNNING``, ``SHUTDOWN``, ...); raises OSError, also for SHUTDOWN_STATE."""
    state: dict[str, Any] = _call(sock, timeout, "supervisor.getState")
    return str(state["statename"])


def supervisord_pid(sock: Path, timeout: float = 2.0) -> int:
    """The pid of the supervisord behind ``sock``; raises OSError."""
    return int(_call(sock, timeout, "supervisor.getPID"))


def program_config(sock: Path, program: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """supervisord's configuration of ``program`` (stopwaitsecs, …), None if it has none; raises OSError."""
    configs: list[dict[str, Any]] = _call(sock, timeout, "supervisor.getAllConfigInfo")
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


MAX_ANSWER = 4 << 20  # bytes; getAllConfigInfo of a few programs is a few KB


def _call(sock: Path, timeout: float, method: str) -> Any:
    """One XML-RPC call without parameters, as HTTP/1.0 over the Unix socket (supervisord closes it).

    Written here rather than with xmlrpc.client: that module loads http.client, ssl and email
    (about 6 MB of the heartbeat's and the executor's idle memory) for what is one request.
    """
    body = f"<?xml version='1.0'?><methodCall><methodName>{method}</methodName><params></params></methodCall>"
    request = (
        f"POST /RPC2 HTTP/1.0\r\nHost: localhost\r\nContent-Type: text/xml\r\nContent-Length: {len(body)}\r\n\r\n{body}"
    ).encode()
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(timeout)
        conn.connect(str(sock))
        conn.sendall(request)
        chunks, size = [], 0
        while chunk := conn.recv(65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise OSError(f"supervisord answered badly: over {MAX_ANSWER} bytes")
    finally:
        conn.close()
    head, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].split(b" ", 2)
    if len(status) < 2 or status[1] != b"200":
        raise OSError(f"supervisord answered badly: {head[:80]!r}")
    try:
        root = ElementTree.fromstring(payload)
        fault = root.find("fault/value")
        if fault is not None:
            raise OSError(f"supervisord refused: {_value(fault).get('faultString')}")
        answer = root.find("params/param/value")
        if root.tag != "methodResponse" or answer is None:
            raise ValueError("not a methodResponse")
        return _value(answer)
    except (ElementTree.ParseError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise OSError(f"supervisord answered badly: {exc}") from None


def _value(node: ElementTree.Element) -> Any:
    """An XML-RPC ``<value>``: the types supervisord sends (no nil, no dates, no binary)."""
    typed = next(iter(node), None)
    if typed is None:
        return node.text or ""  # a bare <value> is a string
    text = typed.text or ""
    if typed.tag == "string":
        return text
    if typed.tag in ("int", "i4", "i8"):
        return int(text)
    if typed.tag == "boolean":
        return text.strip() == "1"
    if typed.tag == "double":
        return float(text)
    if typed.tag == "array":
        return [_value(value) for value in typed.iterfind("data/value")]
    if typed.tag == "struct":
        return {member.findtext("name", ""): _value(member.find("value")) for member in typed.iterfind("member")}  # type: ignore[arg-type]
    raise ValueError(f"an XML-RPC {typed.tag} supervisord never sends")
