"""`activation dispatch` in streams mode, refused where it would deliver a task twice."""

from __future__ import annotations

from click.testing import CliRunner

from activation.cli import main
from activation.spool.layout import Spool


def test_dispatch_on_a_workers_own_spool_in_streams_mode_is_refused_and_writes_nothing(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.init(["marie"])
    env = {
        "ACTIVATION_SPOOL": str(spool.root),
        "ACTIVATION_TRANSPORT": "streams",
        "REDIS_URL": "redis://127.0.0.1:1/0",  # never reached: the refusal comes first
        "WORKER_NAME": "marie",
    }
    done = CliRunner().invoke(main, ["dispatch", "marie", "hello"], env=env)
    assert done.exit_code == 1
    assert "this is worker marie's own spool" in done.output
    assert spool.inbox_names("marie") == []


def test_a_forced_transport_in_streams_mode_is_a_usage_error(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.init(["marie"])
    env = {"ACTIVATION_SPOOL": str(spool.root), "ACTIVATION_TRANSPORT": "streams", "REDIS_URL": "redis://127.0.0.1:1/0"}
    done = CliRunner().invoke(main, ["dispatch", "marie", "hello", "--transport", "events"], env=env)
    assert done.exit_code == 2
    assert "ACTIVATION_TRANSPORT=streams sends every task by stream" in done.output
    assert spool.inbox_names("marie") == []
