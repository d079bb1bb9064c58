"""docker-compose.streams.yml, the streams variant of the stack, as docker-compose itself reads it.

`docker-compose config` merges it over docker-compose.yml (Debian's docker-compose v1, which
`make test` installs; no Docker engine is needed); without it the test skips and says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

import pytest

from activation.config import KNOWN_VARIABLES
from tests.harness import ROOT
from tests.unit.test_container_files import DUMMY_SECRETS, WORKERS, activation_services, service_environment

yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) reads the compose files")

STREAMS_FILE = ROOT / "docker-compose.streams.yml"


@pytest.fixture(scope="module")
def merged() -> dict[str, Any]:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.skip("docker-compose is not installed (make test installs Debian's docker-compose v1)")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **DUMMY_SECRETS}
    done = subprocess.run(
        [binary, "-f", "docker-compose.yml", "-f", STREAMS_FILE.name, "config"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return dict(yaml.safe_load(done.stdout))


def mounts(service: dict[str, Any], target: str) -> list[str]:
    """The sources mounted at ``target`` ("" for an anonymous volume), in short or long syntax."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, dict):
            if volume.get("target") == target:
                found.append(str(volume.get("source") or ""))
            continue
        parts = str(volume).split(":")
        if len(parts) == 1 and parts[0] == target:
            found.append("")
        elif len(parts) > 1 and parts[1] == target:
            found.append(parts[0])
    return found


def test_every_activation_service_runs_the_streams_transport(merged):
    for name in activation_services(merged):
        env = service_environment(merged, name)
        assert env["ACTIVATION_TRANSPORT"] == "streams", name
        for variable in env:
            assert variable in KNOWN_VARIABLES or not variable.startswith("ACTIVATION_"), f"{name}: {variable}"


def test_no_spool_volume_is_shared_between_worker_and_orchestrator_containers(merged):
    assert mounts(merged["services"]["orchestrator"], "/spool") == ["orchestrator-spool"]
    for worker in WORKERS:
        # An anonymous volume: each container, each replica of a scaled service too, has its own.
        assert mounts(merged["services"][worker], "/spool") == [""], worker
    for name, service in merged["services"].items():
        assert "spool" not in [v.split(":")[0] for v in service.get("volumes", []) if isinstance(v, str)], name


def test_a_worker_service_can_be_scaled(merged):
    """`up --scale marie=3` needs no fixed name and no published host port on the worker."""
    for worker in WORKERS:
        service = merged["services"][worker]
        assert "container_name" not in service, worker
        assert not service.get("ports"), worker


def test_redis_keeps_what_it_acknowledged_and_never_evicts(merged):
    redis = merged["services"]["redis"]
    command = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    assert mounts(redis, "/data") == ["redis-data"]  # the append-only file outlives the container
