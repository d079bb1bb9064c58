"""The names of everything the streams transport keeps in Redis, and of the consumers.

Every key of one worker role starts with the hash tag ``{activation:<worker>}``, so all of them
live in one Redis Cluster slot and every script can name all its keys in KEYS.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import socket
from pathlib import Path

from activation.config import WORKER_NAME_PATTERN
from activation.errors import ConfigError
from activation.process_start import boot_id, start_ticks

ORCHESTRATOR_GROUP = "orchestrator"  # the group that reads a role's result and dead-letter streams
HANDBACK_CONSUMER = "handback"  # where a drained task waits, already past the lease, for a taker


@dataclasses.dataclass(frozen=True)
class StreamKeys:
    """The keys of one worker role."""

    worker: str

    def __post_init__(self) -> None:
        if not WORKER_NAME_PATTERN.match(self.worker):
            raise ConfigError(f"WORKER_NAME: expected letters, digits, '_' or '-' (max 64), got {self.worker!r}")

    @property
    def tag(self) -> str:
        return "{activation:" + self.worker + "}"

    @property
    def tasks(self) -> str:
        """The task stream. Never trimmed by length: an entry leaves only when completed or dead."""
        return f"{self.tag}:tasks"

    @property
    def results(self) -> str:
        """The result stream, trimmed by age."""
        return f"{self.tag}:results"

    @property
    def dead(self) -> str:
        """The dead-letter stream, trimmed by age."""
        return f"{self.tag}:dead"

    @property
    def group(self) -> str:
        """The task stream's consumer group, named after the worker; every replica joins it."""
        return self.worker

    @property
    def replicas(self) -> str:
        """The index of the role's live replicas: consumer name scored by heartbeat expiry."""
        return f"{self.tag}:replicas"

    def replica(self, consumer: str) -> str:
        """One replica's heartbeat: its state as JSON, with a TTL."""
        return f"{self.tag}:replica:{consumer}"

    @property
    def outbox_marker(self) -> str:
        """Set by the orchestrator once it has sent the role's outbox: gone means Redis lost its data."""
        return f"{self.tag}:outbox"

    def task(self, task_id: str) -> str:
        """One small hash per task id: its state (queued, done, dead), entry, and recorded result."""
        return f"{self.tag}:task:{task_id}"

    def log(self, task_id: str) -> str:
        """A running task's output, shipped by its holder for readers on other hosts (capped, with a TTL)."""
        return f"{self.tag}:log:{task_id}"


# Drawn once per interpreter: two containers given the same host name and started in the same
# clock tick could otherwise share pid and start time. A fork keeps it, but changes the pid.
_NONCE = secrets.token_hex(3)


def consumer_name(*, host: str | None = None, pid: int | None = None) -> str:
    """A consumer name unique to this process start: host (a container's id), boot id, pid, start.

    A replica restarted under the same host name gets a new name, so its predecessor's tokens
    can never match its own.
    """
    host = host or socket.gethostname() or "host"
    pid = pid or os.getpid()
    return f"{host}/{_boot_id()[:8]}/{pid}-{_start_ticks(pid)}-{_NONCE}"


def replica_name(*, host: str | None = None, run_dir: Path | None = None) -> str:
    """The consumer name of this worker tree: one per supervisord process start, shared by its programs.

    listener, executor and heartbeat are children of one supervisord, so its pid and start time
    (their parent's) name the replica for all three; a restarted program keeps the name (its
    tree's tokens stay its own), a new tree start gets a new one (a predecessor's late completion
    is refused). No per-interpreter nonce here: the three programs must agree. Instead the tree's
    id from its run folder (spool/ownership.py) tells apart two same-named containers whose
    supervisord is pid 1 and started in one clock tick.
    """
    host = host or socket.gethostname() or "host"
    parent = os.getppid()
    name = f"{host}/{_boot_id()[:8]}/{parent}-{_start_ticks(parent)}"
    if run_dir is not None:
        from activation.spool.ownership import tree_id

        try:
            tree = tree_id(run_dir)
        except OSError:
            tree = None  # an unwritable run folder: the programs refuse to start anyway
        if tree:
            name += f"-{tree[:6]}"
    return name


def _boot_id() -> str:
    return boot_id().replace("-", "") or "noboot"


def _start_ticks(pid: int) -> str:
    return start_ticks(pid) or "0"
