"""Sentinel across hosts: a Redis primary and its replica on two hosts, three Sentinels on three more.

The namespaced counterpart of tests/redis_topologies.py's SentinelSet (same settings: failover a
second after the primary stops answering), with a quorum of two so one Sentinel alone never
decides. Every process runs inside its host (`Host.popen`), so the pid kept is the server's own;
the hosts' teardown (Network.remove) ends whatever is left.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis

from tests.harness import wait_until
from tests.hosts.netns import Host

MASTER = "mymaster"
QUORUM = 2


def _client(address: str, port: int) -> redis.Redis:
    return redis.Redis(host=address, port=port, socket_connect_timeout=0.5, socket_timeout=0.5, decode_responses=True)


def _ask(address: str, port: int, *command: str) -> object:
    client = _client(address, port)
    try:
        return client.execute_command(*command)
    except redis.RedisError:
        return None
    finally:
        client.close()


class SentinelHosts:
    """``start()`` the primary, the replica (synced), then the Sentinels (each seeing the replica)."""

    def __init__(self, folder: Path, primary: Host, replica: Host, sentinels: list[Host]) -> None:
        self.folder = folder
        self.primary_host, self.replica_host, self.sentinel_hosts = primary, replica, sentinels
        self.primary_port, self.replica_port = primary.free_port(), replica.free_port()
        self.sentinel_ports = [host.free_port() for host in sentinels]
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def sentinels(self) -> str:
        """REDIS_SENTINELS for the clients."""
        pairs = zip(self.sentinel_hosts, self.sentinel_ports, strict=True)
        return ",".join(f"{host.address}:{port}" for host, port in pairs)

    def _spawn(self, name: str, host: Host, port: int, argv: list[str]) -> None:
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        argv = [*argv, "--dir", str(folder), "--logfile", str(folder / "redis.log"), "--daemonize", "no"]
        self.processes[name] = host.popen(argv, stdout=subprocess.DEVNULL)
        wait_until(lambda: _ask(host.address, port, "PING") is not None, 10, 0.02, f"{name} to answer")

    def start(self) -> SentinelHosts:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (make test installs it)")
        p, r = self.primary_host, self.replica_host
        base = ["--save", "", "--appendonly", "yes", "--appendfsync", "always", "--protected-mode", "no"]
        base += ["--maxmemory-policy", "noeviction"]
        primary = [binary, "--port", str(self.primary_port), "--bind", p.address, *base]
        self._spawn("primary", p, self.primary_port, primary)
        replica = [binary, "--port", str(self.replica_port), "--bind", r.address, *base]
        self._spawn("replica", r, self.replica_port, [*replica, "--replicaof", p.address, str(self.primary_port)])
        wait_until(self._replica_in_sync, 20, 0.05, "the replica to sync")
        for index, (host, port) in enumerate(zip(self.sentinel_hosts, self.sentinel_ports, strict=True)):
            conf = self.folder / f"sentinel-{index}.conf"
            conf.write_text(
                f"port {port}\nbind {host.address}\nprotected-mode no\n"
                f"sentinel monitor {MASTER} {p.address} {self.primary_port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 5000\n"
            )
            self._spawn(f"sentinel-{index}", host, port, [binary, str(conf), "--sentinel"])
        wait_until(self._sentinels_ready, 30, 0.1, "every Sentinel to know the replica and the other Sentinels")
        return self

    def _replica_in_sync(self) -> bool:
        info = _ask(self.replica_host.address, self.replica_port, "INFO", "replication")
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for host, port in zip(self.sentinel_hosts, self.sentinel_ports, strict=True):
            if not _ask(host.address, port, "SENTINEL", "REPLICAS", MASTER):
                return False
            others = _ask(host.address, port, "SENTINEL", "SENTINELS", MASTER)
            if not isinstance(others, list) or len(others) < len(self.sentinel_hosts) - 1:
                return False
        return True

    def primary(self) -> str:
        """host:port of the primary as the first Sentinel that answers names it."""
        for host, port in zip(self.sentinel_hosts, self.sentinel_ports, strict=True):
            named = _ask(host.address, port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
            if isinstance(named, list | tuple) and len(named) == 2:
                return f"{named[0]}:{named[1]}"
        return ""

    def replica_is_primary(self) -> bool:
        """The Sentinels name the replica, and it takes writes."""
        info = _ask(self.replica_host.address, self.replica_port, "INFO", "replication")
        named = self.primary() == f"{self.replica_host.address}:{self.replica_port}"
        return named and isinstance(info, dict) and info.get("role") == "master"

    def kill_primary(self) -> None:
        process = self.processes["primary"]
        process.kill()
        process.wait(5)

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
            process.wait(5)
        self.processes.clear()
