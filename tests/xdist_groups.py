"""The scheduler of `make test`: pytest-xdist's loadgroup, with a group per folder of tests/.

xdist 3.8 forms its groups from ``xdist_group`` marks by appending ``@group`` to each node id, and
pytest 9.2 no longer lets it (pytest-xdist issue 1386): the marks are silently ignored and every
test is scheduled alone. So the groups are named here, from the node id's path, on the
controller. ``_split_scope`` is how xdist's own loadfile and loadgroup schedulers choose their
work units; setup.cfg pins xdist and tests/unit/test_xdist_groups.py fails if that changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
from xdist.scheduler import LoadScopeScheduling


def group_of(nodeid: str, folders: Sequence[str]) -> str | None:
    """The folder of tests/ that ``nodeid`` is in, when it is one of ``folders``."""
    parts = nodeid.split("::", 1)[0].split("/")
    if len(parts) > 2 and parts[0] == "tests" and parts[1] in folders:
        return parts[1]
    return None


class FolderGroups(LoadScopeScheduling):
    """One work unit per folder of ``folders`` (run by one worker, a test at a time); every other test alone."""

    def __init__(self, config: pytest.Config, log: Any, folders: Sequence[str]) -> None:
        super().__init__(config, log)
        self.folders = tuple(folders)

    def _split_scope(self, nodeid: str) -> str:
        return group_of(nodeid, self.folders) or nodeid
