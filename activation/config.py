"""Settings: every knob, read once from the environment into one frozen, validated object.

Nothing else in activation reads ``os.environ`` for configuration. A bad value raises
`ConfigError` with a one-line message that names the variable.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from activation.errors import ConfigError

WAKE_SOURCES = ("inotify", "poll", "redis")
ORCHESTRATOR_MODES = ("files", "events", "auto")
TRANSPORTS = ("files", "streams")
WORKER_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")

# Seconds the executor needs beyond its drain and kill grace to put the task back and exit.
STOP_MARGIN = 5.0

# Variables that are activation's own secrets: never logged, never handed to the agent. Each
# may also come from a file named by <VARIABLE>_FILE (the Docker secrets convention).
SECRET_VARIABLES = ("ACTIVATION_ADMIN_TOKEN", "REDIS_URL", "REDIS_PASSWORD", "ACTIVATION_QUEUE_KEY")
SECRET_FILE_SUFFIX = "_FILE"
MAX_SECRET_FILE = 64 * 1024

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a process needs to know, validated. Field comments name the variable."""

    worker_name: str | None = None  # WORKER_NAME
    spool: Path = Path("var/spool")  # ACTIVATION_SPOOL
    run_dir: Path = Path("var/run")  # ACTIVATION_RUN_DIR (default var/run/<worker>)
    mode: tuple[str, ...] = ("inotify",)  # ACTIVATION_MODE, comma-separated wake sources
    agent_command: str = "claude -p -- {description}"  # ACTIVATION_AGENT_COMMAND
    agent_workdir: Path | None = None  # ACTIVATION_AGENT_WORKDIR: the agent's working folder
    task_timeout: float = 600.0  # ACTIVATION_TASK_TIMEOUT
    max_task_timeout: float = 86400.0  # ACTIVATION_MAX_TASK_TIMEOUT
    kill_grace: float = 5.0  # ACTIVATION_KILL_GRACE
    drain_timeout: float = 45.0  # ACTIVATION_DRAIN_TIMEOUT
    executor_stopwaitsecs: float = 55.0  # ACTIVATION_EXECUTOR_STOPWAITSECS: supervisord's, for the executor
    max_attempts: int = 3  # ACTIVATION_MAX_ATTEMPTS
    poll_interval: float = 1.0  # ACTIVATION_POLL_INTERVAL
    rescan_interval: float = 5.0  # ACTIVATION_RESCAN_INTERVAL
    settle_time: float = 2.0  # ACTIVATION_SETTLE_TIME: how old an unreadable file must be to be bad
    heartbeat_interval: float = 10.0  # ACTIVATION_HEARTBEAT_INTERVAL
    heartbeat_timeout: float = 30.0  # ACTIVATION_HEARTBEAT_TIMEOUT
    output_limit: int = 1024 * 1024  # ACTIVATION_OUTPUT_LIMIT, bytes kept per stream
    metrics_port: int = 9100  # ACTIVATION_METRICS_PORT (0 disables)
    log_format: str = "text"  # ACTIVATION_LOG_FORMAT: text | json
    log_level: str = "INFO"  # ACTIVATION_LOG_LEVEL
    redis_url: str | None = dataclasses.field(default=None, repr=False)  # REDIS_URL (with REDIS_PASSWORD in it)
    redis_password: str | None = dataclasses.field(default=None, repr=False)  # REDIS_PASSWORD
    redis_backoff_max: float = 5.0  # ACTIVATION_REDIS_BACKOFF_MAX
    orchestrator_mode: str = "files"  # ORCHESTRATOR_MODE
    response_time_threshold_ms: float = 500.0  # RESPONSE_TIME_THRESHOLD_MS
    task_rate_threshold: float = 10.0  # TASK_RATE_THRESHOLD, tasks per minute
    queue_size_threshold: int = 5  # QUEUE_SIZE_THRESHOLD
    fallback_to_files: bool = True  # FALLBACK_TO_FILES
    node_env: str | None = None  # NODE_ENV
    admin_bind: str = "127.0.0.1:8000"  # ACTIVATION_ADMIN_BIND
    admin_token: str | None = dataclasses.field(default=None, repr=False)  # ACTIVATION_ADMIN_TOKEN
    admin_max_connections: int = 32  # ACTIVATION_ADMIN_MAX_CONNECTIONS: requests served at once
    admin_request_timeout: float = 10.0  # ACTIVATION_ADMIN_REQUEST_TIMEOUT: the most one connection takes
    recovery_interval: float = 30.0  # ACTIVATION_RECOVERY_INTERVAL
    orphan_age: float = 600.0  # ACTIVATION_ORPHAN_AGE
    containment: str = "auto"  # ACTIVATION_CONTAINMENT: auto | cgroup | subreaper
    queue_key: bytes | None = dataclasses.field(default=None, repr=False)  # ACTIVATION_QUEUE_KEY (hex)
    transport: str = "files"  # ACTIVATION_TRANSPORT: files (one shared spool) | streams (Redis Streams)
    lease: float = 120.0  # ACTIVATION_LEASE: seconds a streams entry stays held without renewal
    stream_retention: float = 7 * 86400.0  # ACTIVATION_STREAM_RETENTION: results, dead letters, task ids
    redis_cluster: bool = False  # REDIS_CLUSTER: REDIS_URL names a node of a Redis Cluster
    redis_sentinels: tuple[tuple[str, int], ...] = ()  # REDIS_SENTINELS: host:port,host:port
    redis_sentinel_master: str = "mymaster"  # REDIS_SENTINEL_MASTER: the primary's name in Sentinel
    stopped_grace: float = 3600.0  # ACTIVATION_STOPPED_GRACE: a cleanly stopped worker is not dead for this long
    result_ttl: float = 7 * 86400.0  # ACTIVATION_RESULT_TTL: seconds or 7d/12h/30m; 0 keeps results forever

    # The environment these settings were read from: the base of the environment the agent and the
    # local stack's programs get (secrets stripped there). Nothing else reads os.environ.
    environ: Mapping[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False, hash=False)

    def require_worker(self) -> str:
        """The worker name, for the programs that cannot run without one."""
        if not self.worker_name:
            raise ConfigError("WORKER_NAME: required for this command, but not set")
        return self.worker_name

    @property
    def redis_url_redacted(self) -> str | None:
        """REDIS_URL with any password replaced, safe to log or show."""
        return redact_url(self.redis_url) if self.redis_url else None


def redact_url(url: str) -> str:
    """Hide the password of a URL such as ``redis://user:secret@host/0``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = f"{parts.username}:" if parts.username else ":"
    return parts._replace(netloc=f"{user}***@{netloc}").geturl()


def _number(cast: Callable[[str], T], minimum: float | None = None) -> Callable[[str, str], T]:
    def parse(name: str, raw: str) -> T:
        try:
            value = cast(raw.strip())
        except ValueError:
            kind = "an integer" if cast is int else "a number"
            raise ConfigError(f"{name}: expected {kind}, got {raw!r}") from None
        if minimum is not None and float(value) < minimum:  # type: ignore[arg-type]
            raise ConfigError(f"{name}: must be at least {minimum:g}, got {raw!r}")
        return value

    return parse


def _boolean(name: str, raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}: expected true or false, got {raw!r}")


def _choice(*choices: str) -> Callable[[str, str], str]:
    def parse(name: str, raw: str) -> str:
        value = raw.strip().lower()
        if value not in choices:
            raise ConfigError(f"{name}: expected one of {', '.join(choices)}, got {raw!r}")
        return value

    return parse


def _mode(name: str, raw: str) -> tuple[str, ...]:
    sources = tuple(dict.fromkeys(s.strip().lower() for s in raw.split(",") if s.strip()))
    unknown = [s for s in sources if s not in WAKE_SOURCES]
    if not sources or unknown:
        raise ConfigError(f"{name}: expected a comma-separated set of {', '.join(WAKE_SOURCES)}, got {raw!r}")
    if "inotify" in sources and "poll" in sources:
        raise ConfigError(f"{name}: choose inotify or poll, not both, got {raw!r}")
    return sources


def _worker(name: str, raw: str) -> str:
    if not WORKER_NAME_PATTERN.match(raw):
        raise ConfigError(f"{name}: expected letters, digits, '_' or '-' (max 64), got {raw!r}")
    return raw


def _redis_url(name: str, raw: str) -> str:
    parts = urlsplit(raw)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{name}: expected a redis://, rediss:// or unix:// URL, got {redact_url(raw)!r}")
    return raw


def _sentinels(name: str, raw: str) -> tuple[tuple[str, int], ...]:
    found = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{name}: expected a comma-separated list of HOST:PORT, got {raw!r}")
        found.append((host.strip("[]"), int(port)))
    if not found:
        raise ConfigError(f"{name}: expected a comma-separated list of HOST:PORT, got {raw!r}")
    return tuple(found)


def _text(name: str, raw: str) -> str:
    return raw


def _key(name: str, raw: str) -> bytes:
    try:
        key = bytes.fromhex(raw.strip())
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ConfigError(f"{name}: expected 64 hex digits (32 bytes)")  # never echo a secret
    return key


def _path(name: str, raw: str) -> Path:
    if not raw.strip():
        raise ConfigError(f"{name}: must not be empty")
    return Path(raw).expanduser().absolute()


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(name: str, raw: str) -> float:
    """Seconds, as a bare number or as 7d, 12h, 30m, 90s, 1d12h."""
    value = raw.strip().lower()
    with_units = _DURATION.findall(value)
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        return float(value)
    if not with_units or "".join(n + u for n, u in with_units) != value:
        raise ConfigError(f"{name}: expected seconds or a duration such as 7d, 12h or 30m, got {raw!r}")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in with_units)


def _bind(name: str, raw: str) -> str:
    host, sep, port = raw.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{name}: expected HOST:PORT, got {raw!r}")
    return raw


# variable -> (field, parser)
_VARIABLES: dict[str, tuple[str, Callable[[str, str], Any]]] = {
    "WORKER_NAME": ("worker_name", _worker),
    "ACTIVATION_SPOOL": ("spool", _path),
    "ACTIVATION_RUN_DIR": ("run_dir", _path),
    "ACTIVATION_MODE": ("mode", _mode),
    "ACTIVATION_AGENT_COMMAND": ("agent_command", _text),
    "ACTIVATION_AGENT_WORKDIR": ("agent_workdir", _path),
    "ACTIVATION_TASK_TIMEOUT": ("task_timeout", _number(float, 0.001)),
    "ACTIVATION_MAX_TASK_TIMEOUT": ("max_task_timeout", _number(float, 0.001)),
    "ACTIVATION_KILL_GRACE": ("kill_grace", _number(float, 0)),
    "ACTIVATION_DRAIN_TIMEOUT": ("drain_timeout", _number(float, 0)),
    "ACTIVATION_EXECUTOR_STOPWAITSECS": ("executor_stopwaitsecs", _number(float, 1)),
    "ACTIVATION_MAX_ATTEMPTS": ("max_attempts", _number(int, 1)),
    "ACTIVATION_POLL_INTERVAL": ("poll_interval", _number(float, 0.01)),
    "ACTIVATION_RESCAN_INTERVAL": ("rescan_interval", _number(float, 0.01)),
    "ACTIVATION_SETTLE_TIME": ("settle_time", _number(float, 0)),
    "ACTIVATION_HEARTBEAT_INTERVAL": ("heartbeat_interval", _number(float, 0.01)),
    "ACTIVATION_HEARTBEAT_TIMEOUT": ("heartbeat_timeout", _number(float, 0.01)),
    "ACTIVATION_OUTPUT_LIMIT": ("output_limit", _number(int, 0)),
    "ACTIVATION_METRICS_PORT": ("metrics_port", _number(int, 0)),
    "ACTIVATION_LOG_FORMAT": ("log_format", _choice("text", "json")),
    "ACTIVATION_LOG_LEVEL": ("log_level", _choice("debug", "info", "warning", "error")),
    "REDIS_URL": ("redis_url", _redis_url),
    "REDIS_PASSWORD": ("redis_password", _text),
    "ACTIVATION_REDIS_BACKOFF_MAX": ("redis_backoff_max", _number(float, 0.01)),
    "ORCHESTRATOR_MODE": ("orchestrator_mode", _choice(*ORCHESTRATOR_MODES)),
    "RESPONSE_TIME_THRESHOLD_MS": ("response_time_threshold_ms", _number(float, 0)),
    "TASK_RATE_THRESHOLD": ("task_rate_threshold", _number(float, 0)),
    "QUEUE_SIZE_THRESHOLD": ("queue_size_threshold", _number(int, 0)),
    "FALLBACK_TO_FILES": ("fallback_to_files", _boolean),
    "NODE_ENV": ("node_env", _text),
    "ACTIVATION_ADMIN_BIND": ("admin_bind", _bind),
    "ACTIVATION_ADMIN_TOKEN": ("admin_token", _text),
    "ACTIVATION_ADMIN_MAX_CONNECTIONS": ("admin_max_connections", _number(int, 1)),
    "ACTIVATION_ADMIN_REQUEST_TIMEOUT": ("admin_request_timeout", _number(float, 0.1)),
    "ACTIVATION_RECOVERY_INTERVAL": ("recovery_interval", _number(float, 0.01)),
    "ACTIVATION_ORPHAN_AGE": ("orphan_age", _number(float, 0)),
    "ACTIVATION_CONTAINMENT": ("containment", _choice("auto", "cgroup", "subreaper")),
    "ACTIVATION_QUEUE_KEY": ("queue_key", _key),
    "ACTIVATION_TRANSPORT": ("transport", _choice(*TRANSPORTS)),
    "ACTIVATION_LEASE": ("lease", _number(float, 0.01)),
    "ACTIVATION_STREAM_RETENTION": ("stream_retention", _number(float, 1)),
    "REDIS_CLUSTER": ("redis_cluster", _boolean),
    "REDIS_SENTINELS": ("redis_sentinels", _sentinels),
    "REDIS_SENTINEL_MASTER": ("redis_sentinel_master", _text),
    "ACTIVATION_STOPPED_GRACE": ("stopped_grace", _number(float, 0)),
    "ACTIVATION_RESULT_TTL": ("result_ttl", _duration),
}

KNOWN_VARIABLES = frozenset(_VARIABLES) | {name + SECRET_FILE_SUFFIX for name in SECRET_VARIABLES}


def read_secret_files(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with each secret ``X`` filled in from the file named by ``X_FILE``, when that is set.

    The file holds the value alone; one trailing newline (as ``echo`` writes) is dropped. Setting
    both ``X`` and ``X_FILE`` is an error: which one wins would be a guess.
    """
    resolved = dict(env)
    for name in SECRET_VARIABLES:
        file_variable = name + SECRET_FILE_SUFFIX
        path = env.get(file_variable, "").strip()
        if not path:
            continue
        if env.get(name, "").strip():
            raise ConfigError(f"{file_variable}: set {name} or {file_variable}, not both")
        try:
            with open(path, "rb") as handle:
                data = handle.read(MAX_SECRET_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"{file_variable}: cannot read {path}: {exc.strerror or exc}") from None
        if len(data) > MAX_SECRET_FILE:
            raise ConfigError(f"{file_variable}: {path} is larger than {MAX_SECRET_FILE} bytes")
        try:
            value = data.decode("utf-8").removesuffix("\n").removesuffix("\r")
        except UnicodeDecodeError:
            raise ConfigError(f"{file_variable}: {path} is not UTF-8 text") from None
        if not value.strip():
            raise ConfigError(f"{file_variable}: {path} is empty")
        resolved[name] = value
    return resolved


def with_password(url: str, password: str) -> str:
    """``url`` with ``password`` as its password (percent-encoded: any character may be in it)."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    user = quote(parts.username or "", safe="")
    return parts._replace(netloc=f"{user}:{quote(password, safe='')}@{host}").geturl()


def load_settings(env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Build the settings from ``env`` (default: the process environment), then ``overrides``.

    Empty variables count as unset. Overrides are already-typed values, e.g. from click options.
    """
    given = dict(os.environ if env is None else env)
    env = read_secret_files(given)
    values: dict[str, Any] = {"environ": given}
    for variable, (field, parse) in _VARIABLES.items():
        raw = env.get(variable)
        if raw is not None and raw.strip() != "":
            values[field] = parse(variable, raw)
    values.update({k: v for k, v in overrides.items() if v is not None})
    values.setdefault("spool", Path("var/spool").absolute())
    if "run_dir" not in values:
        base = Path("var/run").absolute()
        worker = values.get("worker_name")
        values["run_dir"] = base / worker if worker else base
    values["log_level"] = str(values.get("log_level", "INFO")).upper()
    if values.get("redis_password"):
        if not values.get("redis_url"):
            raise ConfigError("REDIS_PASSWORD: set, but REDIS_URL is not")
        values["redis_url"] = with_password(values["redis_url"], values["redis_password"])
    settings = Settings(**values)
    _check(settings)
    return settings


def _check(settings: Settings) -> None:
    if settings.task_timeout > settings.max_task_timeout:
        raise ConfigError(
            "ACTIVATION_TASK_TIMEOUT: must not exceed ACTIVATION_MAX_TASK_TIMEOUT "
            f"({settings.task_timeout:g} > {settings.max_task_timeout:g})"
        )
    check_stop_margin(settings.drain_timeout, settings.kill_grace, settings.executor_stopwaitsecs)
    agent_words(settings.agent_command)
    if settings.transport == "streams" and not (settings.redis_url or settings.redis_sentinels):
        raise ConfigError("ACTIVATION_TRANSPORT: streams needs REDIS_URL or REDIS_SENTINELS")
    if settings.redis_cluster and settings.redis_sentinels:
        raise ConfigError("REDIS_CLUSTER: a Redis Cluster is not reached through REDIS_SENTINELS; set one of them")


DESCRIPTION = "{description}"
_LONG_OPTION_VALUE = re.compile(r"^--[A-Za-z0-9][A-Za-z0-9_-]*=")


def agent_words(template: str) -> tuple[str, ...]:
    """ACTIVATION_AGENT_COMMAND split like a shell would; refuses a template in which a description
    could be read as an option.

    The rule: each word holding ``{description}`` comes after a ``--`` word (the end of options,
    for claude's commander.js parser as for getopt, argparse and click), or is the value of a
    long option (``--prompt={description}``), or starts with something else than ``-`` and than
    ``{description}`` (``prompt:{description}``). Otherwise ``--version`` would be an option.
    """
    try:
        words = tuple(shlex.split(template))
    except ValueError as exc:
        raise ConfigError(f"ACTIVATION_AGENT_COMMAND: cannot be split into words: {exc}") from None
    if not words:
        raise ConfigError("ACTIVATION_AGENT_COMMAND: is empty")
    if DESCRIPTION in words[0]:
        raise ConfigError("ACTIVATION_AGENT_COMMAND: the program itself must not be {description}")
    if not any(DESCRIPTION in word for word in words):
        raise ConfigError("ACTIVATION_AGENT_COMMAND: must contain {description}")
    ended = False
    for word in words[1:]:
        if word == "--":
            ended = True
        elif DESCRIPTION in word and not ended and not _never_an_option(word):
            raise ConfigError(
                f"ACTIVATION_AGENT_COMMAND: {word!r} comes before a '--' word, so a description "
                "starting with '-' would be taken for an option; put the options first, then "
                "'-p -- {description}' (e.g. claude --output-format json -p -- {description})"
            )
    return words


def _never_an_option(word: str) -> bool:
    return bool(_LONG_OPTION_VALUE.match(word)) or not (word.startswith("-") or word.startswith(DESCRIPTION))


def check_stop_margin(drain: float, grace: float, stopwaitsecs: float, *, where: str = "") -> None:
    """The drain, then the kill grace, then STOP_MARGIN to put the task back: all before SIGKILL.

    supervisord SIGKILLs the executor ``stopwaitsecs`` after its SIGTERM; a kill that races the
    drain leaves the agent's tree to a stranger and the task claimed.
    """
    if drain + grace + STOP_MARGIN > stopwaitsecs:
        raise ConfigError(
            f"ACTIVATION_DRAIN_TIMEOUT: {drain:g} s plus ACTIVATION_KILL_GRACE {grace:g} s plus a {STOP_MARGIN:g} s "
            f"margin must fit in the executor's stopwaitsecs ({stopwaitsecs:g} s{where}); "
            f"lower the drain to at most {max(stopwaitsecs - grace - STOP_MARGIN, 0):g} s"
        )
