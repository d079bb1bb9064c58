"""The spool's JSON codec: which values activation carries, and bytes to values and back, never a crash.

Python's json module accepts more than activation can carry onward: lone surrogates
(``"\\ud800"`` decodes to a str that no UTF-8 write or exec can take; the error is
UnicodeEncodeError, not OSError), NaN and Infinity (also from ``1e400``; not JSON to any other
reader), integers past the int-str digit limit (a ValueError, not a JSONDecodeError) and nesting
deep enough to raise RecursionError. `loads` turns every one of those into `Uncarryable`, a
ValueError with a one-line detail that names where the value is; a text it returns can be
written, echoed into a result, put in argv and printed. `encode` never raises on what `loads`
returned, and at worst ValueError (never UnicodeEncodeError) on what `read` returned. Tasks, API
bodies and the agent's envelope go through `loads`; the spool's own records through `read`,
which raises nothing but OSError or ValueError, whatever a file holds.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

# Deeper than this is refused. It leaves room, below Python's recursion limit, for the levels a
# result or a dead-letter record adds around a task and for the stack of whoever writes it.
MAX_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
_PATH_KEY = 40  # characters of a key shown in a detail


class Uncarryable(ValueError):
    """JSON (or nearly) that activation cannot carry faithfully; ``detail`` says what and where."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _constant(name: str) -> Any:
    raise Uncarryable(f"{name} is not a JSON number")


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise Uncarryable(f"the number {text[:40]} is out of range")
    return value


def loads(data: bytes | str, *, surrogates: str = "reject") -> Any:
    """Parse JSON that activation can carry; raises JSONDecodeError or Uncarryable (both ValueError).

    ``surrogates="replace"`` puts U+FFFD in place of each lone surrogate instead of refusing
    it, as decoding the agent's raw output does with bytes that are not UTF-8.
    """
    text = data if isinstance(data, str) else data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    try:
        value = json.loads(text, parse_constant=_constant, parse_float=_float)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise Uncarryable(f"nested deeper than {MAX_DEPTH} levels") from None
    except Uncarryable:
        raise
    except ValueError as exc:  # the int-str conversion limit
        raise Uncarryable(f"a number too long to read ({str(exc).split(':')[0]})") from None
    deep = text.count("[") + text.count("{") > MAX_DEPTH  # cheap: most tasks have a few brackets
    # In text decoded from UTF-8 a surrogate only ever comes from an escape; a str may hold one.
    strings = "\\u" in text or (isinstance(data, str) and not text.isascii())
    if deep or strings:
        value = _check(value, replace=surrogates == "replace")
    return value


def _check(value: Any, *, replace: bool) -> Any:
    """Walk ``value`` without recursion: refuse what is too deep, refuse or replace lone surrogates."""
    stack: list[tuple[Any, int, tuple[object, ...]]] = [(value, 1, ())]
    fixed = False
    while stack:
        item, depth, path = stack.pop()
        if isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise Uncarryable(f"nested deeper than {MAX_DEPTH} levels at {describe_path(path)}")
            pairs = item.items() if isinstance(item, dict) else enumerate(item)
            for key, child in pairs:
                if isinstance(key, str) and _SURROGATE.search(key):
                    if not replace:
                        raise Uncarryable(
                            f"the key {describe_path((*path, key))} is not valid Unicode (a lone surrogate)"
                        )
                    fixed = True
                stack.append((child, depth + 1, (*path, key)))
        elif isinstance(item, str) and not item.isascii() and _SURROGATE.search(item):
            if not replace:
                raise Uncarryable(f"{describe_path(path)} is not valid Unicode (a lone surrogate)")
            fixed = True
    return _repaired(value) if fixed else value


def _repaired(value: Any) -> Any:
    """A copy of ``value`` (already known to be within MAX_DEPTH) with lone surrogates replaced."""
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_repaired(v) for v in value]
    if isinstance(value, dict):
        return {_repaired(k): _repaired(v) for k, v in value.items()}
    return value


def describe_path(path: tuple[object, ...]) -> str:
    """``metadata.note[3]``, printable whatever the keys hold."""
    if not path:
        return "the top level"
    text = ""
    for key in path:
        if isinstance(key, int):
            text += f"[{key}]"
        else:
            shown = ascii(str(key)[:_PATH_KEY])[1:-1]
            text += f".{shown}" if text else shown
    return text


def encode(obj: Any, *, indent: int | None = None, default: Any = None) -> bytes:
    """``obj`` as UTF-8 JSON plus a newline. A lone surrogate is written as its ``\\uXXXX`` escape.

    Raises ValueError (never RecursionError or UnicodeEncodeError) for what no JSON can hold.
    """
    try:
        text = json.dumps(obj, ensure_ascii=False, indent=indent, default=default)
    except RecursionError:
        raise ValueError("nested too deeply to write as JSON") from None
    try:
        return (text + "\n").encode("utf-8")
    except UnicodeEncodeError:  # only a lone surrogate gets here: escaped, it round-trips exactly
        return (json.dumps(obj, ensure_ascii=True, indent=indent, default=default) + "\n").encode("ascii")


def encode_text(obj: Any, *, indent: int | None = None, default: Any = None) -> str:
    """`encode`, as text that any stream can print."""
    return encode(obj, indent=indent, default=default).decode("utf-8").rstrip("\n")


def read(path: Path) -> Any:
    """A JSON file of the spool's own; raises only OSError or ValueError, whatever the file holds."""
    with open(path, "rb") as handle:
        data = handle.read()
    try:
        return json.loads(data)
    except RecursionError:
        raise ValueError(f"{path.name}: nested too deeply") from None
