"""The one validator of what others tell the listener: a task id, or a path inside this inbox.

Redis messages (and anything else that names a task from outside) pass through `vet_message`;
a path is accepted only when it resolves inside the inbox, so a message can never point the
listener anywhere else. Refusals carry a reason, the label of listener_refused_total.
"""

from __future__ import annotations

import os
from pathlib import Path

from activation.spool.task import TASK_SUFFIX, is_task_name, is_valid_task_id, task_id_of

MAX_MESSAGE_BYTES = 4096  # a task id or an inbox path; anything longer is hostile

# Why a message was refused (the `reason` label of listener_refused_total).
TOO_LARGE = "too_large"
NOT_UTF8 = "not_utf8"
EMPTY = "empty"
RELATIVE_PATH = "relative_path"
PARENT_REFERENCE = "parent_reference"
OUTSIDE_INBOX = "outside_inbox"
INVALID_NAME = "invalid_name"



def _inbox_name(ref: str, inbox: Path) -> str | None:
    """The inbox file name that a foreign reference (a task id or a path) names, or None.

    For sources that are told about tasks by others (Redis): a path is accepted only when it
    resolves inside ``inbox``, so a message can never point the listener anywhere else.
    """
    if not ref or "\x00" in ref:
        return None
    if "/" in ref:
        path = Path(ref)
        if not path.is_absolute():
            return None
        try:
            # The same string resolves the same way: realpath (two walks of the path) only when
            # the publisher spelled the folder differently.
            inside = str(path.parent) == str(inbox) or os.path.realpath(path.parent) == os.path.realpath(inbox)
        except (OSError, ValueError):
            return None
        name = path.name
        return name if inside and is_task_name(name) and is_valid_task_id(task_id_of(name)) else None
    if ref.endswith(TASK_SUFFIX):
        return ref if is_task_name(ref) and is_valid_task_id(task_id_of(ref)) else None
    return ref + TASK_SUFFIX if is_valid_task_id(ref) else None


def vet_message(data: bytes, inbox: Path) -> tuple[str | None, str | None]:
    """``(inbox file name, None)`` for an acceptable message, else ``(None, refusal reason)``.

    Accepted: a task id, ``<task_id>.json``, or an absolute path whose folder resolves (realpath)
    to ``inbox``. A path with a ``..`` component is refused even when it would resolve inside:
    no honest publisher writes one.
    """
    if len(data) > MAX_MESSAGE_BYTES:
        return None, TOO_LARGE
    try:
        text = data.decode("utf-8").strip()  # a trailing newline from `echo | redis-cli -x` is fine
    except UnicodeDecodeError:
        return None, NOT_UTF8
    if not text:
        return None, EMPTY
    if "/" in text:
        if not text.startswith("/"):
            return None, RELATIVE_PATH
        if ".." in text.split("/"):
            return None, PARENT_REFERENCE
    name = _inbox_name(text, inbox)
    if name is not None:
        return name, None
    if "/" not in text:
        return None, INVALID_NAME
    base = text.rsplit("/", 1)[1]
    if not (is_task_name(base) and is_valid_task_id(task_id_of(base))):
        return None, INVALID_NAME
    return None, OUTSIDE_INBOX  # a good name in the wrong folder (or behind a symlink)
