"""The per-task agent log (spool.tasklog), its rendering (cli.agent_log), the stream-json envelope,
and the words `show` uses for a kill (cli.explain): the pieces of `activation logs` without a tree."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from activation.cli.agent_log import PARSE_LIMIT, LineSplitter, render_line
from activation.cli.explain import outcome_notes
from activation.spool import tasklog
from activation.spool.layout import Spool
from activation.spool.readers import BadRecord, result_record
from activation.worker.result_record import parse_envelope
from tests.conftest import WORKER

INIT = {"type": "system", "subtype": "init", "session_id": "s-1", "model": "opus", "cwd": "/w", "tools": ["Bash"]}
ASSISTANT = {
    "type": "assistant",
    "message": {
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "t1", "name": "Bash", "input": {"command": "ls -la"}},
        ]
    },
}
TOOL_RESULT = {
    "type": "user",
    "message": {"content": [{"type": "tool_result", "tool_use_id": "t1", "content": "a\nb" + "x" * 1000}]},
}
RESULT = {
    "type": "result",
    "subtype": "success",
    "is_error": False,
    "result": "done",
    "duration_ms": 12345,
    "num_turns": 3,
    "total_cost_usd": 0.0421,
    "usage": {"input_tokens": 1200, "output_tokens": 340, "cache_read_input_tokens": 9000},
}


def texts(event: object) -> list[str]:
    return [line.text for line in render_line(json.dumps(event).encode() + b"\n")]


# -- rendering ------------------------------------------------------------------------------------


def test_stream_json_events_render_as_text_tool_calls_results_and_cost() -> None:
    assert texts(INIT) == ["── session s-1 · model opus · in /w · 1 tools"]
    assert texts(ASSISTANT) == ["Let me look.", '→ Bash {"command": "ls -la"}']
    (shown,) = texts(TOOL_RESULT)
    assert shown.startswith("← a\n  b") and "more characters" in shown and len(shown) < 400
    assert texts(RESULT) == [
        "── done (success) · 12.3 s · 3 turns · $0.0421 · tokens in 1200, out 340, cache read 9000"
    ]


def test_a_failed_result_and_a_failed_tool_say_so() -> None:
    lines = render_line(json.dumps({**RESULT, "is_error": True, "result": "API error"}).encode())
    assert lines[0].text.startswith("── failed") and lines[0].style == "error" and lines[1].text == "API error"
    bad = {
        "type": "user",
        "message": {
            "content": [
                {"type": "tool_result", "content": [{"type": "text", "text": "no such file"}], "is_error": True}
            ]
        },
    }
    assert texts(bad) == ["✗ no such file"]


def test_plain_output_passes_through_unchanged() -> None:
    for line in ("hello world", "{not json", '{"no": "type"}', "[1, 2]", '{"type": "unknown_kind"}', ""):
        assert [out.text for out in render_line(line.encode() + b"\n")] == [line]


def test_hostile_lines_never_crash_the_renderer() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    nested = b'{"type": "assistant", "message": ' + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"}"
    huge = b'{"type": "assistant", "x": "' + b"y" * (PARSE_LIMIT + 10) + b'"}'
    for line in (deep, nested, huge, b"\xff\xfe\x80 not utf-8", b'{"type": "result", "usage": "\\ud800"}', b"\0\0"):
        out = render_line(line)
        assert out and all(isinstance(o.text, str) for o in out)
    assert len(render_line(huge)[0].text) < 5000  # shown shortened, not parsed


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000))
def test_any_bytes_render_to_some_lines(data: bytes) -> None:
    for line in LineSplitter().feed(data + b"\n"):
        assert all(isinstance(o.text, str) for o in render_line(line))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["system", "assistant", "user", "result", "other"]),
    st.dictionaries(
        st.sampled_from(
            [
                "message",
                "content",
                "usage",
                "subtype",
                "is_error",
                "total_cost_usd",
                "duration_ms",
                "num_turns",
                "session_id",
            ]
        ),
        json_values,
    ),
    st.lists(st.dictionaries(st.sampled_from(["type", "text", "name", "input", "content", "is_error"]), json_values)),
)
def test_any_event_shape_renders_without_raising(kind: str, fields: dict, blocks: list) -> None:
    for event in ({"type": kind, **fields}, {"type": kind, "message": {"content": blocks}}):
        out = render_line(json.dumps(event).encode())  # an empty message renders to no line at all
        assert isinstance(out, list) and all(isinstance(o.text, str) and isinstance(o.style, str) for o in out)


def test_the_splitter_holds_a_partial_line_until_it_ends() -> None:
    splitter = LineSplitter()
    assert splitter.feed(b'{"type": "sys') == []
    assert splitter.feed(b'tem"}\nnext') == [b'{"type": "system"}\n']
    assert splitter.flush() == [b"next"]


# -- the log file -----------------------------------------------------------------------------------


def test_the_log_keeps_each_streams_lines_whole(spool: Spool) -> None:
    log = tasklog.open_log(spool, WORKER, "t-1")
    log.write(0, b'{"type": "sys')
    log.write(1, b"warning: slow\n")
    log.write(0, b'tem"}\n')
    log.write(1, b"no newline at the end")
    log.close()
    path = tasklog.running_log_path(spool, WORKER, "t-1")
    assert path.read_bytes() == b'warning: slow\n{"type": "system"}\nno newline at the end\n'


def test_the_log_stops_at_its_limit_with_one_marker(spool: Spool) -> None:
    log = tasklog.TaskLog(tasklog.running_log_path(spool, WORKER, "flood"), limit=1000)
    for _ in range(100):
        log.write(0, b"x" * 99 + b"\n")
    log.close()
    data = tasklog.running_log_path(spool, WORKER, "flood").read_bytes()
    assert data.startswith(b"x" * 99) and data.count(b"stopped at its limit of 1000 bytes") == 1
    assert len(data) < 1200


def test_a_log_that_cannot_be_written_never_fails_the_run(tmp_path: Path, caplog) -> None:
    log = tasklog.TaskLog(tmp_path / "missing" / "t.log", task_id="t")
    log.write(0, b"anything\n")  # the file is made at the first output: here it cannot be
    assert not log.open
    log.write(0, b"more\n")
    log.close()
    assert caplog.text.count("cannot write its log") == 1


def test_a_run_that_prints_nothing_leaves_no_log_file(spool: Spool) -> None:
    quiet = tasklog.open_log(spool, WORKER, "quiet")
    quiet.close()
    assert not tasklog.running_log_path(spool, WORKER, "quiet").exists()
    tasklog.keep_log(spool, WORKER, "quiet")  # nothing to keep: no error
    assert tasklog.find_log(spool, WORKER, "quiet") is None


def test_a_new_attempt_writes_a_new_file(spool: Spool) -> None:
    first = tasklog.open_log(spool, WORKER, "again")
    first.write(0, b"first attempt\n")
    first.close()
    inode = os.stat(tasklog.running_log_path(spool, WORKER, "again")).st_ino
    with open(tasklog.running_log_path(spool, WORKER, "again"), "rb"):  # a follower holds the old one
        second = tasklog.open_log(spool, WORKER, "again")
        assert not tasklog.running_log_path(spool, WORKER, "again").exists()  # the old one is gone at once
        second.write(1, b"second attempt\n")
        second.close()
        assert os.stat(tasklog.running_log_path(spool, WORKER, "again")).st_ino != inode


# -- the envelope and the words of `show` ---------------------------------------------------------


def test_the_envelope_of_stream_json_is_its_last_result_event() -> None:
    stream = "\n".join(json.dumps(e) for e in (INIT, ASSISTANT, TOOL_RESULT, RESULT)) + "\n"
    assert parse_envelope(stream) == RESULT
    assert parse_envelope(json.dumps(RESULT)) == RESULT  # --output-format json: stdout is the envelope
    assert parse_envelope("partial line\n" + json.dumps(RESULT)) == RESULT  # a tail past the output limit
    assert parse_envelope(json.dumps(INIT) + "\n" + json.dumps(ASSISTANT)) is None
    assert parse_envelope("plain text") is None


def test_show_says_how_a_timeout_ended_and_that_output_was_cut() -> None:
    result = {
        "task_id": "long-1",
        "status": "timeout",
        "truncated": True,
        "stdout": "x" * 1024,
        "stdout_bytes": 5 * 1024 * 1024,
        "stderr": "",
        "stderr_bytes": 0,
        "output_limit": 1024,
        "kill": {"reason": "timeout", "timeout_s": 600.0, "kill_grace_s": 5.0, "signals": ["SIGINT", "SIGKILL"]},
    }
    assert outcome_notes(result) == [
        "timed out after 600 s: SIGINT, then SIGKILL after the 5 s grace",
        "output truncated: stdout 5.0 MiB, kept the first 1.0 KiB (`activation logs long-1` has more)",
    ]
    result.update(truncated=False, kill={**result["kill"], "signals": ["SIGINT"]})
    assert outcome_notes(result) == ["timed out after 600 s: SIGINT; the tree was gone within the 5 s grace"]


def test_show_says_who_cancelled_and_when() -> None:
    running = {
        "status": "cancelled",
        "cancelled": {"by": "cli", "at": "2026-12-01T18:00:00+00:00", "while": "running"},
        "kill": {"reason": "cancelled", "timeout_s": 60, "kill_grace_s": 2, "signals": ["SIGINT"]},
    }
    assert outcome_notes(running) == [
        "cancelled while running by cli at 2026-12-01T18:00:00+00:00: SIGINT; the tree was gone within the 2 s grace"
    ]
    assert outcome_notes({"status": "cancelled", "cancelled": {"while": "pending", "by": "api"}}) == [
        "cancelled while pending by api: it never ran"
    ]


@pytest.mark.parametrize("hostile", [None, "x", {"signals": "SIGKILL"}, {"signals": [1]}, {}, {"timeout_s": None}])
def test_show_survives_a_hostile_kill_record(hostile: object) -> None:
    """show reads the result through result_record: an ill-typed kill record is its one line, any
    other gives the words (tests/unit/test_hostile_records.py tries every shape)."""
    try:
        result = result_record({"task_id": "t1", "status": "timeout", "kill": hostile})
    except BadRecord as exc:
        assert str(exc).startswith(("result: kill", "result kill:")) and "\n" not in str(exc)
        return
    assert outcome_notes(result)[0].startswith("timed out")


def test_a_log_the_results_folder_refuses_stays_beside_the_claim_and_never_raises(spool: Spool, caplog) -> None:
    log = tasklog.open_log(spool, WORKER, "kept-1")
    log.write(0, b"output\n")
    log.close()
    results = spool.results(WORKER)
    results.rmdir()
    results.write_text("not a folder")  # what crashed the executor: NotADirectoryError from the rename
    assert tasklog.keep_log(spool, WORKER, "kept-1") is False
    assert tasklog.running_log_path(spool, WORKER, "kept-1").read_bytes() == b"output\n"
    assert "cannot keep its log" in caplog.text
    results.unlink()
    results.mkdir()
    assert tasklog.keep_log(spool, WORKER, "kept-1") is True  # the held result's retry moves it
    assert tasklog.finished_log_path(spool, WORKER, "kept-1").read_bytes() == b"output\n"
