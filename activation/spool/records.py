"""The spool's on-disk records, one typed definition each: task, result, dead letter, heartbeat.

These are contracts between programs (and with users who read the files): every writer builds
one of these, every reader reads one. They are TypedDicts, so the JSON stays plain and unknown
fields (a task's own, a newer writer's) pass through untouched. A reader of a file another
process wrote still checks what it uses: these types say what a writer promises, not what a
hostile file holds.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, Required, TypedDict

ResultStatus = Literal["completed", "failed", "timeout", "cancelled"]


class TaskRecord(TypedDict, total=False):
    """``tasks/<worker>/<task_id>.json``: what a dispatcher writes (unknown fields are kept)."""

    task_id: Required[str]
    description: Required[str]
    timeout: float
    created_at: str
    attempts: int  # runs started so far; set by the executor's recovery
    metadata: dict[str, Any]
    history: list[dict[str, Any]]  # earlier deaths, kept by `dlq retry`


class Resources(TypedDict):
    cpu_seconds: float
    rss_peak_bytes: int


class ResultRecord(TypedDict):
    """``results/<worker>/<task_id>.json``: exactly one per task, written by the executor."""

    task_id: str
    worker: str
    status: ResultStatus
    exit_code: int
    signal: str | None
    attempts: int
    description: str
    created_at: str | None
    started_at: str
    finished_at: str
    duration_s: float
    activation_latency_ms: float
    source: str  # the wake source that queued it
    stdout: str
    stderr: str
    stdout_bytes: int
    stderr_bytes: int
    truncated: bool
    resources: Resources
    agent: dict[str, Any] | None  # Claude Code's JSON envelope, when the agent printed one
    metadata: dict[str, Any]
    # How the tree was stopped when activation stopped it (timeout or cancel), for `show`:
    # {"reason": "timeout"|"cancelled", "timeout_s", "kill_grace_s", "signals": ["SIGINT", "SIGKILL"]}
    kill: NotRequired[KillRecord]
    cancelled: NotRequired[dict[str, Any]]  # {"at", "by", "while": "pending"|"running"}
    output_limit: NotRequired[int]  # when truncated: bytes of each stream the result keeps


class KillRecord(TypedDict):
    reason: str
    timeout_s: float
    kill_grace_s: float
    signals: list[str]


class DeadLetterRecord(TypedDict):
    """``tasks/.dead_letter/<key>.json``: a task given up on, with the reason."""

    task_id: str | None  # None when the file's name was no valid task id
    worker: str | None
    reason: str  # a machine-readable reason: invalid_json, max_attempts, orphaned, ...
    detail: str
    dead_at: str
    source: str  # the path it came from
    task: NotRequired[dict[str, Any]]  # the parsed task, when it parsed as a JSON object
    raw: NotRequired[str]  # otherwise: where the original file was moved


class HeartbeatRecord(TypedDict, total=False):
    """``heartbeats/<worker>.json``: the worker's last sign of life, written by its heartbeat."""

    worker: Required[str]
    state: Required[str]  # running | restarting | stopped
    host: str
    pid: int
    timestamp: str  # UTC, ISO 8601: for people; no decision compares it with another clock
    epoch: float
    interval_s: float
    started_at: str
    current_task: str | None
    queue_size: int
    counts: dict[str, int]
    programs: dict[str, str] | None  # supervisord's state of each program
    listener: dict[str, Any] | None
    wake_sources: list[str]
    executor: dict[str, Any] | None  # the executor's liveness and condition, while running
    metrics: dict[str, Any]
    redis: str | None  # up | down, None without Redis
    version: str
