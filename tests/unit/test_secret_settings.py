"""Secrets from files (the Docker secrets convention), REDIS_PASSWORD, the queue key, and what the agent never gets."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from activation.config import SECRET_VARIABLES, load_settings, with_password
from activation.errors import ConfigError
from activation.procctl import is_dumpable
from activation.worker.agent_inputs import agent_environment, is_secret


def test_each_secret_may_come_from_a_file(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("tok-123\n")
    (tmp_path / "url").write_text("redis://redis:6379/0")
    (tmp_path / "password").write_text("pw with spaces/and@signs\n")
    settings = load_settings(
        env={
            "ACTIVATION_ADMIN_TOKEN_FILE": str(tmp_path / "token"),
            "REDIS_URL_FILE": str(tmp_path / "url"),
            "REDIS_PASSWORD_FILE": str(tmp_path / "password"),
        }
    )
    assert settings.admin_token == "tok-123"  # one trailing newline, as echo writes it, is dropped
    assert settings.redis_url is not None
    assert urlsplit(settings.redis_url).hostname == "redis"
    assert "tok-123" not in repr(settings) and "spaces" not in repr(settings)


def test_a_secret_and_its_file_together_are_refused(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("a")
    with pytest.raises(ConfigError, match=r"^ACTIVATION_ADMIN_TOKEN_FILE: set ACTIVATION_ADMIN_TOKEN or"):
        load_settings(env={"ACTIVATION_ADMIN_TOKEN": "b", "ACTIVATION_ADMIN_TOKEN_FILE": str(tmp_path / "token")})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "cannot read"),
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"\xff\xfe", "not UTF-8"),
        (b"x" * 70000, "larger"),
    ],
)
def test_a_bad_secret_file_is_a_one_line_error_without_its_content(
    tmp_path: Path, content: bytes | None, message: str
) -> None:
    path = tmp_path / "secret"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"^REDIS_PASSWORD_FILE: .*{message}") as caught:
        load_settings(env={"REDIS_URL": "redis://r:6379/0", "REDIS_PASSWORD_FILE": str(path)})
    assert "\n" not in str(caught.value)


@given(st.text(min_size=1).filter(lambda s: "\x00" not in s))
def test_any_redis_password_survives_the_url(password: str) -> None:
    url = with_password("redis://redis:6379/0", password)
    from urllib.parse import unquote

    parts = urlsplit(url)
    assert parts.hostname == "redis" and parts.port == 6379 and parts.path == "/0"
    assert unquote(parts.password or "") == password


def test_redis_password_without_a_url_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^REDIS_PASSWORD: set, but REDIS_URL is not$"):
        load_settings(env={"REDIS_PASSWORD": "x"})


def test_the_queue_key_is_64_hex_digits_and_never_echoed() -> None:
    key = "ab" * 32
    assert load_settings(env={"ACTIVATION_QUEUE_KEY": key}).queue_key == bytes.fromhex(key)
    with pytest.raises(ConfigError, match=r"^ACTIVATION_QUEUE_KEY: expected 64 hex digits") as caught:
        load_settings(env={"ACTIVATION_QUEUE_KEY": "secret-but-wrong"})
    assert "secret-but-wrong" not in str(caught.value)


def test_the_agent_gets_no_secret_no_secret_file_and_no_way_into_the_worker() -> None:
    base = {name: "s" for name in SECRET_VARIABLES}
    base |= {f"{name}_FILE": "/run/secrets/x" for name in SECRET_VARIABLES}
    base |= {
        "ACTIVATION_RUN_DIR": "/run/activation",
        "SUPERVISOR_SERVER_URL": "unix:///run/activation/supervisor.sock",
        "SUPERVISOR_PROCESS_NAME": "executor",
        "ACTIVATION_OTHER_KEY": "k",
        "ANTHROPIC_API_KEY": "for claude",
        "HOME": "/home/agent",
    }
    env = agent_environment(base, "t1", "w1")
    assert env == {
        "ANTHROPIC_API_KEY": "for claude",
        "HOME": "/home/agent",
        "ACTIVATION_TASK_ID": "t1",
        "ACTIVATION_WORKER": "w1",
        "ACTIVATION_ATTEMPT": "1",
    }
    assert is_secret("ACTIVATION_QUEUE_KEY") and is_secret("REDIS_URL_FILE") and not is_secret("ANTHROPIC_API_KEY")


def test_a_program_is_not_dumpable_once_it_says_so(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "from activation.procctl import make_undumpable, is_dumpable;"
        "before = is_dumpable(); assert make_undumpable(); print(before, is_dumpable())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]
    assert is_dumpable()  # this test process is untouched
