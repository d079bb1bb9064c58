"""What a worker program imports in files mode: redis (with asyncio, about 9 MB of every idle
process) only where Redis is configured. The idle tree's memory is a target (issue 15); this
keeps the import graph from growing it back unnoticed."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys, tempfile, pathlib
from activation.observability.multiprocess import enable_multiprocess
enable_multiprocess(pathlib.Path(tempfile.mkdtemp()))
from activation.config import load_settings
import activation.worker.{module} as program
settings = load_settings({{"WORKER_NAME": "w1", "ACTIVATION_SPOOL": sys.argv[1], "ACTIVATION_RUN_DIR": sys.argv[2],
                          "ACTIVATION_METRICS_PORT": "0"}})
program.{cls}(settings)
print(json.dumps(sorted(m for m in ("redis", "asyncio") if m in sys.modules)))
"""


@pytest.mark.parametrize(
    ("module", "cls"), [("listener", "Listener"), ("executor", "Executor"), ("heartbeat", "Heartbeat")]
)
def test_a_files_mode_program_does_not_import_redis(module: str, cls: str, tmp_path) -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(module=module, cls=cls), str(tmp_path / "spool"), str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
