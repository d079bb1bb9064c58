"""Pure helpers of the bench: percentiles, summaries, ratios and how they are printed.

No process, no clock: the unit tests check these exactly.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0..100")
    ordered = sorted(values)
    position = q / 100 * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summary(values: Sequence[float]) -> dict[str, float]:
    """n, p50, p95, p99, max and mean of some samples (milliseconds, by the bench's convention)."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "p99": percentile(values, 99),
        "max": max(values),
        "mean": statistics.fmean(values),
    }


def ratio(value: float | None, floor: float | None) -> float | None:
    """value / floor, or None when either is missing or the floor is not positive."""
    if value is None or floor is None or floor <= 0 or math.isnan(value) or math.isnan(floor):
        return None
    return value / floor


def times(value: float | None, floor: float | None) -> str:
    """A ratio as printed: ``8.52x``, ``0.43x``, ``142x``; ``n/a`` when there is none."""
    r = ratio(value, floor)
    if r is None:
        return "n/a"
    if r >= 100:
        return f"{r:.0f}x"
    if r >= 10:
        return f"{r:.1f}x"
    return f"{r:.2f}x"


def ms(value: float | None) -> str:
    """Milliseconds with three significant-ish digits: ``0.021 ms``, ``1.68 ms``, ``254 ms``."""
    if value is None:
        return "n/a"
    if value >= 100:
        return f"{value:.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    if value >= 1:
        return f"{value:.2f} ms"
    return f"{value:.3f} ms"


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("met" if ok else "NOT met")
