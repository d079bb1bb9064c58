"""Hosts as real Linux network namespaces, joined by veth pairs to a bridge in a switch namespace.

The bridge lives in a namespace of its own, so the machine's firewall and routes never see the
hosts' traffic; one more veth (the probe) puts the test process itself on the hosts' subnet, so
a test can talk to a Redis host as any host would. Every name carries the run's prefix with the
owning pid, so a later run can tell the leftovers of a killed run from a live one's and remove
them (`sweep_leftovers`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import psutil

from tests.harness import RedisServer, WorkerTree, new_tree

NAMESPACE_FOLDER = Path("/run/netns")
# Namespaces: actnet-<pid>-<tag>-<host>. Root links (the probe): an<pid hex>g<tag>, since a link
# name has at most 15 bytes. <tag> is 4 hex digits per Network, so one run may hold several.
NAMESPACE_PREFIX = "actnet-"
NAMESPACE_PATTERN = re.compile(r"^actnet-(\d+)-([0-9a-f]{4})-")
LINK_PATTERN = re.compile(r"^an([0-9a-f]+)g([0-9a-f]{4})$")
SWITCH = "switch"
HOST_LINK = "eth0"  # the name of each host's end of its veth, inside the host
# Candidate subnets, 10.200.0.0/24 to 10.249.255.0/24; one not routed on this machine is taken.
SUBNET_SECOND_OCTETS = range(200, 250)
COMMAND_TIMEOUT = 30.0


class NetnsError(RuntimeError):
    """An `ip` command failed; the message says which and why, in one line."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGS`; NetnsError with its stderr when ``check`` and it fails."""
    done = subprocess.run(
        ["ip", *args], capture_output=True, text=True, timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL
    )
    if check and done.returncode != 0:
        raise NetnsError(f"ip {' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done


@cache
def unavailable_reason() -> str | None:
    """Why network namespaces cannot be made here, or None when they can (tried once per process)."""
    if shutil.which("ip") is None:
        return "the host tests need iproute2's `ip` (make test installs it)"
    if os.geteuid() != 0:
        return "the host tests need root to create network namespaces (`ip netns add`)"
    name = f"{NAMESPACE_PREFIX}{os.getpid()}-0000-probe"
    made = ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` is not permitted here: {made.stderr.strip() or f'exit {made.returncode}'}"
    ip("netns", "delete", name, check=False)
    return None


def namespaces() -> list[str]:
    """The names of every named network namespace on the machine."""
    out = ip("-json", "netns", "list").stdout.strip()
    return [entry["name"] for entry in json.loads(out or "[]")]


def root_links() -> list[str]:
    """The names of the links in the root namespace (the test process's)."""
    return [entry["ifname"] for entry in json.loads(ip("-json", "link", "show").stdout or "[]")]


def namespace_pids(namespace: str) -> list[int]:
    return [int(pid) for pid in ip("netns", "pids", namespace, check=False).stdout.split()]


def _owner_alive(pid: int) -> bool:
    return pid == os.getpid() or psutil.pid_exists(pid)


def sweep_leftovers() -> list[str]:
    """Remove the namespaces and root links of runs whose process is gone (a killed pytest).

    Processes still inside such a namespace (a redis-server or supervisord tree the dead run
    started) are SIGKILLed first: deleting a namespace's name does not end what runs in it.
    Returns what was removed.
    """
    removed = []
    for name in namespaces():
        match = NAMESPACE_PATTERN.match(name)
        if match and not _owner_alive(int(match.group(1))):
            _kill_inside(name)
            ip("netns", "delete", name, check=False)
            removed.append(name)
    for link in root_links():
        match = LINK_PATTERN.match(link)
        if match and not _owner_alive(int(match.group(1), 16)):
            ip("link", "delete", link, check=False)
            removed.append(link)
    return removed


def _kill_inside(namespace: str) -> None:
    for pid in namespace_pids(namespace):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(psutil.Error):
        psutil.wait_procs([p for p in map(_process, namespace_pids(namespace)) if p], timeout=5)


def _process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _routed_networks() -> list[ipaddress.IPv4Network]:
    networks = []
    for entry in json.loads(ip("-json", "-4", "route", "show", "table", "all").stdout or "[]"):
        dst = entry.get("dst", "")
        if dst and dst != "default" and not dst.startswith(("127.", "broadcast", "local")):
            with contextlib.suppress(ValueError):
                networks.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return [n for n in networks if isinstance(n, ipaddress.IPv4Network)]


def _free_subnet() -> ipaddress.IPv4Network:
    taken = _routed_networks()
    candidates = [
        ipaddress.IPv4Network(f"10.{second}.{third}.0/24") for second in SUBNET_SECOND_OCTETS for third in range(256)
    ]
    random.shuffle(candidates)
    for subnet in candidates:
        if not any(subnet.overlaps(other) for other in taken):
            return subnet
    raise NetnsError("no free /24 in 10.200.0.0-10.249.255.0 for the test hosts")


class Host:
    """One host: a network namespace with loopback up and one address on the network's subnet."""

    def __init__(self, network: Network, name: str, address: str) -> None:
        self.network = network
        self.name = name
        self.namespace = f"{network.prefix}{name}"
        self.switch_port = name  # its veth's other end, on the bridge in the switch namespace
        self.address = address

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.address}, namespace {self.namespace!r})"

    def argv(self, command: Sequence[str]) -> list[str]:
        """``command`` run inside this host: its network namespace, and a UTS namespace whose
        hostname is the host's name (so heartbeats and consumer names tell the hosts apart).

        Each step execs the next, so the pid of a Popen of this argv is the command's own.
        """
        return [
            "ip", "netns", "exec", self.namespace,
            "unshare", "--uts", "--",
            "sh", "-c", 'hostname "$0" && exec "$@"', self.name,
            *command,
        ]  # fmt: skip

    def popen(self, command: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start ``command`` inside this host; keyword arguments go to Popen."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.Popen(self.argv(command), **kwargs)

    def run(
        self, command: Sequence[str], timeout: float = COMMAND_TIMEOUT, **kwargs: Any
    ) -> subprocess.CompletedProcess[str]:
        """Run ``command`` inside this host to its end, capturing its output as text."""
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        return subprocess.run(self.argv(command), capture_output=True, text=True, timeout=timeout, **kwargs)

    def python(self, code: str, *args: str, timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """Run a snippet of Python (this interpreter, so the project's packages) inside this host."""
        return self.run([sys.executable, "-c", code, *args], timeout=timeout)

    def free_port(self) -> int:
        """A TCP port nobody listens on inside this host."""
        code = "import socket; s = socket.socket(); s.bind(('', 0)); print(s.getsockname()[1])"
        done = self.python(code)
        if done.returncode != 0:
            raise NetnsError(f"no free port in {self.namespace}: {done.stderr.strip()}")
        return int(done.stdout)

    def holds(self, pid: int) -> bool:
        """Whether process ``pid`` runs in this host's network namespace."""
        try:
            return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(NAMESPACE_FOLDER / self.namespace).st_ino
        except OSError:
            return False

    # -- the cable ------------------------------------------------------------------------------

    def cut(self) -> None:
        """Unplug this host's cable at the switch: its packets vanish, nothing is refused.

        The host keeps its address and its sockets stay open, as on a real partition, so peers
        see timeouts rather than resets; `restore` plugs the cable back in.
        """
        ip("-n", self.network.switch, "link", "set", self.switch_port, "down")

    def restore(self) -> None:
        ip("-n", self.network.switch, "link", "set", self.switch_port, "up")

    def is_cut(self) -> bool:
        out = ip("-n", self.network.switch, "-json", "link", "show", self.switch_port).stdout
        return "UP" not in json.loads(out)[0].get("flags", [])


class Network:
    """A private /24 with a bridge in a switch namespace, hosts on it, and the test process as a probe.

    ``create()`` first sweeps the leftovers of killed runs; ``remove()`` ends whatever still runs
    inside the hosts and deletes every namespace and link it made.
    """

    def __init__(self) -> None:
        self.tag = f"{random.randrange(0x10000):04x}"
        self.prefix = f"{NAMESPACE_PREFIX}{os.getpid()}-{self.tag}-"
        self.switch = f"{self.prefix}{SWITCH}"
        self.probe_link = f"an{os.getpid():x}g{self.tag}"
        self.subnet: ipaddress.IPv4Network | None = None
        self.probe_address = ""
        self.hosts: dict[str, Host] = {}
        self._addresses: list[str] = []

    def create(self) -> Network:
        sweep_leftovers()
        self.subnet = _free_subnet()
        addresses = [str(a) for a in self.subnet.hosts()]
        self.probe_address, self._addresses = addresses[0], addresses[9:]  # hosts from .10
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        # The probe: the test process's own port on the switch.
        ip("link", "add", self.probe_link, "type", "veth", "peer", "name", "probe", "netns", self.switch)
        self._plug(self.switch, "probe")
        ip("addr", "add", f"{self.probe_address}/{self.subnet.prefixlen}", "dev", self.probe_link)
        ip("link", "set", self.probe_link, "up")
        return self

    def add_host(self, name: str) -> Host:
        """A new host on the bridge, with the next address of the subnet; ``name`` as its hostname."""
        if self.subnet is None:
            raise NetnsError("create() the network before adding hosts")
        if name in self.hosts or name == SWITCH or not re.fullmatch(r"[a-z][a-z0-9-]{0,14}", name):
            raise NetnsError(f"host name {name!r}: expected a new lowercase name of at most 15 characters")
        host = Host(self, name, self._addresses[len(self.hosts)])
        self.hosts[name] = host
        ip("netns", "add", host.namespace)
        ip("-n", host.namespace, "link", "set", "lo", "up")
        # Both ends are made where they belong: nothing of a host ever appears in the root namespace.
        peer = ["peer", "name", host.switch_port, "netns", self.switch]
        ip("link", "add", HOST_LINK, "netns", host.namespace, "type", "veth", *peer)
        self._plug(self.switch, host.switch_port)
        ip("-n", host.namespace, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", HOST_LINK)
        ip("-n", host.namespace, "link", "set", HOST_LINK, "up")
        return host

    def _plug(self, switch: str, port: str) -> None:
        ip("-n", switch, "link", "set", port, "master", "br0")
        ip("-n", switch, "link", "set", port, "up")

    def remove(self) -> None:
        """End every process left inside the hosts, then delete every namespace and link made."""
        for host in self.hosts.values():
            _kill_inside(host.namespace)
            ip("netns", "delete", host.namespace, check=False)
        ip("link", "delete", self.probe_link, check=False)
        ip("netns", "delete", self.switch, check=False)

    def leftovers(self) -> list[str]:
        """The namespaces and root links of this network that still exist (none after remove())."""
        mine = [name for name in namespaces() if name.startswith(self.prefix)]
        return mine + [link for link in root_links() if link == self.probe_link]


# -- what runs on a host: plain helpers, for the host tests' fixtures and for the bench -------------


def redis_on(
    host: Host,
    folder: Path,
    *,
    appendonly: bool = True,
    maxmemory_policy: str = "noeviction",
    password: str | None = None,
) -> RedisServer:
    """A redis-server (not started yet) inside ``host``, on its address and a port free there."""
    return RedisServer(
        folder,
        password,
        bind=host.address,
        port=host.free_port(),
        prefix=host.argv([]),
        appendonly=appendonly,
        maxmemory_policy=maxmemory_policy,
    )


def tree_on(host: Host, root: Path, worker: str, *, agent: str | None = None, **env: str) -> WorkerTree:
    """A worker tree (not started yet) of ``worker`` inside ``host``, on its own spool under ``root``."""
    tree = new_tree(root, worker, agent=agent, **env)
    tree.prefix = host.argv([])
    return tree
