"""The security boundary: secrets never leak, the queue socket is private, writes need the token."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import urllib.error
import urllib.request
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client
from pathlib import Path

import pytest

from activation.worker.queue import Get
from tests.conftest import wait_for
from tests.harness import BIN, RedisServer, free_port, new_orchestrator, new_tree

REDIS_PASSWORD = "redis-pw-8d1f2c"
ADMIN_TOKEN = "admin-token-77c3e9"


def api_answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def test_secrets_never_show_anywhere(tmp_path: Path) -> None:
    redis = RedisServer(tmp_path / "redis", password=REDIS_PASSWORD).start()
    secrets_env = {"REDIS_URL": redis.url, "ACTIVATION_ADMIN_TOKEN": ADMIN_TOKEN}
    worker = new_tree(tmp_path, "w1", **secrets_env)
    orchestrator = new_orchestrator(tmp_path, **secrets_env)
    dump = tmp_path / "agent-env.json"
    try:
        worker.start()
        orchestrator.start()
        worker.write_task("leak-check", f"env={dump}")
        result = worker.wait_result("leak-check")
        bad = {"task_id": "bad-url", "description": "x", "timeout": "soon"}
        worker.spool.task_path("w1", "bad-url").write_text(json.dumps(bad))
        api = f"http://{orchestrator.env['ACTIVATION_ADMIN_BIND']}"
        # RUNNING (startsecs=1) comes before the API listens on a loaded machine: wait for it.
        wait_for(lambda: api_answers(f"{api}/config"), 20, 0.1, "the admin API to listen")
        refused = urllib.request.Request(f"{api}/config", data=b'{"mode": "events"}', method="POST")
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(refused, timeout=5)
        assert caught.value.code == 401
        outputs = [
            subprocess.run([str(BIN / "activation"), *args], env=worker.env, capture_output=True, text=True).stdout
            for args in (["status", "--json"], ["show", "leak-check", "--json"], ["config", "get", "--url", api])
        ]
        agent_env = json.loads(dump.read_text())
        assert "REDIS_URL" not in agent_env and "ACTIVATION_ADMIN_TOKEN" not in agent_env
        texts = {
            "agent environment": json.dumps(agent_env),
            "result": json.dumps(result),
            "heartbeat": worker.spool.heartbeat_path("w1").read_text(),
            "worker log": worker.log.read_text(errors="replace"),
            "orchestrator log": orchestrator.log.read_text(errors="replace"),
            "cli output": "\n".join(outputs),
        }
        for path in worker.spool.root.rglob("*"):
            if path.is_file() and not path.is_symlink():
                texts[str(path)] = path.read_text(errors="replace")
        for where, text in texts.items():
            assert REDIS_PASSWORD not in text, where
            assert ADMIN_TOKEN not in text, where
    finally:
        worker.kill_everything()
        orchestrator.kill_everything()
        redis.stop()


def test_the_queue_socket_is_private_and_wants_the_key(tmp_path: Path) -> None:
    tree = new_tree(tmp_path, "w1")
    try:
        tree.start()
        sock = tree.run_dir / "queue.sock"
        wait_for(sock.exists, 10, what="the listener's queue socket")
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        # activation.supervise hands the programs their key in the environment: no file to read.
        assert not (tree.run_dir / "queue.key").exists()
        listener = tree.pid("listener")
        with pytest.raises(AuthenticationError):
            Client(str(sock), family="AF_UNIX", authkey=b"not the key").send(Get(0.1))
        tree.write_task("after-intruder", "x")
        assert tree.wait_result("after-intruder")["status"] == "completed"
        assert tree.pid("listener") == listener
    finally:
        tree.kill_everything()


def test_the_admin_api_binds_loopback_and_refuses_an_open_bind_without_a_token(tmp_path: Path) -> None:
    orchestrator = new_orchestrator(tmp_path)
    assert orchestrator.env["ACTIVATION_ADMIN_BIND"].startswith("127.0.0.1:")
    env = {**orchestrator.env, "ACTIVATION_ADMIN_BIND": f"0.0.0.0:{free_port()}"}
    env.pop("ACTIVATION_ADMIN_TOKEN", None)
    refused = subprocess.run(
        [str(BIN / "activation"), "orchestrator"], env=env, capture_output=True, text=True, timeout=30
    )
    assert refused.returncode != 0
    assert "token" in refused.stderr.lower() and refused.stderr.count("\n") == 1, refused.stderr
