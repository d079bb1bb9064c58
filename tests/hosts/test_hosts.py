"""The host harness itself: namespaces that talk, a cable that can be cut, real trees inside hosts.

These need no streams wiring; the cross-host cases of issue 12 stand on what they prove.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request

import psutil
import pytest
import redis

from activation.spool.atomic import read_json
from activation.transport import pubsub as events
from tests.conftest import wait_for
from tests.harness import ROOT, RedisServer, WorkerTree
from tests.hosts.conftest import WORKER, Hosts
from tests.hosts.netns import Host, Network, namespace_pids, namespaces, root_links, sweep_leftovers
from tests.integration.test_redis_events import wait_subscribed

# A redis-py client with a short timeout, run inside a host: prints PONG, or the error's class.
PING = """
import sys, redis
client = redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1, socket_timeout=1)
try:
    client.ping()
except redis.RedisError as exc:
    print(type(exc).__name__)
    sys.exit(1)
print("PONG")
"""
PUBLISH = """
import sys, redis
print(redis.Redis.from_url(sys.argv[1], socket_connect_timeout=2, socket_timeout=2).publish(sys.argv[2], sys.argv[3]))
"""


def ping_from(host: Host, server: RedisServer) -> str:
    """PONG, or the class of the error a client inside ``host`` got."""
    return host.python(PING, server.url).stdout.strip()


def test_redis_in_its_host_answers_every_other_host(hosts: Hosts, redis_host: RedisServer):
    assert redis_host.process is not None and hosts.redis.holds(redis_host.process.pid)
    for host in (hosts.orchestrator, *hosts.workers):
        assert ping_from(host, redis_host) == "PONG", host
    # ...and only on the subnet: inside the worker host, loopback has no Redis
    local = RedisServer(redis_host.folder, port=redis_host.port)
    assert hosts.workers[0].python(PING, local.url).stdout.strip() == "ConnectionError"


def test_a_cut_cable_makes_redis_unreachable_from_that_host_only_until_it_is_restored(
    hosts: Hosts, redis_host: RedisServer
):
    cut, other = hosts.workers
    assert ping_from(cut, redis_host) == "PONG"
    cut.cut()
    assert cut.is_cut()
    assert ping_from(cut, redis_host) in ("TimeoutError", "ConnectionError")
    assert ping_from(other, redis_host) == "PONG"
    assert ping_from(hosts.orchestrator, redis_host) == "PONG"
    cut.restore()
    assert not cut.is_cut()
    wait_for(lambda: ping_from(cut, redis_host) == "PONG", 30, 0.2, "the restored host to reach Redis again")


def test_redis_restarts_with_its_data_and_without_it(redis_host: RedisServer):
    client = redis.Redis.from_url(redis_host.url, socket_timeout=5, decode_responses=True)
    try:
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.xadd("{activation:marie}:tasks", {"task_id": "kept"})
        redis_host.restart()  # SIGKILL, then the AOF brings it back
        assert client.xlen("{activation:marie}:tasks") == 1
        redis_host.restart(lose_data=True)
        assert client.exists("{activation:marie}:tasks") == 0
    finally:
        client.close()


def test_redis_in_its_host_without_persistence(make_redis):
    server: RedisServer = make_redis(appendonly=False, maxmemory_policy="allkeys-lru")
    client = redis.Redis.from_url(server.url, socket_timeout=5, decode_responses=True)
    try:
        assert client.config_get("appendonly") == {"appendonly": "no"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "allkeys-lru"}
        client.set("gone", "1")
        server.restart()
        assert client.exists("gone") == 0
    finally:
        client.close()


def heartbeat(tree: WorkerTree) -> dict:
    try:
        data = read_json(tree.spool.heartbeat_path(tree.worker))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def test_two_worker_hosts_run_trees_of_one_worker_on_their_own_spools(hosts: Hosts, make_worker):
    trees: list[WorkerTree] = [make_worker(host) for host in hosts.workers]
    for host, tree in zip(hosts.workers, trees, strict=True):
        assert tree.process is not None and host.holds(tree.process.pid)
        assert host.holds(tree.pid("executor")) and host.holds(tree.pid("listener"))
        assert tree.worker == WORKER
        tree.write_task(f"on-{host.name}", f"hello from {host.name}")
    for host, tree in zip(hosts.workers, trees, strict=True):
        result = tree.wait_result(f"on-{host.name}")
        assert result["status"] == "completed", result
        assert result["stdout"].strip() == f"done: hello from {host.name}"
        assert tree.result_ids() == [f"on-{host.name}"]  # its own spool: the other host's task is not here
        beat = wait_for(lambda t=tree, h=host.name: heartbeat(t).get("host") == h and heartbeat(t), 20)
        assert beat["worker"] == WORKER


def test_one_program_stops_and_continues_and_the_tree_still_works(hosts: Hosts, make_worker):
    tree: WorkerTree = make_worker(hosts.workers[0])
    pid = tree.pause("executor")
    wait_for(lambda: psutil.Process(pid).status() == psutil.STATUS_STOPPED, 10)
    tree.resume(pid)
    wait_for(lambda: psutil.Process(pid).status() != psutil.STATUS_STOPPED, 10)
    tree.write_task("after-stop", "x")
    assert tree.wait_result("after-stop")["status"] == "completed"
    assert tree.pid("executor") == pid
    assert "after-stop" in tree.log_text()


def test_a_publish_from_the_orchestrator_host_wakes_a_worker_tree_in_redis_mode(
    hosts: Hosts, redis_host: RedisServer, make_worker
):
    # Polling and the periodic rescan at 30 s: only the event explains a result with source redis.
    tree: WorkerTree = make_worker(
        hosts.workers[0],
        REDIS_URL=redis_host.url,
        ACTIVATION_MODE="poll,redis",
        ACTIVATION_POLL_INTERVAL="30",
        ACTIVATION_RESCAN_INTERVAL="30",
    )
    wait_subscribed(tree)
    tree.write_task("woken", "by a publish")
    sent = hosts.orchestrator.python(PUBLISH, redis_host.url, events.activate_channel(WORKER), "woken")
    assert sent.stdout.strip() == "1", sent.stderr  # one subscriber: the tree in worker-a
    result = tree.wait_result("woken", 25)
    assert result["status"] == "completed" and result["source"] == "redis", result


def test_the_orchestrator_runs_in_its_host_and_serves_on_its_address(hosts: Hosts, make_orchestrator):
    tree: WorkerTree = make_orchestrator()
    assert tree.process is not None and hosts.orchestrator.holds(tree.process.pid)
    bind = tree.env["ACTIVATION_ADMIN_BIND"]
    assert bind.startswith(hosts.orchestrator.address + ":")
    request = urllib.request.Request(
        f"http://{bind}/", headers={"Authorization": f"Bearer {tree.env['ACTIVATION_ADMIN_TOKEN']}"}
    )

    def routes() -> dict | None:
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # from the probe
                return dict(json.loads(response.read()))
        except OSError:
            return None

    assert wait_for(routes, 30, 0.2, lambda: f"the admin API on {bind}; log:\n{tree.log_tail()}")


def test_remove_leaves_no_namespace_link_or_process(hosts: Hosts):
    network = Network().create()
    try:
        host = network.add_host("lonely")
        sleeper = host.popen(["sleep", "600"])
        wait_for(lambda: host.holds(sleeper.pid), 10, what="the sleeper inside its host")
        assert network.leftovers()
    finally:
        network.remove()
    # a 600 s sleep that ends at once was killed, not left running in a namespace nobody can name
    # (its status is not asserted: remove() reaps it through psutil, so Popen may only see 0)
    sleeper.wait(10)
    assert network.leftovers() == []
    assert not [name for name in namespaces() if name.startswith(network.prefix)]
    assert network.probe_link not in root_links()


def test_the_sweep_removes_a_killed_runs_leftovers_and_nothing_of_a_live_run(hosts: Hosts):
    gone = subprocess.Popen(["true"])
    gone.wait()
    dead = gone.pid  # a pid whose process has ended: the run it names was killed
    namespace, link = f"actnet-{dead}-beef-redis", f"an{dead:x}gbeef"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    # a probe link whose peer is in the root namespace too (one in the namespace would go with it)
    peer = f"an{dead:x}gdead"
    subprocess.run(["ip", "link", "add", link, "type", "veth", "peer", "name", peer], check=True)
    left_running = subprocess.Popen(["ip", "netns", "exec", namespace, "sleep", "600"])
    wait_for(lambda: left_running.pid in namespace_pids(namespace), 10, what="the leftover process in its namespace")
    try:
        removed = sweep_leftovers()
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], capture_output=True)
        subprocess.run(["ip", "link", "delete", link], capture_output=True)
    assert namespace in removed and link in removed
    left_running.wait(10)  # a 600 s sleep that ends at once was killed (reaped by the sweep: no status)
    assert namespace not in namespaces() and link not in root_links() and peer not in root_links()
    # this run's own network is untouched
    assert all(host.namespace in namespaces() for host in (hosts.redis, hosts.orchestrator, *hosts.workers))
    assert hosts.network.probe_link in root_links()


def test_where_namespaces_cannot_be_made_the_host_tests_skip_with_the_reason():
    # A user namespace mapped to root: root by uid, but without the rights `ip netns add` needs.
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--user", "--map-root-user", "true"]).returncode:
        pytest.skip("unshare --user is not available here, so an unprivileged root cannot be simulated")
    one = "tests/hosts/test_hosts.py::test_redis_in_its_host_answers_every_other_host"
    done = subprocess.run(
        [
            "unshare",
            "--user",
            "--map-root-user",
            sys.executable,
            "-m",
            "pytest",
            one,
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SKIPPED [1]" in done.stdout and "`ip netns add` is not permitted here: " in done.stdout, done.stdout
