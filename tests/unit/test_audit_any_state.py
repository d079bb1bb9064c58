"""Class 12 of issue 10: ``activation audit`` never raises, on any spool state our programs produce.

One spool gets every state the listener, the executor, the heartbeat, recovery and the dead
letter's retry leave behind, made by those programs' own code: dead letters of every reason
(with their ``.raw`` originals), two dead letters of one id, results with odd content, a result
with its leftover claim, a dead letter next to the file it was made from (a crash between the
two steps), a retry cut short, temp files in every folder (heartbeats half-written among them)
and heartbeats of a live and a stopped worker. ``audit`` then runs through the CLI, in process
and as the installed command, and reports exactly the violations that are there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from activation.cli import main
from activation.config import Settings, load_settings
from activation.orchestrator import recovery
from activation.orchestrator.liveness import LivenessWatch
from activation.spool import task as tasks
from activation.spool.atomic import atomic_write_json, read_json
from activation.spool.layout import Spool
from activation.worker.executor import Executor
from activation.worker.heartbeat import Heartbeat
from activation.worker.listener import Listener
from tests.harness import BIN, FAKE_AGENT

W = "w1"
GONE = "gone"  # a worker with no heartbeat: its tasks are orphans
STOPPED = "stopped1"
ALL_REASONS = {
    tasks.SYMLINK,
    tasks.NOT_A_FILE,
    tasks.TOO_LARGE,
    tasks.NOT_UTF8,
    tasks.INVALID_JSON,
    tasks.NOT_AN_OBJECT,
    tasks.MISSING_FIELD,
    tasks.INVALID_FIELD,
    tasks.INVALID_TASK_ID,
    tasks.ID_MISMATCH,
    tasks.DUPLICATE,
    tasks.UNENCODABLE,
    tasks.MAX_ATTEMPTS,
    tasks.ORPHANED,
}


def settings_for(root: Path, spool: Spool, worker: str = W) -> Settings:
    workdir = root / "agent"
    workdir.mkdir(exist_ok=True)
    agent = shlex.join([sys.executable, str(FAKE_AGENT), "--output-format", "json"]) + " -p -- {description}"
    return load_settings(
        env={},
        worker_name=worker,
        spool=spool.root,
        run_dir=root / f"run-{worker}",
        agent_command=agent,
        agent_workdir=workdir,
        metrics_port=0,
        kill_grace=0.2,
        settle_time=0.0,
        max_attempts=3,
    )


class Builder:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.spool = Spool(root / "spool")
        self.spool.init([W, GONE, STOPPED])
        self.settings = settings_for(root, self.spool)
        self.listener = Listener(self.settings, sources=[])
        self.executor = Executor(self.settings)
        self.stale: list[Path] = []  # temp files old enough to be violations

    def inbox(self, name: str, data: bytes | str) -> Path:
        path = self.spool.inbox(W) / name
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def examine(self, name: str | bytes) -> None:
        self.listener.notify(os.fsdecode(name), "rescan", complete=True)

    def run(self, task_id: str, text: str) -> None:
        self.inbox(f"{task_id}.json", text)
        self.examine(f"{task_id}.json")
        item = self.listener.work.take(self, 0)  # as the executor's get() over the queue socket
        assert item is not None and item.task_id == task_id, task_id
        assert self.executor.process(task_id) is not None, task_id
        self.listener.work.ack(self)

    def temp(self, folder: Path, name: str, data: str, *, stale: bool) -> None:
        path = folder / name
        path.write_text(data)
        if stale:
            os.utime(path, (time.time() - 3600, time.time() - 3600))
            self.stale.append(path)


def build_every_state(root: Path) -> Builder:
    b = Builder(root)
    spool = b.spool
    # Results with odd content.
    b.run("ok", json.dumps({"task_id": "ok", "description": "say hello"}))
    b.run("big", '{"task_id": "big", "description": "x", "metadata": {"n": ' + "9" * 4300 + "}}")
    b.run("deep", '{"task_id": "deep", "description": "x", "metadata": ' + '{"a":' * 63 + "0" + "}" * 63 + "}")
    b.run("dash", json.dumps({"task_id": "dash", "description": "--version"}))
    b.run("pair", '{"task_id": "pair", "description": "smile \\ud83d\\ude00", "metadata": {"k": "\\u00e9"}}')
    b.run("exit3", json.dumps({"task_id": "exit3", "description": "exit=3"}))
    b.run("flood", json.dumps({"task_id": "flood", "description": "flood=70000 flood-err=10"}))
    # The listener's dead letters, one per reason it gives.
    (root / "elsewhere.json").write_text("{}")
    os.symlink(root / "elsewhere.json", spool.inbox(W) / "sym.json")
    (spool.inbox(W) / "dir.json").mkdir()
    b.inbox("large.json", b" " * (tasks.MAX_TASK_BYTES + 1))
    b.inbox("latin.json", b'{"task_id": "latin", "description": "\xff"}')
    b.inbox("broken.json", "{")
    b.inbox("list.json", "[1, 2]")
    b.inbox("mf.json", '{"task_id": "mf"}')
    b.inbox("if.json", '{"task_id": "if", "description": 5}')
    b.inbox("bad name!.json", "{}")
    b.inbox(os.fsdecode(b"\xff\xfe.json"), "{}")  # a file name that is not UTF-8
    b.inbox("idm.json", '{"task_id": "other", "description": "x"}')
    b.inbox("ok.json", json.dumps({"task_id": "ok", "description": "again"}))  # duplicate
    b.inbox("sur.json", '{"task_id": "sur", "description": "\\ud800"}')
    b.inbox("twice.json", "{")
    for name in sorted(os.listdir(spool.inbox(W))):
        b.examine(name)
    b.inbox("twice.json", "[")  # the same id refused twice: two records
    b.examine("twice.json")
    # The executor's: a task that keeps stopping its executor (max_attempts) and a claim of one
    # whose result exists (a crash between result and claim removal: allowed).
    atomic_write_json(spool.claim_path(W, "crashy"), {"task_id": "crashy", "description": "x", "attempts": 2})
    b.executor.recover()
    shutil.copy(spool.result_path(W, "ok"), spool.claim_path(W, "ok"))
    # The orchestrator's: an orphan of a worker with no heartbeat.
    atomic_write_json(spool.task_path(GONE, "orphan"), {"task_id": "orphan", "description": "x"})
    recovery.recover_orphans(spool, GONE, orphan_age=-1, stopped_grace=0, watch=LivenessWatch(spool))
    # A dead letter cut short: the record is written, the file not yet moved (allowed).
    b.inbox("cut.json", '{"task_id": "cut", "description": 7}')
    b.examine("cut.json")
    b.inbox("cut.json", '{"task_id": "cut", "description": 7}')
    # A retry cut short: the task is back in the inbox, the record not yet removed (a duplicate).
    b.inbox("retried.json", '{"task_id": "retried", "description": 7}')
    b.examine("retried.json")
    record = spool.dead_letter_path("retried").read_bytes()
    recovery.retry_dead_letter(spool, "retried")
    spool.dead_letter_path("retried").write_bytes(record)
    # Heartbeats: a live worker's, a stopped worker's, and temp files of writers cut short.
    Heartbeat(b.settings).beat()
    Heartbeat(dataclasses.replace(b.settings, worker_name=STOPPED, run_dir=root / "run-stopped")).beat("stopped")
    b.temp(spool.heartbeats_dir, f".tmp_{W}.json.0badc0de", '{"worker": "w1", "epo', stale=True)
    b.temp(spool.heartbeats_dir, f".tmp_{W}.json.fresh000", '{"worker": "w1", "epoch": 1', stale=False)
    for folder in (spool.inbox(W), spool.processing(W), spool.results(W), spool.dead_letter_dir):
        b.temp(folder, ".tmp_half.json.12345678", '{"task_id": "half", "descr', stale=True)
        b.temp(folder, ".tmp_new.json.87654321", "", stale=False)
    return b


def expected_violations(b: Builder) -> list[dict[str, Any]]:
    return sorted(
        [{"kind": "duplicate", "task_id": "retried"}] + [{"kind": "stale_temp", "task_id": None} for _ in b.stale],
        key=lambda v: (v["kind"], v["task_id"] or ""),
    )


def test_audit_reports_every_state_our_programs_produce_and_never_raises(tmp_path: Path) -> None:
    b = build_every_state(tmp_path)
    reasons = {read_json(p)["reason"] for p in b.spool.dead_letters()}
    assert reasons == ALL_REASONS, ALL_REASONS ^ reasons  # every reason is there, made by our own code
    assert list(b.spool.dead_letter_dir.glob("*.raw")), "no raw originals"

    env = {"ACTIVATION_SPOOL": str(b.spool.root), "ACTIVATION_HEARTBEAT_TIMEOUT": "3600"}
    ran = CliRunner().invoke(main, ["audit", "--json"], env=env)
    assert ran.exit_code == 1, (ran.output, ran.exception)  # 1: violations, not a crash
    found = json.loads(ran.stdout)
    assert sorted(
        ({"kind": v["kind"], "task_id": v["task_id"]} for v in found), key=lambda v: (v["kind"], v["task_id"] or "")
    ) == expected_violations(b), found
    stale = sorted(v["detail"].split(" is ")[0] for v in found if v["kind"] == "stale_temp")
    assert stale == sorted(str(p) for p in b.stale)

    text = CliRunner().invoke(main, ["audit"], env=env)
    assert text.exit_code == 1 and f"audit: {len(found)} violation(s)" in text.output, text.output
    # Every other reader of the same spool answers too.
    for args in (["status"], ["status", "--json"], ["dlq", "list"], ["dlq", "list", "--json"], ["show", "ok"]):
        other = CliRunner().invoke(main, args, env=env)
        # status exits 1 for the unhealthy workers this spool has; nothing may raise.
        allowed = (0, 1) if args[0] == "status" else (0,)
        assert other.exit_code in allowed, (args, other.output, other.exception)
        assert other.exception is None or isinstance(other.exception, SystemExit), (args, other.exception)
    for letter in recovery.dead_letters(b.spool):
        for args in (["dlq", "show", letter.key], ["dlq", "show", letter.key, "--json"]):
            shown = CliRunner().invoke(main, args, env=env)
            assert shown.exit_code == 0, (args, shown.output, shown.exception)

    # And as the installed command: the process boundary a user touches.
    proc = subprocess.run(
        [str(BIN / "activation"), "audit", "--json"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [(v["kind"], v["task_id"]) for v in json.loads(proc.stdout)] == [(v["kind"], v["task_id"]) for v in found]


@pytest.mark.parametrize("broken", ["dead_letter_is_a_file", "results_is_a_file", "inbox_unreadable"])
def test_audit_reports_a_layout_it_cannot_read(tmp_path: Path, broken: str) -> None:
    spool = Spool(tmp_path / "spool")
    spool.init([W])
    atomic_write_json(spool.task_path(W, "a"), {"task_id": "a", "description": "x"})
    if broken == "dead_letter_is_a_file":
        spool.dead_letter_dir.rmdir()
        spool.dead_letter_dir.write_text("oops")
    elif broken == "results_is_a_file":
        spool.results(W).rmdir()
        spool.results(W).write_text("oops")
    else:
        if os.geteuid() == 0:
            pytest.skip("root reads any folder")
        spool.inbox(W).chmod(0)
    try:
        ran = CliRunner().invoke(main, ["audit", "--json"], env={"ACTIVATION_SPOOL": str(spool.root)})
    finally:
        spool.inbox(W).chmod(0o755)
    assert ran.exit_code == 1, (ran.output, ran.exception)
    kinds = {v["kind"] for v in json.loads(ran.stdout)}
    assert kinds == {"unreadable"}, ran.stdout
