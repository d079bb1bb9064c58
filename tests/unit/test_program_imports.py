"""What a worker program imports in files mode: redis (with asyncio, about 9 MB of every idle
process) only where Redis is configured, and never prometheus_client (about 12 MB): the heartbeat
writes the exposition format itself (observability/metrics.py). The idle tree's memory is a
target (issue 15); this keeps the import graph from growing it back unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys, tempfile, pathlib
from activation.observability.samples import record_to
record_to(pathlib.Path(tempfile.mkdtemp()), "{module}")
from activation.config import load_settings
import activation.worker.{module} as program
settings = load_settings({{"WORKER_NAME": "w1", "ACTIVATION_SPOOL": sys.argv[1], "ACTIVATION_RUN_DIR": sys.argv[2],
                          "ACTIVATION_METRICS_PORT": "0"}})
program.{cls}(settings)
import activation.observability.metrics  # what the heartbeat serves /metrics with
print(json.dumps(sorted(m for m in ("redis", "asyncio", "prometheus_client") if m in sys.modules)))
"""

PROGRAMS = [("listener", "Listener"), ("executor", "Executor"), ("heartbeat", "Heartbeat")]


def imported(module: str, cls: str, tmp_path) -> list[str]:
    """Which of the heavy modules a program has loaded once it is built."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module, cls=cls), str(tmp_path / "spool"), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(("module", "cls"), PROGRAMS)
def test_a_files_mode_program_does_not_import_redis(module: str, cls: str, tmp_path) -> None:
    assert not {"redis", "asyncio"} & set(imported(module, cls, tmp_path))


@pytest.mark.parametrize(("module", "cls"), PROGRAMS)
def test_no_program_imports_prometheus_client(module: str, cls: str, tmp_path) -> None:
    """They record in observability/samples.py; the heartbeat serves /metrics without it too."""
    assert "prometheus_client" not in imported(module, cls, tmp_path)


ENTRY_PROBE = """
import json, sys
import click
from activation.cli import main
main.get_command(click.Context(main), "worker")
print(json.dumps(sorted(m for m in sys.argv[1:] if m in sys.modules)))
"""
OPERATOR_MODULES = ("activation.cli.admin", "activation.cli.tasks", "activation.cli.logs", "urllib.request", "rich")


def test_the_programs_entry_point_does_not_load_the_operator_commands() -> None:
    """Every program starts as `activation worker <program>`: the admin, tasks and logs commands (with
    urllib, ssl and rich, about 5 MB) load only when an operator runs them (support.Group's lazy)."""
    out = subprocess.run(
        [sys.executable, "-c", ENTRY_PROBE, *OPERATOR_MODULES], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == []


def test_every_lazy_command_resolves_to_its_name() -> None:
    import click

    from activation.cli import main

    ctx = click.Context(main)
    for name in main.lazy:
        command = main.get_command(ctx, name)
        assert command is not None and command.name == name


FAST_PATH_PROBE = """
import json, sys
sys.argv = ["activation", "worker", sys.argv[1]]
from activation.worker import entry
try:
    entry.main()
except SystemExit as exc:
    print(json.dumps([exc.code, sorted(m for m in ("click", "activation.cli") if m in sys.modules)]))
"""


@pytest.mark.parametrize("module", [p[0] for p in PROGRAMS])
def test_activation_worker_program_runs_without_click(module: str, tmp_path) -> None:
    """supervisord's command line, ``activation worker <program>``, skips click (about 3.5 MB of each
    program); its failures are still the CLI's one line and exit status (here: no WORKER_NAME)."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ACTIVATION_SPOOL": str(tmp_path / "spool")}
    out = subprocess.run(
        [sys.executable, "-c", FAST_PATH_PROBE, module], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == [2, []]
    assert out.stderr.startswith("activation: ") and out.stderr.count("\n") == 1, out.stderr
