"""Probe 7: the Redis Streams transport (XADD to agent start across network namespaces; throughput
with 1, 2 and 4 replicas). Not wired yet: another engineer is building it (issue 12).
"""

from __future__ import annotations

from typing import Any

PENDING = "pending: streams transport not wired"


def streams() -> dict[str, Any]:
    return {"status": PENDING}
