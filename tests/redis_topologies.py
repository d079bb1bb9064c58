"""Real Redis topologies for the streams tests: a three-master Cluster, and Sentinel with a replica.

Every server is a private redis-server on free loopback ports (never the machine's 6379),
without persistence, killed by stop().
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import redis

from tests.harness import RedisServer, free_port, wait_until


def _redis_server() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (make test installs it)")
    return binary


def _answers(port: int) -> bool:
    client = redis.Redis(port=port, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def _free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


class _Servers:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.processes: list[subprocess.Popen[bytes]] = []

    def spawn(self, name: str, argv: list[str], port: int) -> subprocess.Popen[bytes]:
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        argv = [*argv, "--dir", str(folder), "--logfile", str(folder / "redis.log"), "--daemonize", "no"]
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        self.processes.append(process)
        wait_until(lambda: _answers(port), 10, 0.02, f"{name} on port {port} to answer")
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(5)
        self.processes.clear()


class RedisClusterOfThree(_Servers):
    """Three masters, no replicas, every slot assigned; `url` names one node of them."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        ports = _free_ports(6)  # the cluster bus needs a port of its own per node
        self.ports, self.bus_ports = ports[:3], ports[3:]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> RedisClusterOfThree:
        binary = _redis_server()
        for index, (port, bus) in enumerate(zip(self.ports, self.bus_ports, strict=True)):
            argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            argv += ["--cluster-enabled", "yes", "--cluster-port", str(bus)]
            argv += ["--cluster-config-file", str(self.folder / f"nodes-{index}.conf")]
            self.spawn(f"node-{index}", argv, port)
        nodes = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            timeout=30,
        )
        wait_until(self._ok, 20, 0.05, "cluster_state:ok on every node")
        return self

    def _ok(self) -> bool:
        for port in self.ports:
            client = redis.Redis(port=port, socket_timeout=0.5, decode_responses=True)
            try:
                if client.cluster("INFO").get("cluster_state") != "ok":
                    return False
            except redis.RedisError:
                return False
            finally:
                client.close()
        return True

    def port_of_slot(self, slot: int) -> int:
        """The port of the master that serves ``slot``."""
        client = redis.Redis(port=self.ports[0], decode_responses=True)
        try:
            for start, end, master, *_replicas in client.execute_command("CLUSTER", "SLOTS"):
                if int(start) <= slot <= int(end):
                    return int(master[1])
        finally:
            client.close()
        raise LookupError(f"no master serves slot {slot}")


class SentinelSet(_Servers):
    """One primary, one replica of it, and one Sentinel (quorum 1) watching them as ``master``."""

    def __init__(self, folder: Path, master: str = "mymaster") -> None:
        super().__init__(folder)
        self.master = master
        self.primary_port, self.replica_port, self.sentinel_port = _free_ports(3)

    @property
    def sentinels(self) -> str:
        return f"127.0.0.1:{self.sentinel_port}"

    def start(self) -> SentinelSet:
        binary = _redis_server()
        base = ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.spawn("primary", [binary, "--port", str(self.primary_port), *base], self.primary_port)
        replica = [binary, "--port", str(self.replica_port), *base, "--replicaof", "127.0.0.1", str(self.primary_port)]
        self.spawn("replica", replica, self.replica_port)
        wait_until(self._replica_in_sync, 20, 0.05, "the replica to sync")
        conf = self.folder / "sentinel.conf"
        conf.write_text(
            f"port {self.sentinel_port}\nbind 127.0.0.1\n"
            f"sentinel monitor {self.master} 127.0.0.1 {self.primary_port} 1\n"
            f"sentinel down-after-milliseconds {self.master} 1000\n"
            f"sentinel failover-timeout {self.master} 5000\n"
        )
        self.spawn("sentinel", [binary, str(conf), "--sentinel"], self.sentinel_port)
        wait_until(self._sentinel_knows_replica, 20, 0.05, "the sentinel to find the replica")
        return self

    def _replica_in_sync(self) -> bool:
        client = redis.Redis(port=self.replica_port, socket_timeout=0.5, decode_responses=True)
        try:
            return client.info("replication").get("master_link_status") == "up"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _sentinel_knows_replica(self) -> bool:
        client = redis.Redis(port=self.sentinel_port, socket_timeout=0.5, decode_responses=True)
        try:
            return bool(client.execute_command("SENTINEL", "REPLICAS", self.master))
        except redis.RedisError:
            return False
        finally:
            client.close()

    def _start_failover(self) -> bool:
        client = redis.Redis(port=self.sentinel_port, socket_timeout=2, decode_responses=True)
        try:
            return bool(client.execute_command("SENTINEL", "FAILOVER", self.master))
        except redis.ResponseError as exc:
            if "NOGOODSLAVE" in str(exc):
                return False
            raise
        finally:
            client.close()

    def primary(self) -> int:
        """The port Sentinel names as primary now."""
        client = redis.Redis(port=self.sentinel_port, socket_timeout=0.5, decode_responses=True)
        try:
            _host, port = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master)
            return int(port)
        finally:
            client.close()

    def failover(self) -> int:
        """Force a failover to the replica and wait until it is the writable primary; its port."""
        before = self.primary()
        # NOGOODSLAVE until the Sentinel has fresh INFO from the replica: ask until it accepts.
        wait_until(self._start_failover, 30, 0.1, "Sentinel to accept FAILOVER")
        wait_until(lambda: self.primary() != before, 30, 0.05, "Sentinel to name a new primary")
        after = self.primary()
        wait_until(lambda: _role(after) == "master", 30, 0.05, "the new primary to take writes")
        return after


def _role(port: int) -> str:
    client = redis.Redis(port=port, socket_timeout=0.5, decode_responses=True)
    try:
        return str(client.info("replication").get("role"))
    except redis.RedisError:
        return ""
    finally:
        client.close()


class DurableRedisServer(RedisServer):
    """A RedisServer with the settings the streams transport asks for: AOF, fsync always, noeviction.

    ``restart()`` keeps its folder, so the data comes back from the AOF.
    """

    def start(self) -> DurableRedisServer:
        binary = _redis_server()
        self.folder.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        argv += ["--appendonly", "yes", "--appendfsync", "always", "--maxmemory-policy", "noeviction"]
        argv += ["--dir", str(self.folder), "--daemonize", "no", "--logfile", str(self.folder / "redis.log")]
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        wait_until(lambda: _answers(self.port), 10, 0.02, "redis-server to answer")
        return self
