"""activation.hashes gives hashlib's and hmac's bytes, and the work queue's handshake built on it
still speaks with multiprocessing.connection's (the wire format is the stdlib's)."""

from __future__ import annotations

import hashlib
import hmac
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing import AuthenticationError
from multiprocessing import connection as stdlib
from multiprocessing.connection import Connection, Pipe

import pytest

from activation.hashes import hmac_md5, sha256_hex
from activation.worker import queue

KEYS = [b"", b"k", bytes(range(32)), bytes(64), b"\xff" * 65, bytes(range(200))]


@pytest.mark.parametrize("key", KEYS, ids=lambda key: f"{len(key)}B")
def test_hmac_md5_and_sha256_are_the_stdlibs(key: bytes) -> None:
    for message in (b"", b"#CHALLENGE#" + bytes(range(20)), key * 3):
        assert hmac_md5(key, message) == hmac.new(key, message, "md5").digest()
        assert sha256_hex(key + message) == hashlib.sha256(key + message).hexdigest()


Side = Callable[[Connection, bytes], None]


def handshake(server: Side, client: Side, server_key: bytes, client_key: bytes) -> tuple[object, object]:
    """Run both halves over a real pipe; each side's outcome: None, or the exception it raised."""
    ours, theirs = Pipe()
    outcome: dict[str, object] = {}

    def run(name: str, side: Side, conn: Connection, key: bytes, then: Side) -> None:
        try:
            side(conn, key)
            then(conn, key)
            outcome[name] = None
        except (AuthenticationError, EOFError, OSError) as exc:
            outcome[name] = exc

    answer = {queue.deliver_challenge: queue.answer_challenge, stdlib.deliver_challenge: stdlib.answer_challenge}
    deliver = {v: k for k, v in answer.items()}
    thread = threading.Thread(target=run, args=("server", server, ours, server_key, answer[server]))
    thread.start()
    run("client", client, theirs, client_key, deliver[client])
    thread.join(10)
    ours.close()
    theirs.close()
    return outcome["server"], outcome["client"]


PAIRS = [
    (queue.deliver_challenge, queue.answer_challenge),
    (queue.deliver_challenge, stdlib.answer_challenge),
    (stdlib.deliver_challenge, queue.answer_challenge),
]


@pytest.mark.parametrize(("server", "client"), PAIRS, ids=["ours-ours", "ours-stdlib", "stdlib-ours"])
def test_the_queue_handshake_speaks_with_the_stdlibs(server: Side, client: Side) -> None:
    key = bytes(range(32))
    assert handshake(server, client, key, key) == (None, None)
    server_error, client_error = handshake(server, client, key, b"another key")
    assert isinstance(server_error, AuthenticationError) or isinstance(client_error, AuthenticationError)


def test_a_worker_program_does_not_load_openssl() -> None:
    """The queue, the spool and the containment name need no libcrypto (hashlib, hmac, secrets)."""
    code = (
        "import sys\n"
        "import activation.worker.queue, activation.spool.layout, activation.spool.atomic\n"
        "import activation.observability.samples, activation.worker.containment, activation.spool.ownership\n"
        "import activation.worker.entry, activation.worker.listener, activation.worker.heartbeat\n"
        "import activation.worker.executor\n"
        "print(sorted(m for m in ('_hashlib', 'hashlib', 'hmac', 'secrets', '_ssl') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"
