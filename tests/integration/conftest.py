"""Real worker trees: supervisord running the repo's own supervisor_conf/worker.conf."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import PROGRAMS, WorkerTree, new_tree

__all__ = ["PROGRAMS", "WorkerTree"]


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
