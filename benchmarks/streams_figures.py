"""Pure arithmetic of probe 7 (the streams transport): what a reclaim after a SIGKILL took against the
lease it had to wait out, how throughput scales with replicas, and what Redis holds per result.

No process, no clock: the unit tests check these exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from benchmarks.stats import ratio

RECLAIM_SLACK_S = 1.0  # target: a reclaim takes about the lease plus at most this


def reclaim(lease_s: float, idle_ms_at_kill: float, killed_at: float, started_at: float) -> dict[str, Any]:
    """One reclaim: from the SIGKILL of the holder to the other replica's agent started.

    The holder renewed its lease ``idle_ms_at_kill`` before it died (the entry's idle time on
    Redis's clock, read just before the kill), so the lease expired ``lease_s - idle`` after the
    kill; what the reclaim took past that expiry is the transport's own delay. The target bounds
    the whole wait by the lease plus RECLAIM_SLACK_S.
    """
    kill_to_start = started_at - killed_at
    expiry_after_kill = max(0.0, lease_s - idle_ms_at_kill / 1000)
    bound = lease_s + RECLAIM_SLACK_S
    return {
        "lease_s": lease_s,
        "idle_at_kill_s": idle_ms_at_kill / 1000,
        "kill_to_start_s": kill_to_start,
        "expiry_after_kill_s": expiry_after_kill,
        "past_expiry_s": kill_to_start - expiry_after_kill,
        "bound_s": bound,
        "within": kill_to_start <= bound,
    }


def scaling(throughput: Mapping[str, Mapping[str, Any]]) -> dict[str, float | None]:
    """Each replica count's tasks/s as a multiple of one replica's (keys are replica counts as text)."""
    one = throughput.get("1", {}).get("tasks_per_s")
    return {n: ratio(b.get("tasks_per_s"), one) for n, b in throughput.items()}


def memory(before_bytes: int, after_bytes: int, results: int) -> dict[str, Any]:
    """Redis's used_memory before and after the throughput runs, and the growth per result kept."""
    grown = after_bytes - before_bytes
    return {
        "before_bytes": before_bytes,
        "after_bytes": after_bytes,
        "grown_bytes": grown,
        "results": results,
        "per_result_bytes": grown / results if results > 0 else None,
    }
