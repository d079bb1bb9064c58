"""supervision.py's own XML-RPC client against a real supervisord, with xmlrpc.client as the oracle.

The programs read supervisord without xmlrpc.client (it loads http.client, ssl and email into
every idle program); what they read must be what supervisorctl's library reads.
"""

from __future__ import annotations

import xmlrpc.client
from typing import Any

import pytest
from supervisor.xmlrpc import SupervisorTransport

from activation.worker import supervision
from tests.conftest import wait_for


def oracle(tree: Any) -> Any:
    transport = SupervisorTransport(None, None, f"unix://{supervision.supervisor_socket(tree.run_dir)}")
    return xmlrpc.client.ServerProxy("http://127.0.0.1", transport=transport).supervisor


def test_every_call_reads_what_xmlrpc_client_reads(make_tree) -> None:
    tree = make_tree()
    sock = supervision.supervisor_socket(tree.run_dir)
    wait_for(lambda: set(supervision.program_states(sock).values()) == {"RUNNING"}, 30, 0.1, "every program RUNNING")
    reference = oracle(tree)
    assert supervision.program_infos(sock) == {info["name"]: info for info in reference.getAllProcessInfo()}
    assert supervision.supervisor_state(sock) == reference.getState()["statename"] == "RUNNING"
    assert supervision.supervisord_pid(sock) == reference.getPID() == tree.process.pid
    executor = supervision.program_config(sock, "executor")
    assert executor is not None
    assert executor == next(c for c in reference.getAllConfigInfo() if c["name"] == "executor")
    assert executor["stopwaitsecs"] == 55 and executor["killasgroup"] is False  # worker.conf's
    assert supervision.program_config(sock, "no-such-program") is None


def test_a_fault_and_a_missing_socket_are_os_errors(make_tree, tmp_path) -> None:
    tree = make_tree()
    sock = supervision.supervisor_socket(tree.run_dir)
    wait_for(sock.exists, 30, 0.05, "supervisord's socket")
    with pytest.raises(OSError, match="supervisord refused: UNKNOWN_METHOD"):
        supervision._call(sock, 2.0, "supervisor.noSuchMethod")
    with pytest.raises(OSError):
        supervision.program_states(tmp_path / "nothing.sock")
