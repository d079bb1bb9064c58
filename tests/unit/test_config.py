from pathlib import Path

import pytest

from activation.config import load_settings, redact_url
from activation.errors import ConfigError


def test_defaults_resolve_under_var_of_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = load_settings(env={"WORKER_NAME": "marie"})
    assert settings.spool == tmp_path / "var" / "spool"
    assert settings.run_dir == tmp_path / "var" / "run" / "marie"
    assert settings.mode == ("inotify",)
    assert settings.task_timeout == 600 and settings.drain_timeout == 45 and settings.max_attempts == 3


def test_every_value_is_parsed_and_typed():
    settings = load_settings(
        env={
            "ACTIVATION_SPOOL": "/srv/spool",
            "ACTIVATION_MODE": "poll, redis",
            "ACTIVATION_TASK_TIMEOUT": "12.5",
            "ACTIVATION_MAX_ATTEMPTS": "5",
            "FALLBACK_TO_FILES": "false",
            "ACTIVATION_LOG_LEVEL": "debug",
        }
    )
    assert settings.spool == Path("/srv/spool")
    assert settings.mode == ("poll", "redis")
    assert settings.task_timeout == 12.5
    assert settings.max_attempts == 5
    assert settings.fallback_to_files is False
    assert settings.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("ACTIVATION_TASK_TIMEOUT", "soon", "ACTIVATION_TASK_TIMEOUT: expected a number, got 'soon'"),
        ("ACTIVATION_MAX_ATTEMPTS", "0", "ACTIVATION_MAX_ATTEMPTS: must be at least 1"),
        ("ACTIVATION_MAX_ATTEMPTS", "2.5", "ACTIVATION_MAX_ATTEMPTS: expected an integer"),
        ("ACTIVATION_MODE", "carrier-pigeon", "ACTIVATION_MODE: expected a comma-separated set"),
        ("ACTIVATION_MODE", "inotify,poll", "choose inotify or poll"),
        ("WORKER_NAME", "../etc", "WORKER_NAME: expected letters"),
        ("FALLBACK_TO_FILES", "maybe", "FALLBACK_TO_FILES: expected true or false"),
        ("ACTIVATION_AGENT_COMMAND", "claude -p", "must contain {description}"),
        ("ACTIVATION_ADMIN_BIND", "8000", "ACTIVATION_ADMIN_BIND: expected HOST:PORT"),
        ("REDIS_URL", "http://x", "REDIS_URL: expected a redis://"),
    ],
)
def test_a_bad_value_is_a_one_line_error_naming_the_variable(variable, value, message):
    with pytest.raises(ConfigError) as caught:
        load_settings(env={variable: value})
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_redis_password_never_shows():
    assert redact_url("redis://user:s3cret@host:6379/2") == "redis://user:***@host:6379/2"
    assert redact_url("rediss://:s3cret@host") == "rediss://:***@host"
    assert redact_url("redis://host") == "redis://host"
    settings = load_settings(env={"REDIS_URL": "redis://:s3cret@h/0", "ACTIVATION_ADMIN_TOKEN": "t0ken"})
    assert "s3cret" not in repr(settings)
    assert "t0ken" not in repr(settings)
    with pytest.raises(ConfigError) as caught:
        load_settings(env={"REDIS_URL": "http://:s3cret@h"})
    assert "s3cret" not in str(caught.value)


def test_worker_programs_require_a_worker_name():
    with pytest.raises(ConfigError, match="WORKER_NAME: required"):
        load_settings(env={}).require_worker()
