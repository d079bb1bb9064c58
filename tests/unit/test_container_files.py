"""The Docker files, read statically: Dockerfiles, docker-compose.yml, the .env.* files, .dockerignore.

No Docker engine runs here, so these tests hold the files to what the code expects: every path
they name exists, every variable they set is one the settings object knows (or a documented
third-party one), every value parses, and the numbers that must agree (stop grace, drain, ports)
do. The parsers at the top are shared with tests/integration/test_containers.py, which runs what
the images would run.
"""

from __future__ import annotations

import configparser
import dataclasses
import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import Path
from typing import Any

import pytest

from activation.config import KNOWN_VARIABLES, SECRET_VARIABLES, STOP_MARGIN, load_settings
from activation.orchestrator.http import check_bind, parse_bind
from tests.harness import ROOT

yaml = pytest.importorskip("yaml", reason="PyYAML (the dev extra) reads docker-compose.yml")

COMPOSE_FILE = ROOT / "docker-compose.yml"
WORKER_DOCKERFILE = ROOT / "containers" / "worker" / "Dockerfile"
ORCHESTRATOR_DOCKERFILE = ROOT / "containers" / "orchestrator" / "Dockerfile"
DOCKERFILES = {"worker": WORKER_DOCKERFILE, "orchestrator": ORCHESTRATOR_DOCKERFILE}
ENV_FILES = {name: ROOT / f".env.{name}" for name in ("development", "staging", "production")}
WORKERS = ("marie", "anga", "fabien")
SERVICES = ("redis", "orchestrator", *WORKERS, "prometheus", "grafana")

# Stand-ins for the secrets that the stack takes from the shell, never from the repo.
DUMMY_SECRETS = {
    "REDIS_PASSWORD": "dummyredispassword0123",
    "ACTIVATION_ADMIN_TOKEN": "dummy-admin-token-0123",
    "GRAFANA_ADMIN_PASSWORD": "dummy-grafana-password",
}

# Variables the files may set that are not activation's settings, and why each is there.
THIRD_PARTY_VARIABLES = {
    "PATH": "the image's search path, with the package's venv first",
    "PYTHONUNBUFFERED": "Python: log lines reach `docker logs` at once",
    "NODE_EXTRA_CA_CERTS": "claude (Node): trust the system store, extra CAs of containers/ca/ included",
    "ANTHROPIC_API_KEY": "Claude Code's API key, passed through from the shell",
    "IS_SANDBOX": "Claude Code: allows --dangerously-skip-permissions when running as root",
    "REDIS_PASSWORD": "the redis service: its --requirepass",
    "REDISCLI_AUTH": "redis-cli: the password its healthcheck uses",
}
THIRD_PARTY_PREFIXES = {"GF_": "Grafana's own settings"}
# Variables that only docker-compose.yml reads (interpolation), documented at its top.
COMPOSE_KNOBS = ("WORKER_BASE_IMAGE", "APP_UID", "IMAGE_TAG", "ADMIN_PORT", "PROMETHEUS_PORT", "GRAFANA_PORT")
COMPOSE_KNOBS += ("GRAFANA_ADMIN_USER",)


# -- parsers (shared with tests/integration/test_containers.py) ---------------------------------


@dataclasses.dataclass
class Dockerfile:
    """The instructions of a Dockerfile that matter here, in order."""

    path: Path
    instructions: list[tuple[str, str]]  # (INSTRUCTION, arguments), continuation lines joined
    args: dict[str, str]  # ARG name -> default ("" when none)
    env: dict[str, str]  # ENV name -> raw value, with quotes removed but ${...} kept
    copies: list[tuple[list[str], str]]  # COPY sources, destination

    def last(self, instruction: str) -> str | None:
        found = [arguments for name, arguments in self.instructions if name == instruction]
        return found[-1] if found else None

    def exec_form(self, instruction: str) -> list[str]:
        """The JSON (exec form) arguments of the last ``instruction``; fails on the shell form."""
        raw = self.last(instruction)
        assert raw is not None, f"{self.path.name} has no {instruction}"
        if instruction == "HEALTHCHECK":
            raw = raw.split("CMD", 1)[1]
        value = json.loads(raw)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), raw
        return value

    def expanded_env(self, base: dict[str, str]) -> dict[str, str]:
        """ENV as a container sees it: ``${NAME}`` expanded from ARGs, earlier ENVs and ``base``."""
        known = {**base, **self.args}
        env: dict[str, str] = {}
        for name, raw in self.env.items():
            env[name] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: known.get(m[1] or m[2], ""), raw)
            known[name] = env[name]
        return env

    def image_path(self, container_path: str) -> Path | None:
        """The repo file that a COPY put at ``container_path``, if any."""
        for sources, dest in self.copies:
            for source in sources:
                if dest.endswith("/") and source.endswith("/") and container_path.startswith(dest):
                    return ROOT / source / container_path[len(dest) :]
                if container_path == dest.rstrip("/") + "/" + Path(source).name or container_path == dest:
                    return ROOT / source
        return None


def parse_dockerfile(path: Path) -> Dockerfile:
    lines: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or not stripped:
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        lines.append(pending + stripped)
        pending = ""
    instructions = []
    args: dict[str, str] = {}
    env: dict[str, str] = {}
    copies: list[tuple[list[str], str]] = []
    for line in lines:
        name, _, arguments = line.partition(" ")
        name, arguments = name.upper(), arguments.strip()
        instructions.append((name, arguments))
        if name == "ARG":
            key, _, default = arguments.partition("=")
            args[key] = default
        elif name == "ENV":
            for word in shlex.split(arguments):
                key, sep, value = word.partition("=")
                assert sep, f"{path.name}: use ENV KEY=VALUE, got {word!r}"
                env[key] = value
        elif name == "COPY":
            words = [w for w in shlex.split(arguments) if not w.startswith("--")]
            copies.append((words[:-1], words[-1]))
    return Dockerfile(path, instructions, args, env, copies)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; comments and blank lines skipped."""
    values = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
        values[key.strip()] = value
    return values


class MissingVariable(Exception):
    """A ``${VAR:?message}`` whose variable is unset: compose refuses the file."""


_INTERPOLATION = re.compile(r"\$(?:(\$)|\{(\w+)(?:(:?[-?+])([^}]*))?\}|(\w+))")


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-default}, ${VAR:?error} and kin."""

    def substitute(match: re.Match[str]) -> str:
        escaped, name, operator, word, bare = match.groups()
        if escaped:
            return "$"
        if bare:
            return variables.get(bare, "")
        current = variables.get(name)
        unset = current is None or (current == "" and operator is not None and operator.startswith(":"))
        if operator in (":-", "-"):
            return word if unset else str(current)
        if operator in (":?", "?"):
            if unset:
                raise MissingVariable(f"{name}: {word}")
            return str(current)
        if operator in (":+", "+"):
            return "" if unset else word
        return current or ""

    return _INTERPOLATION.sub(substitute, value)


def load_compose(variables: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml with YAML merges applied and every value interpolated from ``variables``."""

    def walk(node: Any) -> Any:
        if isinstance(node, str):
            return interpolate(node, variables)
        if isinstance(node, dict):
            return {key: walk(value) for key, value in node.items()}
        if isinstance(node, list):
            return [walk(item) for item in node]
        return node

    return dict(walk(yaml.safe_load(COMPOSE_FILE.read_text())))


def compose_variables(env_file: str = "development", **extra: str) -> dict[str, str]:
    """What compose would interpolate from: the env file, the dummy secrets, then ``extra``."""
    return {**read_env_file(ENV_FILES[env_file]), **DUMMY_SECRETS, **extra}


def service_environment(compose: dict[str, Any], service: str) -> dict[str, str]:
    """A service's environment as strings; a name without a value (passed from the shell) is left out."""
    raw = compose["services"][service].get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    return {key: str(value) for key, value in raw.items() if value is not None}


def activation_services(compose: dict[str, Any]) -> list[str]:
    """The services built from this repo's Dockerfiles."""
    return [name for name, service in compose["services"].items() if "build" in service]


def supervisor_conf(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser()
    parser.read(ROOT / "supervisor_conf" / name)
    return parser


def seconds(duration: str) -> float:
    """A compose duration such as ``60s``, ``1m30s`` or ``500ms``."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def dockerignore_excludes(relative: str) -> bool:
    """Whether .dockerignore keeps ``relative`` (a path in the repo) out of the build context."""
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(relative).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in parts)
        else:
            hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes)
        if hit:
            excluded = not negate
    return excluded


# -- the Dockerfiles ------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "conf"), [("worker", "worker.conf"), ("orchestrator", "orchestrator.conf")])
def test_the_image_runs_supervisord_as_pid_1_on_the_repos_conf(image, conf):
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    cmd = dockerfile.exec_form("CMD")
    # supervisord, run in-process by activation.supervise (non-dumpable: README "Secrets").
    assert cmd[:5] == ["/opt/activation/venv/bin/python", "-m", "activation.supervise", "-n", "-c"] and len(cmd) == 6
    assert dockerfile.image_path(cmd[5]) == ROOT / "supervisor_conf" / conf
    # Nothing wraps supervisord: no ENTRYPOINT of ours, and the worker clears any of its base's.
    entrypoint = dockerfile.last("ENTRYPOINT")
    assert entrypoint in (None, "[]")
    if image == "worker":
        assert entrypoint == "[]", "the sandbox base may have an ENTRYPOINT: reset it"
    env = dockerfile.expanded_env({"PATH": "/usr/bin:/bin"})
    # Last: the agent's python3 and pip stay the base's; activation's programs are found all the same.
    assert env["PATH"] == "/usr/bin:/bin:/opt/activation/venv/bin"
    assert env["ACTIVATION_SPOOL"] == "/spool" and env["ACTIVATION_RUN_DIR"] == "/run/activation"


@pytest.mark.parametrize("image", DOCKERFILES)
def test_both_images_build_on_a_public_debian_base_given_as_a_build_arg(image):
    """The tests build the same file on a local debootstrap bookworm (tests/containers/)."""
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    assert dockerfile.args["BASE_IMAGE"] == "debian:bookworm-slim"
    assert dockerfile.instructions[1] == ("FROM", "${BASE_IMAGE}")
    # Whatever the base lacks comes from its distribution, so a bare Debian base is enough.
    assert "python3-venv" in DOCKERFILES[image].read_text()


def test_the_worker_image_installs_the_pinned_claude_unless_its_base_has_one():
    text = WORKER_DOCKERFILE.read_text()
    assert "--build-arg BASE_IMAGE=docker/sandbox-templates:claude-code" in text
    assert '"@anthropic-ai/claude-code@${CLAUDE_CODE_VERSION}"' in text and "command -v claude" in text
    assert "IS_SANDBOX=1" in text and "--dangerously-skip-permissions" in text


@pytest.mark.parametrize("image", DOCKERFILES)
def test_an_extra_ca_joins_the_trust_store_before_anything_is_downloaded(image):
    """containers/ca/*.crt (never committed) for a TLS-intercepting proxy; pip and npm use the store."""
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    copies = [dest for sources, dest in dockerfile.copies if sources == ["containers/ca/"]]
    assert copies == ["/usr/local/share/ca-certificates/activation/"]
    runs = [i for i, (name, _) in enumerate(dockerfile.instructions) if name == "RUN"]
    copy_at = next(i for i, (name, args) in enumerate(dockerfile.instructions) if "containers/ca/" in args)
    assert copy_at < runs[0]
    assert "update-ca-certificates" in dockerfile.instructions[runs[0]][1]
    pip = next(args for name, args in dockerfile.instructions if name == "RUN" and "pip install" in args)
    assert "PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in pip
    assert not dockerignore_excludes("containers/ca/corporate.crt")
    ignored = subprocess.run(
        ["git", "check-ignore", "-q", "containers/ca/corporate.crt"], cwd=ROOT, capture_output=True, timeout=30
    )
    assert ignored.returncode == 0, "git must ignore containers/ca/*.crt"


def test_the_worker_image_pins_the_claude_code_of_the_e2e_tests():
    pin = re.search(r"^CLAUDE_CODE_VERSION=(\S+)", (ROOT / "tests/e2e/install_claude.sh").read_text(), re.M)
    assert pin is not None
    assert parse_dockerfile(WORKER_DOCKERFILE).args["CLAUDE_CODE_VERSION"] == pin[1]


def test_the_agent_command_of_the_image_is_valid_and_headless():
    env = parse_dockerfile(WORKER_DOCKERFILE).expanded_env({})
    settings = load_settings(env={"WORKER_NAME": "marie", **env})
    argv = shlex.split(settings.agent_command)
    assert argv[0] == "claude" and "--dangerously-skip-permissions" in argv
    assert argv[argv.index("--output-format") + 1] == "json"  # the result gets the parsed envelope


@pytest.mark.parametrize("image", DOCKERFILES)
def test_the_image_runs_as_a_non_root_user(image):
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    user = dockerfile.last("USER")
    assert user == "${APP_UID}", user
    assert dockerfile.args["APP_UID"] not in ("", "0")


def test_the_healthchecks_ask_activation():
    worker = parse_dockerfile(WORKER_DOCKERFILE).exec_form("HEALTHCHECK")
    assert worker[:2] == ["/bin/sh", "-c"] and worker[2] == 'exec activation check "$WORKER_NAME"'
    orchestrator = parse_dockerfile(ORCHESTRATOR_DOCKERFILE).exec_form("HEALTHCHECK")
    assert orchestrator[:3] == ["activation", "config", "get"]


@pytest.mark.parametrize("image", DOCKERFILES)
def test_every_copy_source_exists_and_is_in_the_build_context(image):
    dockerfile = parse_dockerfile(DOCKERFILES[image])
    assert dockerfile.copies
    for sources, _ in dockerfile.copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not dockerignore_excludes(source.rstrip("/")), f"{source} is excluded by .dockerignore"
            if source.endswith("/"):  # and what is inside it
                for inner in (ROOT / source).rglob("*.py"):
                    assert not dockerignore_excludes(str(inner.relative_to(ROOT))), inner


def test_the_build_context_leaves_out_state_and_secrets():
    for path in (".venv/bin/python", ".git/config", "var/spool", ".env", ".env.production", "tests/harness.py"):
        assert dockerignore_excludes(path), path
    assert dockerignore_excludes("activation/__pycache__/cli.cpython-311.pyc")


@pytest.mark.parametrize("image", DOCKERFILES)
def test_every_variable_an_image_sets_is_known(image):
    for name in parse_dockerfile(DOCKERFILES[image]).env:
        assert_known(name)


def assert_known(name: str) -> None:
    if name in KNOWN_VARIABLES or name in THIRD_PARTY_VARIABLES:
        return
    if any(name.startswith(prefix) for prefix in THIRD_PARTY_PREFIXES):
        return
    pytest.fail(
        f"{name} is neither a setting (activation.config.KNOWN_VARIABLES) nor a documented third-party variable"
    )


# -- docker-compose.yml -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose(compose_variables())


def test_the_stack_has_its_services(compose):
    assert set(compose["services"]) == set(SERVICES)
    assert "version" not in compose  # the Compose Specification: no version key
    assert compose["services"]["redis"]["healthcheck"]["test"]


def test_the_workers_share_one_extension(compose):
    text = COMPOSE_FILE.read_text()
    assert re.search(r"^x-worker: &worker$", text, re.M)
    for worker in WORKERS:
        block = re.search(rf"^  {worker}:\n((?:    .*\n|\n)+)", text, re.M)
        assert block is not None, worker
        assert "<<: *worker\n" in block[1] and "<<: *worker-env\n" in block[1], worker
        assert len([line for line in block[1].splitlines() if line.strip()]) <= 6, "a worker is the anchor + its name"
    first, *others = (dict(compose["services"][w]) for w in WORKERS)
    for worker, service in zip(WORKERS[1:], others, strict=True):
        assert service["environment"]["WORKER_NAME"] == worker and service["hostname"] == worker
        for key in set(first) | set(service):
            if key not in ("environment", "hostname"):
                assert service[key] == first[key], key
        assert {k: v for k, v in service["environment"].items() if k != "WORKER_NAME"} == {
            k: v for k, v in first["environment"].items() if k != "WORKER_NAME"
        }


def test_every_path_the_compose_file_names_exists(compose):
    for name, service in compose["services"].items():
        build = service.get("build")
        if build:
            context = ROOT / build["context"]
            assert context.is_dir(), f"{name}: build context {context}"
            assert (context / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']}"
        for env_file in (
            [service["env_file"]] if isinstance(service.get("env_file"), str) else service.get("env_file", [])
        ):
            assert (ROOT / env_file).is_file(), f"{name}: env_file {env_file}"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount source {source} is not in the repo"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"


def test_the_build_args_are_ones_the_dockerfiles_declare(compose):
    for name in activation_services(compose):
        build = compose["services"][name]["build"]
        declared = parse_dockerfile(ROOT / build["context"] / build["dockerfile"]).args
        for arg in build.get("args", {}):
            assert arg in declared, f"{name}: build arg {arg} is not an ARG of {build['dockerfile']}"


def test_every_variable_the_stack_sets_is_known(compose):
    for name in compose["services"]:
        for variable in compose["services"][name].get("environment") or {}:
            assert_known(variable)
    for path in ENV_FILES.values():
        for variable in read_env_file(path):
            assert variable in KNOWN_VARIABLES, f"{path.name}: {variable} is not a setting"


def test_every_variable_the_compose_file_reads_is_known_and_every_env_file_setting_is_read():
    text = COMPOSE_FILE.read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    read = set(re.findall(r"(?<!\$)\$\{(\w+)", code))
    for variable in read:
        assert variable in KNOWN_VARIABLES or variable in DUMMY_SECRETS or variable in COMPOSE_KNOBS, variable
    for knob in COMPOSE_KNOBS:
        assert knob in read and knob in text.split("services:")[0], f"{knob}: read and documented at the top"
    for path in ENV_FILES.values():
        for variable in read_env_file(path):
            assert variable in read, f"{path.name} sets {variable}, which docker-compose.yml never reads"


def test_the_spool_is_one_read_write_volume(compose):
    for name in activation_services(compose):
        mounts = [v for v in compose["services"][name]["volumes"] if v.split(":")[1] == "/spool"]
        assert mounts == ["spool:/spool"], f"{name}: {mounts} (claiming is a rename in the inbox: never :ro)"
    assert "rename" in COMPOSE_FILE.read_text() and ":ro" in COMPOSE_FILE.read_text()  # the comment on why


def test_only_loopback_ports_are_published(compose):
    published = {}
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} beyond the host's loopback"
            published[name] = port
    assert published["orchestrator"] == "127.0.0.1:8000:8000"
    assert published["grafana"] == "127.0.0.1:3000:3000"
    assert not set(published) & {"redis", *WORKERS}


def test_stop_grace_covers_supervisords_stops_and_the_drain(compose):
    worker_conf = supervisor_conf("worker.conf")
    waits = {
        p.split(":")[1]: worker_conf.getfloat(p, "stopwaitsecs")
        for p in worker_conf.sections()
        if p.startswith("program:")
    }
    for worker in WORKERS:
        service = compose["services"][worker]
        grace = seconds(service["stop_grace_period"])
        assert grace == 60
        assert sum(waits.values()) < grace, "supervisord stops one program after another"
        settings = load_settings(env=service_environment(compose, worker))
        assert settings.drain_timeout + settings.kill_grace + STOP_MARGIN <= waits["executor"]
        assert settings.executor_stopwaitsecs == waits["executor"]
    orchestrator_wait = supervisor_conf("orchestrator.conf").getfloat("program:orchestrator", "stopwaitsecs")
    assert orchestrator_wait < seconds(compose["services"]["orchestrator"]["stop_grace_period"])


def test_the_secrets_come_from_the_environment():
    for secret in DUMMY_SECRETS:
        variables = {k: v for k, v in compose_variables().items() if k != secret}
        with pytest.raises(MissingVariable, match=secret):
            load_compose(variables)
    compose = load_compose(compose_variables())
    redis = compose["services"]["redis"]
    assert "--requirepass" in " ".join(redis["command"]) and "$REDIS_PASSWORD" in " ".join(redis["command"])
    url = f"redis://:{DUMMY_SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    for name in activation_services(compose):
        assert service_environment(compose, name)["REDIS_URL"] == url
    assert (
        service_environment(compose, "orchestrator")["ACTIVATION_ADMIN_TOKEN"]
        == DUMMY_SECRETS["ACTIVATION_ADMIN_TOKEN"]
    )
    for worker in WORKERS:
        assert "ACTIVATION_ADMIN_TOKEN" not in service_environment(compose, worker)
        assert compose["services"][worker]["environment"]["ANTHROPIC_API_KEY"] is None  # from the shell only
    secrets = {*SECRET_VARIABLES, *DUMMY_SECRETS, "ANTHROPIC_API_KEY"}
    for path in [*ENV_FILES.values(), COMPOSE_FILE, *DOCKERFILES.values()]:
        text = path.read_text()
        for name in secrets:
            assert not re.search(rf"^\s*{name}=\S", text, re.M), f"{path.name} sets {name}"


@pytest.mark.parametrize("env_file", ENV_FILES)
def test_the_settings_accept_every_service_with_every_env_file(env_file):
    compose = load_compose(compose_variables(env_file))
    for worker in WORKERS:
        env = service_environment(compose, worker)
        settings = load_settings(env=env)
        assert settings.worker_name == worker
        assert settings.mode == ("inotify", "redis")
        assert settings.metrics_port == 9100 and str(settings.spool) == "/spool"
    settings = load_settings(env=service_environment(compose, "orchestrator"))
    assert settings.admin_bind == "0.0.0.0:8000"
    host, port = parse_bind(settings.admin_bind)
    assert port == 8000 and settings.admin_token
    check_bind(host, settings.admin_token)  # a non-loopback bind is allowed only with the token


@pytest.mark.parametrize(
    ("env_file", "mode"), [("development", "files"), ("staging", "auto"), ("production", "events")]
)
def test_each_env_file_picks_its_dispatch_mode(env_file, mode):
    values = read_env_file(ENV_FILES[env_file])
    settings = load_settings(env=values)
    assert settings.orchestrator_mode == mode
    assert settings.node_env == env_file
    if env_file == "staging":
        assert {"RESPONSE_TIME_THRESHOLD_MS", "TASK_RATE_THRESHOLD", "QUEUE_SIZE_THRESHOLD"} <= set(values)
    if env_file == "production":
        assert values["FALLBACK_TO_FILES"] == "true" and settings.fallback_to_files
    for key, value in values.items():  # plain values read the same by every compose version
        assert re.fullmatch(r"[A-Za-z0-9_.,:/-]*", value), f"{env_file}: {key}={value!r}"


def test_the_parsers_read_compose_the_way_compose_does():
    assert interpolate("a$$b ${X:-d} ${Y-e} ${Z:+p} $X", {"X": "x", "Y": ""}) == "a$b x  " + " x"
    assert interpolate("${E:-fallback}", {"E": ""}) == "fallback"
    with pytest.raises(MissingVariable, match="N: say so"):
        interpolate("${N:?say so}", {})
    assert seconds("1m30s") == 90 and seconds("500ms") == 0.5


def test_prometheus_and_grafana_are_wired_to_the_stack(compose):
    """The observability files (containers/prometheus, containers/grafana) agree with the services."""
    mounts = {
        name: {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}
        for name, service in compose["services"].items()
    }
    config = yaml.safe_load((ROOT / "containers/prometheus/prometheus.yml").read_text())
    config_dir = Path(next(t for t, s in mounts["prometheus"].items() if s.endswith("prometheus.yml"))).parent
    for rule_file in config.get("rule_files", []):
        assert str(config_dir / rule_file) in mounts["prometheus"], f"rule file {rule_file} is not mounted"
    targets = {t for job in config["scrape_configs"] for sc in job.get("static_configs", []) for t in sc["targets"]}
    workers = [n for n in compose["services"] if "WORKER_NAME" in service_environment(compose, n)]
    for worker in workers:
        port = service_environment(compose, worker)["ACTIVATION_METRICS_PORT"]
        assert f"{worker}:{port}" in targets, f"Prometheus does not scrape {worker}"
    admin_port = parse_bind(service_environment(compose, "orchestrator")["ACTIVATION_ADMIN_BIND"])[1]
    assert f"orchestrator:{admin_port}" in targets

    providers = yaml.safe_load((ROOT / "containers/grafana/provisioning/dashboards/activation.yml").read_text())
    for provider in providers["providers"]:
        assert mounts["grafana"].get(provider["options"]["path"]) == "./containers/grafana/dashboards"
    assert mounts["grafana"]["/etc/grafana/provisioning"] == "./containers/grafana/provisioning"
    datasources = yaml.safe_load((ROOT / "containers/grafana/provisioning/datasources/prometheus.yml").read_text())
    assert [d["url"] for d in datasources["datasources"]] == ["http://prometheus:9090"]
