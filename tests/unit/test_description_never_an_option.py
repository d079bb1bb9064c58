"""Class 3 of issue 10: the description is never an option.

The template check (config.agent_words, used by load_settings and build_argv) refuses every
shape in which a description could land where an option parser looks for options; every
template we ship passes it; and a description that starts with ``-`` reaches the agent as its
prompt, through the real executor and the fake agent (which parses ``--`` like claude).
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from pathlib import Path

import pytest

from activation.cli.localstack import FAKE_AGENT
from activation.config import Settings, agent_words, load_settings
from activation.errors import ConfigError
from activation.fake_agent import parse_args
from activation.spool.atomic import atomic_write_json
from activation.spool.layout import Spool
from activation.worker.agent_inputs import build_argv
from activation.worker.executor import Executor
from tests.conftest import WORKER

ROOT = Path(__file__).resolve().parents[2]

OPTION_LIKE = ["--version", "--permission-mode=bypassPermissions", "-p", "--", "-", "--help me", "-rf /"]

REFUSED = [
    "claude -p {description}",  # the seed's shape: claude's -p is a flag, the prompt a positional
    "claude {description}",
    "claude -p {description} --output-format json",
    "claude --output-format json -p {description}",
    "claude -p{description}",  # a short option's attached value is no value for a flag
    "claude -p -{description}",
    "claude {description} -- x",  # the -- comes too late
    "claude --prompt {description}",  # only --name={description} is one word
    "{description} -p x",
]

ACCEPTED = [
    "claude -p -- {description}",
    "claude --output-format json --dangerously-skip-permissions -p -- {description}",
    "agent --prompt={description}",
    "agent prompt:{description}",
    "agent --id={task_id} -- {description}",
    "agent -- '{task_id}: {description}'",
]


@pytest.mark.parametrize("template", REFUSED)
def test_a_template_that_lets_a_description_be_an_option_is_refused(template: str) -> None:
    with pytest.raises(ConfigError, match="ACTIVATION_AGENT_COMMAND") as caught:
        load_settings(env={"ACTIVATION_AGENT_COMMAND": template})
    assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError):
        build_argv(template, "x")


@pytest.mark.parametrize("template", ACCEPTED)
@pytest.mark.parametrize("description", OPTION_LIKE)
def test_an_accepted_template_keeps_an_option_like_description_out_of_option_position(
    template: str, description: str
) -> None:
    load_settings(env={"ACTIVATION_AGENT_COMMAND": template})
    argv = build_argv(template, description, task_id="t-1")
    words = agent_words(template)
    index = next(i for i, w in enumerate(words) if "{description}" in w)
    word = argv[index]
    # Either the end of options came before it, or the word cannot start an option.
    assert "--" in argv[1:index] or word.startswith("--prompt=") or not word.startswith("-")


def test_the_default_template_is_accepted() -> None:
    settings = load_settings(env={})
    assert build_argv(settings.agent_command, "--version") == ["claude", "-p", "--", "--version"]


def shipped_templates() -> list[tuple[str, str]]:
    """Every ACTIVATION_AGENT_COMMAND we ship: Dockerfile, compose, env files, README, localstack."""
    found = []
    for name in ("containers/worker/Dockerfile", "docker-compose.yml", "README.md", *_env_files()):
        text = (ROOT / name).read_text()
        for match in re.finditer(r"ACTIVATION_AGENT_COMMAND[=:]\s*\"?([^\"\n]*\{description\}[^\"\n]*)", text):
            found.append((name, match.group(1).strip().strip("`'")))
        for match in re.finditer(r"`([^`]*\{description\}[^`]*)`", text):
            if match.group(1).split()[0] in ("claude", "agent"):
                found.append((name, match.group(1)))
    return found


def _env_files() -> list[str]:
    return sorted(p.name for p in ROOT.glob(".env.*"))


def test_every_template_we_ship_passes_the_check(monkeypatch: pytest.MonkeyPatch) -> None:
    from activation.cli import localstack

    templates = shipped_templates()
    assert any(name == "containers/worker/Dockerfile" for name, _ in templates), templates
    assert any(name == "README.md" for name, _ in templates), templates
    monkeypatch.setattr(localstack.shutil, "which", lambda program: None)  # no claude: make up's fake agent
    fake, is_fake = localstack.agent_command(Settings())
    assert is_fake
    monkeypatch.setattr(localstack.shutil, "which", lambda program: f"/usr/bin/{program}")  # claude on PATH
    real, is_fake = localstack.agent_command(Settings())
    assert not is_fake
    templates += [("make up", fake), ("make up with claude", real), ("config default", Settings().agent_command)]
    for name, template in templates:
        try:
            agent_words(template)
        except ConfigError as exc:
            pytest.fail(f"{name} ships {template!r}: {exc}")


@pytest.mark.parametrize("description", OPTION_LIKE)
def test_the_fake_agent_parses_like_claude(description: str) -> None:
    assert parse_args(["--output-format", "json", "-p", "--", description]) == (description, "json")
    assert parse_args(["-p", "plain words"]) == ("plain words", "text")
    # Before `--`, a word that starts with "-" is an option, as claude takes it: not the prompt.
    assert parse_args(["-p", "--version"]) == (None, "text")


@pytest.mark.parametrize("description", ["--version", "--permission-mode=bypassPermissions", "-p --", "--"])
def test_an_option_like_description_reaches_the_agent_as_its_prompt(
    description: str, spool: Spool, make_settings: Callable[..., Settings]
) -> None:
    command = shlex.join([*shlex.split(f"python3 {FAKE_AGENT}"), "--output-format", "json"]) + " -p -- {description}"
    executor = Executor(make_settings(agent_command=command))
    atomic_write_json(spool.task_path(WORKER, "opt-1"), {"task_id": "opt-1", "description": description})
    result = executor.process("opt-1")
    assert result is not None
    assert result["status"] == "completed", result
    assert result["agent"]["result"] == f"done: {description}"
