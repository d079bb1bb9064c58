import json
import os

import pytest

from activation.errors import BadTask, NotReady
from activation.spool.task import MAX_TASK_BYTES, is_task_name, load_task, parse_task


def write(path, data):
    path.write_bytes(data if isinstance(data, bytes) else json.dumps(data).encode())
    return path


def test_a_valid_task_keeps_unknown_fields(tmp_path):
    task = load_task(write(tmp_path / "t-1.json", {"task_id": "t-1", "description": "go", "colour": "blue"}))
    assert task == {"task_id": "t-1", "description": "go", "colour": "blue"}


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("corrupt.json", b'{"task_id": "corrupt", "desc', "invalid_json"),
        ("list.json", b"[1, 2]", "not_an_object"),
        ("missing.json", {"task_id": "missing"}, "missing_field"),
        ("typed.json", {"task_id": "typed", "description": ["x"]}, "invalid_field"),
        ("blank.json", {"task_id": "blank", "description": "   "}, "invalid_field"),
        ("numid.json", {"task_id": 7, "description": "x"}, "invalid_field"),
        ("mismatch.json", {"task_id": "other", "description": "x"}, "id_mismatch"),
        ("traversal.json", {"task_id": "../../etc/passwd", "description": "x"}, "invalid_task_id"),
        ("-dash.json", {"task_id": "-dash", "description": "x"}, "invalid_task_id"),
        ("latin.json", '{"task_id": "latin", "description": "caf\u00e9"}'.encode("latin-1"), "not_utf8"),
        ("neg.json", {"task_id": "neg", "description": "x", "timeout": -1}, "invalid_field"),
        ("booltimeout.json", {"task_id": "booltimeout", "description": "x", "timeout": True}, "invalid_field"),
        ("meta.json", {"task_id": "meta", "description": "x", "metadata": "no"}, "invalid_field"),
        ("attempts.json", {"task_id": "attempts", "description": "x", "attempts": "2"}, "invalid_field"),
    ],
)
def test_each_bad_task_has_its_reason(tmp_path, name, content, reason):
    with pytest.raises(BadTask) as caught:
        load_task(write(tmp_path / name, content))
    assert caught.value.reason == reason
    assert "\n" not in caught.value.detail


def test_too_large(tmp_path):
    path = write(tmp_path / "big.json", b'{"task_id": "big", "description": "' + b"x" * MAX_TASK_BYTES + b'"}')
    with pytest.raises(BadTask) as caught:
        load_task(path)
    assert caught.value.reason == "too_large"


def test_symlink_and_folder(tmp_path):
    target = write(tmp_path / "target", {"task_id": "link", "description": "x"})
    os.symlink(target, tmp_path / "link.json")
    with pytest.raises(BadTask) as caught:
        load_task(tmp_path / "link.json")
    assert caught.value.reason == "symlink"
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(BadTask) as caught:
        load_task(tmp_path / "folder.json")
    assert caught.value.reason == "not_a_file"


def test_timeout_above_the_maximum(tmp_path):
    with pytest.raises(BadTask, match="exceeds the worker's maximum"):
        load_task(write(tmp_path / "t.json", {"task_id": "t", "description": "x", "timeout": 99}), max_timeout=10)


def test_an_empty_file_is_not_ready_rather_than_bad():
    with pytest.raises(NotReady):
        parse_task(b"", "x")


def test_dot_files_are_never_tasks():
    assert is_task_name("a.json")
    assert not is_task_name(".tmp_a.json")
    assert not is_task_name("a.json.part")
