"""What a result means in words, for ``show``, ``cancel`` and ``dispatch --wait``: how activation
stopped the agent's tree (a timeout, a cancel), and whether the output was cut. The result comes
from spool.readers.result_record, so each field that is there has its type."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from activation.spool.records import KillRecord, ResultRecord


def _seconds(value: float | None) -> str:
    return "? s" if value is None else f"{value:g} s"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def how_killed(kill: KillRecord | None) -> str:
    """``SIGINT, then SIGKILL after the 5 s grace``, from a result's ``kill`` record."""
    if kill is None:
        return ""
    signals = kill.get("signals", [])
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
        timeout = kill.get("timeout_s") if kill is not None else result.get("duration_s")
        how = how_killed(kill)
        notes.append(f"timed out after {_seconds(timeout)}" + (f": {how}" if how else ""))
    elif status == "cancelled":
        cancelled = result.get("cancelled", {})
        was = cancelled.get("while", "pending")
        who = f" by {cancelled['by']}" if cancelled.get("by") else ""
        when = f" at {cancelled['at']}" if cancelled.get("at") else ""
        how = how_killed(kill) if was == "running" else "it never ran"
        notes.append(f"cancelled while {was}{who}{when}" + (f": {how}" if how else ""))
    if result.get("truncated"):
        limit = result.get("output_limit")
        cut = []
        for total, text, stream in (
            (result.get("stdout_bytes"), result.get("stdout", ""), "stdout"),
            (result.get("stderr_bytes"), result.get("stderr", ""), "stderr"),
        ):
            kept = len(text.encode("utf-8", "surrogateescape"))
            if limit is not None and total is not None and total > limit:
                cut.append(f"{stream} {_size(total)}, kept the first {_size(limit)}")
            elif total is not None and total > kept:
                cut.append(f"{stream} {_size(total)}, kept {_size(kept)}")
        detail = "; ".join(cut) if cut else "output past the limit"
        notes.append(f"output truncated: {detail} (`activation logs {result.get('task_id')}` has more)")
    return notes
