"""Hosts for the cross-host tests: a Redis host, an orchestrator host and two worker hosts.

Each host is a network namespace (tests/hosts/netns.py) made for one test and removed after it,
with nothing left behind (the teardown asserts it). The worker hosts run real supervisord trees
from supervisor_conf/ (tests/harness.py's), each with its own local spool and the same
WORKER_NAME, as two replicas of one worker role would. Where namespaces cannot be made, every
test here is skipped with the reason.

What a test can do with them:
- ``make_redis(appendonly=..., maxmemory_policy=...)``: a real redis-server in the Redis host;
  ``server.restart()`` brings its data back from the AOF, ``restart(lose_data=True)`` does not;
- ``make_worker(host, **env)``: a worker tree inside ``host``; ``tree.kill_everything()``
  SIGKILLs the whole tree, ``tree.pause("executor")`` / ``tree.resume(pid)`` SIGSTOP and SIGCONT
  one program, ``tree.log_text()`` reads its log;
- ``make_orchestrator(**env)``: the orchestrator under supervisord in the orchestrator host,
  its admin API on that host's address, behind a random ACTIVATION_ADMIN_TOKEN;
- ``host.cut()`` / ``host.restore()``: unplug and replug one host's cable;
- ``client``: a Redis client of the Redis host's server; ``streams_env(server, **env)``: a tree's
  environment in streams mode with the short LEASE.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.harness import RedisServer, WorkerTree, new_orchestrator
from tests.hosts.netns import Host, Network, redis_on, tree_on, unavailable_reason

WORKER = "marie"  # the one worker role both worker hosts run
LEASE = "3"  # seconds (ACTIVATION_LEASE): a case waits about one; a loaded machine must not lose one by accident


@dataclasses.dataclass(frozen=True)
class Hosts:
    network: Network
    redis: Host
    orchestrator: Host
    workers: tuple[Host, Host]


@pytest.fixture
def hosts() -> Iterator[Hosts]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    network = Network().create()
    try:
        made = Hosts(
            network,
            network.add_host("redis"),
            network.add_host("orchestrator"),
            (network.add_host("worker-a"), network.add_host("worker-b")),
        )
        yield made
    finally:
        network.remove()
    assert not network.leftovers(), f"namespaces or links left behind: {network.leftovers()}"


@pytest.fixture
def make_redis(hosts: Hosts, tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start a redis-server in the Redis host, on a port free there; each is killed after the test."""
    servers: list[RedisServer] = []

    def make(
        *, appendonly: bool = True, maxmemory_policy: str = "noeviction", password: str | None = None
    ) -> RedisServer:
        server = redis_on(
            hosts.redis,
            tmp_path / f"redis-{len(servers)}",
            appendonly=appendonly,
            maxmemory_policy=maxmemory_policy,
            password=password,
        )
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def redis_host(make_redis: Callable[..., RedisServer]) -> RedisServer:
    """The Redis host's server with the settings the streams transport needs (AOF, noeviction)."""
    return make_redis()


@pytest.fixture
def client(redis_host: RedisServer) -> Iterator[redis.Redis]:
    """A client of the Redis host's server, from the probe: to look at what the transport left there."""
    connection = redis.Redis.from_url(redis_host.url, socket_timeout=5, decode_responses=True)
    yield connection
    connection.close()


def streams_env(server: RedisServer, **env: str) -> dict[str, str]:
    """The environment of a tree in streams mode on ``server``, with the hosts' short LEASE."""
    return {"REDIS_URL": server.url, "ACTIVATION_TRANSPORT": "streams", "ACTIVATION_LEASE": LEASE, **env}


@pytest.fixture
def make_worker(hosts: Hosts, tmp_path: Path) -> Iterator[Callable[..., WorkerTree]]:
    """Build (and start) a worker tree of WORKER inside a worker host, on that host's own spool."""
    trees: list[WorkerTree] = []

    def make(host: Host, *, start: bool = True, agent: str | None = None, **env: str) -> WorkerTree:
        tree = tree_on(host, tmp_path / host.name, WORKER, agent=agent, **env)
        trees.append(tree)
        return tree.start() if start else tree

    yield make
    for tree in trees:
        tree.kill_everything()


@pytest.fixture
def make_orchestrator(hosts: Hosts, tmp_path: Path) -> Iterator[Callable[..., WorkerTree]]:
    """Build (and start) the orchestrator's tree inside the orchestrator host, its API on that host."""
    trees: list[WorkerTree] = []

    def make(*, start: bool = True, **env: str) -> WorkerTree:
        host = hosts.orchestrator
        env.setdefault("ACTIVATION_ADMIN_BIND", f"{host.address}:{host.free_port()}")
        env.setdefault("ACTIVATION_ADMIN_TOKEN", secrets.token_hex(16))  # required off loopback
        tree = new_orchestrator(tmp_path / host.name, **env)
        tree.prefix = host.argv([])
        trees.append(tree)
        return tree.start() if start else tree

    yield make
    for tree in trees:
        tree.kill_everything()
