"""What a result means in words, for ``show`` and ``dispatch --wait``: how activation stopped the
agent's tree (a timeout, a cancel), and whether the output was cut."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from activation.spool.records import ResultRecord


def _seconds(value: Any) -> str:
    return f"{value:g} s" if isinstance(value, int | float) and not isinstance(value, bool) else "? s"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def how_killed(kill: Any) -> str:
    """``SIGINT, then SIGKILL after the 5 s grace``, from a result's ``kill`` record."""
    if not isinstance(kill, dict):
        return ""
    found = kill.get("signals")
    signals: list[Any] = found if isinstance(found, list) else []
    grace = _seconds(kill.get("kill_grace_s"))
    if "SIGKILL" in signals and "SIGINT" in signals:
        return f"SIGINT, then SIGKILL after the {grace} grace"
    if "SIGKILL" in signals:
        return "SIGKILL"
    if "SIGINT" in signals:
        return f"SIGINT; the tree was gone within the {grace} grace"
    return "the agent had already exited"


def outcome_notes(result: ResultRecord) -> list[str]:
    notes = []
    status, kill = result.get("status"), result.get("kill")
    if status == "timeout":
        timeout = kill.get("timeout_s") if isinstance(kill, dict) else result.get("duration_s")
        how = how_killed(kill)
        notes.append(f"timed out after {_seconds(timeout)}" + (f": {how}" if how else ""))
    elif status == "cancelled":
        record = result.get("cancelled")
        cancelled: dict[str, Any] = record if isinstance(record, dict) else {}
        was = cancelled.get("while", "pending")
        who = f" by {cancelled['by']}" if cancelled.get("by") else ""
        when = f" at {cancelled['at']}" if cancelled.get("at") else ""
        how = how_killed(kill) if was == "running" else "it never ran"
        notes.append(f"cancelled while {was}{who}{when}" + (f": {how}" if how else ""))
    if result.get("truncated"):
        limit = result.get("output_limit")
        cut = []
        for stream in ("stdout", "stderr"):
            total = result.get(f"{stream}_bytes")
            kept = len(str(result.get(stream) or "").encode("utf-8", "surrogateescape"))
            if isinstance(limit, int) and isinstance(total, int) and total > limit:
                cut.append(f"{stream} {_size(total)}, kept the first {_size(limit)}")
            elif isinstance(total, int) and total > kept:
                cut.append(f"{stream} {_size(total)}, kept {_size(kept)}")
        detail = "; ".join(cut) if cut else "output past the limit"
        notes.append(f"output truncated: {detail} (`activation logs {result.get('task_id')}` has more)")
    return notes
