"""What a finished run's result record says: its status, Claude Code's envelope, how activation
stopped the tree. Pure functions of the task and the run (agent.AgentRun); the executor writes
what they build.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from activation.clock import iso_now
from activation.spool import codec
from activation.spool.records import KillRecord, ResultRecord, ResultStatus
from activation.worker.agent import AgentRun

COMPLETED: ResultStatus = "completed"
FAILED: ResultStatus = "failed"
TIMEOUT: ResultStatus = "timeout"
CANCELLED: ResultStatus = "cancelled"


def iso_from(epoch: float) -> str:
    """Epoch seconds as ISO 8601 UTC, the same shape as spool.iso_now()."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC).isoformat(timespec="microseconds")


def parse_envelope(stdout: str) -> dict[str, Any] | None:
    """Claude Code's result envelope: stdout itself (``--output-format json``), or its last line
    when that is a ``result`` event (``--output-format stream-json``, one JSON event per line)."""
    text = stdout.strip()
    envelope = _envelope_of(text)
    if envelope is None and "\n" in text:
        envelope = _envelope_of(text.rpartition("\n")[2].strip())
    return envelope


def _envelope_of(text: str) -> dict[str, Any] | None:
    if not text.startswith("{") or not text.endswith("}"):
        return None
    try:
        # The result carries the envelope: lone surrogates become U+FFFD, as stdout's undecodable
        # bytes do; NaN, huge numbers or absurd nesting make it no envelope at all.
        envelope = codec.loads(text, surrogates="replace")
    except ValueError:
        return None
    if isinstance(envelope, dict) and envelope.get("type") == "result":
        return envelope
    return None


def result_status(run: AgentRun, envelope: dict[str, Any] | None, *, expects_envelope: bool = False) -> ResultStatus:
    if run.timed_out:
        return TIMEOUT
    if run.exit_code != 0 or (envelope is not None and envelope.get("is_error") is True):
        return FAILED  # claude reports errors with rc 1, or rc 0 and is_error in JSON mode
    if expects_envelope and envelope is None and not run.truncated:
        return FAILED
    return COMPLETED


def build_result(
    task: dict[str, Any],
    run: AgentRun,
    *,
    worker: str,
    attempts: int,
    visible_ns: int,
    source: str,
    expects_envelope: bool,
) -> ResultRecord:
    """The result of one run; ``visible_ns``: when the task file became visible (activation latency)."""
    # stdout past the limit: its tail still ends with a stream-json run's envelope
    envelope = (
        parse_envelope(run.stdout_tail) if run.stdout_tail else (None if run.truncated else parse_envelope(run.stdout))
    )
    return {
        "task_id": task["task_id"],
        "worker": worker,
        "status": result_status(run, envelope, expects_envelope=expects_envelope),
        "exit_code": run.exit_code,
        "signal": run.signal,
        "attempts": attempts,
        "description": task["description"],
        "created_at": task.get("created_at"),
        "started_at": iso_from(run.started_at_wall),
        "finished_at": iso_now(),
        "duration_s": round(run.duration_s, 6),
        "activation_latency_ms": round((run.started_at_wall * 1e9 - visible_ns) / 1e6, 3),
        "source": source,
        "stdout": run.stdout,
        "stderr": run.stderr,
        "stdout_bytes": run.stdout_bytes,
        "stderr_bytes": run.stderr_bytes,
        "truncated": run.truncated,
        "resources": {"cpu_seconds": run.cpu_seconds, "rss_peak_bytes": run.rss_peak_bytes},
        "agent": envelope,
        "metadata": task.get("metadata") or {},
    }


def note_kill(
    result: ResultRecord,
    run: AgentRun,
    *,
    timeout: float,
    kill_grace: float,
    output_limit: int,
    cancel: dict[str, Any] | None,
) -> None:
    """Say how activation stopped the tree, if it did (``cancel``: the request that aborted the
    run, if one did); a cancelled run's result is ``cancelled``."""
    if run.truncated:  # so that `show` can say how much was kept
        result["output_limit"] = output_limit
    if run.aborted and cancel is not None:
        result["status"] = CANCELLED
        result["cancelled"] = {"at": cancel.get("at"), "by": cancel.get("by"), "while": "running"}
    elif not run.timed_out:
        return
    kill: KillRecord = {
        "reason": "cancelled" if result["status"] == CANCELLED else "timeout",
        "timeout_s": timeout,
        "kill_grace_s": kill_grace,
        "signals": list(run.signals_sent),
    }
    result["kill"] = kill
