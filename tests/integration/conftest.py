"""Real worker trees: supervisord running the repo's own supervisor_conf/worker.conf; the
orchestrator program under its own supervisord; a decoded client of the test's redis-server."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from activation.orchestrator.endpoint import read_endpoint
from tests.conftest import wait_for
from tests.harness import PROGRAMS, RedisServer, WorkerTree, new_orchestrator, new_tree

__all__ = ["PROGRAMS", "WorkerTree", "api"]


@pytest.fixture
def make_tree(tmp_path: Path) -> Iterator[Callable[..., WorkerTree]]:
    """Build (and start) worker trees; every one is torn down, with all its descendants."""
    trees: list[WorkerTree] = []

    def make(worker: str = "w1", *, start: bool = True, agent: str | None = None, **env: str) -> WorkerTree:
        tree = new_tree(tmp_path, worker, agent=agent, **env)
        trees.append(tree)
        return tree.start() if start else tree

    yield make
    for tree in trees:
        tree.kill_everything()


@pytest.fixture
def start_orchestrator(tmp_path: Path) -> Iterator[Callable[..., WorkerTree]]:
    """Start the orchestrator program (environment as keywords) on a spool with inboxes for
    ``workers``, and wait until it publishes its API in the spool; every one is killed after."""
    trees: list[WorkerTree] = []

    def start(*workers: str, **env: str) -> WorkerTree:
        tree = new_orchestrator(tmp_path, **env)
        tree.spool.init(list(workers))
        trees.append(tree)
        tree.start()
        wait_for(lambda: read_endpoint(tree.spool), 20, 0.1, "the orchestrator to publish its API in the spool")
        return tree

    yield start
    for tree in trees:
        tree.kill_everything()


def api(tree: WorkerTree) -> str:
    """The admin API's URL, as the orchestrator published it in its spool."""
    url = read_endpoint(tree.spool)
    assert url is not None
    return url


@pytest.fixture
def client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client of the test's redis-server that decodes replies: to look at what a transport keeps there."""
    connection = redis.Redis.from_url(redis_server.url, decode_responses=True)
    yield connection
    connection.close()
