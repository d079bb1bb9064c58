"""The spool's on-disk records, one typed definition each: task, result, dead letter, heartbeat
(and a heartbeat as a streams replica publishes it in Redis).

These are contracts between programs (and with users who read the files): every writer builds
one of these, every reader reads one. They are TypedDicts, so the JSON stays plain and unknown
fields (a task's own, a newer writer's) pass through untouched. A reader of a file another
process wrote still checks what it uses: these types say what a writer promises, not what a
hostile file holds.
"""

from __future__ import annotations

from typing import Any, Literal, Required, TypedDict

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


class ResultRecord(TypedDict, total=False):
    """``results/<worker>/<task_id>.json``: exactly one per task, written by the executor.

    The executor writes every field; a cancel of a task that never ran writes fewer (no
    ``signal``, ``resources``, ...) and nulls where nothing ran. A reader (spool/readers.py)
    is promised only ``task_id`` and ``status``, and the type of any other field that is there.
    """

    task_id: Required[str]
    worker: str
    status: Required[ResultStatus]
    exit_code: int | None  # None: no agent ran (cancelled while pending)
    signal: str | None
    attempts: int
    description: str | None
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_s: float | None
    activation_latency_ms: float | None
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
    kill: KillRecord
    cancelled: dict[str, Any]  # {"at", "by", "while": "pending"|"running"}
    output_limit: int  # when truncated: bytes of each stream the result keeps


class KillRecord(TypedDict, total=False):
    reason: str
    timeout_s: float | None
    kill_grace_s: float | None
    signals: list[str]


class DeadLetterRecord(TypedDict, total=False):
    """``tasks/.dead_letter/<key>.json``: a task given up on, with the reason.

    Its writer (Spool.dead_letter) sets every field but ``task``/``raw`` (one of the two); a
    reader is promised only ``reason``, and the type of any other field that is there.
    """

    task_id: str | None  # None when the file's name was no valid task id
    worker: str | None
    reason: Required[str]  # a machine-readable reason: invalid_json, max_attempts, orphaned, ...
    detail: str | None
    dead_at: str | None
    source: str | None  # the path it came from
    task: dict[str, Any]  # the parsed task, when it parsed as a JSON object
    raw: str  # otherwise: where the original file was moved


class BeatFields(TypedDict, total=False):
    """What a heartbeat says of its worker: the file's (HeartbeatRecord) and a replica's copy in
    Redis (ReplicaState) alike."""

    state: str  # running | restarting | stopped
    host: str
    pid: int | None
    timestamp: str | None  # UTC, ISO 8601: for people; no decision compares it with another clock
    epoch: float | None
    interval_s: float | None
    started_at: str | None
    current_task: str | None
    queue_size: int | None
    counts: dict[str, int]
    programs: dict[str, str] | None  # supervisord's state of each program
    listener: dict[str, Any] | None
    wake_sources: list[str]
    executor: dict[str, Any] | None  # the executor's liveness and condition, while running
    metrics: dict[str, Any] | None
    redis: str | None  # up | down, None without Redis
    version: str | None


class HeartbeatRecord(BeatFields, total=False):
    """``heartbeats/<worker>.json``: the worker's last sign of life, written by its heartbeat.

    The heartbeat writes every field; a reader is promised only ``worker``, and the type of any
    other field that is there.
    """

    worker: Required[str]


class ReplicaState(BeatFields, total=False):
    """A streams replica's heartbeat in Redis (worker/replica_beat.py): its heartbeat record plus
    its consumer name. Nothing is required: a key any Redis client can write is read as a hint
    (which task, how long a queue), never trusted; ``problem`` is the reader's, when it was unreadable.
    """

    worker: str
    replica: str  # its consumer name
    problem: str  # set by the reader (never by a replica): why the state it published was unreadable
