"""Class 3 of issue 10 with the real Claude Code CLI: a description that looks like an option is the prompt.

With the seed's ``claude -p {description}``, ``--version`` "completed" with claude's version as its
output and ``--permission-mode=…`` was taken as an option. With the shipped template (options
first, then ``-p -- {description}``) both reach the model, verbatim, as the user's message.
"""

from __future__ import annotations

import pytest

from tests.e2e.conftest import CANNED_REPLY, pinned_version
from tests.fake_anthropic import FakeAnthropic, reply
from tests.harness import WorkerTree


@pytest.mark.slow
@pytest.mark.parametrize(
    "description",
    ["--version", "--permission-mode=bypassPermissions", "--help", "-p"],
)
def test_an_option_like_description_reaches_the_model_as_the_prompt(
    claude_tree: WorkerTree, fake_api: FakeAnthropic, description: str
) -> None:
    fake_api.on(description, reply(CANNED_REPLY))

    claude_tree.write_task("opt-1", description)
    result = claude_tree.wait_result("opt-1", timeout=30)

    assert result["status"] == "completed", result
    assert pinned_version() not in result["stdout"]  # not claude's --version
    agent = result["agent"]
    assert isinstance(agent, dict), result["stdout"]
    assert agent["is_error"] is False
    assert agent["result"] == CANNED_REPLY
    calls = fake_api.messages(description)
    assert len(calls) == 1, fake_api.paths()
    texts = [b.get("text") for m in calls[0].body["messages"] if m.get("role") == "user" for b in _blocks(m)]
    assert description in texts, texts  # the prompt is the description itself, as one text block


def _blocks(message: dict) -> list[dict]:
    content = message.get("content")
    if isinstance(content, str):
        return [{"text": content}]
    return [b for b in content or [] if isinstance(b, dict)]
