"""What the agent is given: its argv and its environment, built from the template and the executor's own.

- argv: ``shlex.split(ACTIVATION_AGENT_COMMAND)`` with ``{description}`` and ``{task_id}``
  replaced inside each word, so the description is always part of exactly one argument, whatever
  it contains. No shell ever sees it, and no option parser: config.agent_words refuses a template
  whose ``{description}`` is not after ``--`` (or an option's ``=value``).
- environment: the executor's own, minus activation's secrets (``ACTIVATION_ADMIN_TOKEN``,
  ``REDIS_URL``, ``REDIS_PASSWORD``, ``ACTIVATION_QUEUE_KEY``, any ``ACTIVATION_*_TOKEN``,
  ``*_PASSWORD`` or ``*_KEY``, and the ``*_FILE`` variables naming them), minus the ways into the
  worker (``ACTIVATION_RUN_DIR``, supervisord's ``SUPERVISOR_*``) and ``PROMETHEUS_MULTIPROC_DIR``;
  plus ``ACTIVATION_TASK_ID``, ``ACTIVATION_ATTEMPT`` (the run's number: attempts + 1 in files mode,
  the delivery count in streams mode, the same number), ``ACTIVATION_WORKER`` and
  ``ACTIVATION_AGENT_OF`` (an opaque id of the executor, not its run folder, by which a restarted
  executor without cgroups finds what a SIGKILLed one left running).
  Everything else, such as ``ANTHROPIC_API_KEY``, ``HOME`` or ``IS_SANDBOX``, passes through.

Running the process tree with them is agent.py's job; whether argv can hold the description is spawn.py's.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from activation.config import SECRET_FILE_SUFFIX, SECRET_VARIABLES, agent_words

_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@functools.lru_cache(maxsize=8)
def template_words(template: str) -> tuple[str, ...]:
    """The template's words, split once per template (config.agent_words refuses a template in
    which a description could be read as an option)."""
    return agent_words(template)


def build_argv(template: str, description: str, **fields: object) -> list[str]:
    """The agent's argv: the template split like a shell would, placeholders filled word by word.

    The template is split first and filled afterwards, in a single pass, so nothing in the
    description (quotes, spaces, ``$(...)``, a ``{task_id}`` of its own) can change the words.
    Unknown placeholders are left as they are.
    """
    values = {"description": description, **{key: str(value) for key, value in fields.items()}}

    def fill(match: re.Match[str]) -> str:
        return values.get(match.group(1), match.group(0))

    return [_PLACEHOLDER.sub(fill, word) if "{" in word else word for word in template_words(template)]


def is_secret(name: str) -> bool:
    """Whether an environment variable is one of activation's own secrets."""
    name = name.removesuffix(SECRET_FILE_SUFFIX)  # where a secret lives is none of the agent's business
    return name in SECRET_VARIABLES or (
        name.startswith("ACTIVATION_") and name.endswith(("_TOKEN", "_PASSWORD", "_KEY"))
    )


# Not secrets, but ways in: the run folder (queue socket, supervisord's socket) and supervisord's
# own variables, SUPERVISOR_SERVER_URL among them, which it gives every program it starts.
HIDDEN_VARIABLES = frozenset({"PROMETHEUS_MULTIPROC_DIR", "ACTIVATION_RUN_DIR"})
HIDDEN_PREFIXES = ("SUPERVISOR_",)


def agent_environment(base: Mapping[str, str], task_id: str, worker: str, *, attempt: int = 1) -> dict[str, str]:
    """The agent's environment: ``base`` without activation's secrets, plus the task's identity.

    ``attempt`` (ACTIVATION_ATTEMPT, 1 for the first run) and ACTIVATION_TASK_ID let an agent make
    its side effects idempotent: delivery is at least once, in both transports.
    """
    env = {
        k: v
        for k, v in base.items()
        if k not in HIDDEN_VARIABLES and not k.startswith(HIDDEN_PREFIXES) and not is_secret(k)
    }
    env["ACTIVATION_TASK_ID"] = task_id
    env["ACTIVATION_WORKER"] = worker
    env["ACTIVATION_ATTEMPT"] = str(attempt)
    return env
