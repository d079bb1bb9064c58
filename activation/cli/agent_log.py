"""Rendering a task log for `activation logs`: Claude Code's ``--output-format stream-json`` events
made readable, anything else passed through unchanged.

One line in, zero or more lines out. An event is shown as the operator wants it: the assistant's
text, each tool call with its arguments, each tool result shortened, and at the end the cost, the
tokens and the time. A line that is not a JSON event (plain output, stderr, a line too long to be
worth parsing, invalid UTF-8, JSON nested past spool.codec's limit) is printed as it came, so a
hostile agent can garble its own log, never crash the reader.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import click

from activation.spool import codec

PARSE_LIMIT = 1024 * 1024  # a longer line is shown raw, not parsed
TEXT_LIMIT = 2000  # characters of one assistant text shown
ARGS_LIMIT = 300  # characters of a tool call's arguments
RESULT_LIMIT = 300  # characters of a tool result
RAW_LIMIT = 4000  # characters of one raw line shown


@dataclass(frozen=True)
class Line:
    text: str
    style: str = ""  # "", "text", "tool", "result", "error", "meta"


_COLOURS = {
    "tool": {"fg": "cyan"},
    "result": {"dim": True},
    "error": {"fg": "red", "bold": True},
    "meta": {"fg": "magenta"},
}


def styled(line: Line) -> str:
    """The line with its colour; click.echo drops colours when stdout is not a terminal."""
    colour = _COLOURS.get(line.style)
    return click.style(line.text, **colour) if colour else line.text  # type: ignore[arg-type]


def shorten(text: str, limit: int) -> str:
    text = text.replace("\r", "")
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more characters)"


def render_line(raw: bytes) -> list[Line]:
    """One log line (without or with its newline) as the lines to print."""
    text = raw.rstrip(b"\r\n").decode("utf-8", errors="replace")
    if len(raw) > PARSE_LIMIT or not text.lstrip().startswith("{"):
        return [Line(shorten(text, RAW_LIMIT) if len(raw) > PARSE_LIMIT else text)]
    try:
        event = codec.loads(text, surrogates="replace")
    except (ValueError, RecursionError):
        return [Line(text)]
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        return [Line(text)]
    try:
        lines = _render_event(event)
    except Exception:  # an event shaped like no other: show it as it came
        return [Line(text)]
    return lines if lines is not None else [Line(text)]


def _render_event(event: dict[str, Any]) -> list[Line] | None:
    kind = event["type"]
    if kind == "system":
        return _system(event)
    if kind in ("assistant", "user"):
        message = event.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            return [Line(shorten(content, TEXT_LIMIT), "text" if kind == "assistant" else "result")]
        if not isinstance(content, list):
            return None
        lines: list[Line] = []
        for block in content:
            if isinstance(block, dict):
                lines += _block(block)
        return lines
    if kind == "result":
        return _result(event)
    return None


def _system(event: dict[str, Any]) -> list[Line]:
    if event.get("subtype") != "init":
        return [Line(f"── system {_str(event.get('subtype'))}", "meta")]
    parts = [f"session {_str(event.get('session_id'))}"]
    if event.get("model"):
        parts.append(f"model {_str(event.get('model'))}")
    if event.get("cwd"):
        parts.append(f"in {_str(event.get('cwd'))}")
    tools = event.get("tools")
    if isinstance(tools, list):
        parts.append(f"{len(tools)} tools")
    return [Line("── " + " · ".join(parts), "meta")]


def _block(block: dict[str, Any]) -> list[Line]:
    kind = block.get("type")
    if kind == "text":
        return [Line(shorten(_str(block.get("text")), TEXT_LIMIT), "text")]
    if kind == "thinking":
        return [Line("(thinking) " + shorten(_str(block.get("thinking")), RESULT_LIMIT), "result")]
    if kind == "tool_use":
        args = block.get("input")
        shown = codec.encode_text(args) if args is not None else ""
        return [Line(f"→ {_str(block.get('name'))} {shorten(shown, ARGS_LIMIT)}".rstrip(), "tool")]
    if kind == "tool_result":
        body = _tool_text(block.get("content"))
        failed = block.get("is_error") is True
        first = "✗ " if failed else "← "
        return [Line(first + shorten(body, RESULT_LIMIT).replace("\n", "\n  "), "error" if failed else "result")]
    return [Line(f"[{_str(kind)}]", "meta")]


def _tool_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [_str(part.get("text")) for part in content if isinstance(part, dict) and part.get("type") == "text"]
        others = sum(1 for part in content if not (isinstance(part, dict) and part.get("type") == "text"))
        return "\n".join(texts) + (f" [+{others} non-text part(s)]" if others else "")
    return "" if content is None else codec.encode_text(content)


def _result(event: dict[str, Any]) -> list[Line]:
    failed = event.get("is_error") is True
    parts = [("failed" if failed else "done") + f" ({_str(event.get('subtype'))})"]
    duration = _number(event.get("duration_ms"))
    if duration is not None:
        parts.append(f"{duration / 1000:.1f} s")
    turns = _number(event.get("num_turns"))
    if turns is not None:
        parts.append(f"{turns:g} turns")
    cost = _number(event.get("total_cost_usd"))
    if cost is not None:
        parts.append(f"${cost:.4f}")
    usage = event.get("usage")
    if isinstance(usage, dict):
        tokens = []
        for key, name in (
            ("input_tokens", "in"),
            ("output_tokens", "out"),
            ("cache_read_input_tokens", "cache read"),
            ("cache_creation_input_tokens", "cache write"),
        ):
            value = _number(usage.get(key))
            if value is not None:
                tokens.append(f"{name} {value:g}")
        if tokens:
            parts.append("tokens " + ", ".join(tokens))
    lines = [Line("── " + " · ".join(parts), "error" if failed else "meta")]
    if failed and event.get("result"):
        lines.append(Line(shorten(_str(event.get("result")), TEXT_LIMIT), "error"))
    return lines


def _str(value: Any) -> str:
    if value is None:
        return "?"
    return value if isinstance(value, str) else codec.encode_text(value)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if value == value and abs(value) != float("inf") else None


class LineSplitter:
    """Bytes in, whole lines out; a partial last line waits for the rest (or for ``flush``)."""

    def __init__(self) -> None:
        self._pending = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._pending += data
        end = self._pending.rfind(b"\n") + 1
        if end == 0:
            if len(self._pending) <= PARSE_LIMIT:
                return []
            end = len(self._pending)  # a line without end: show it in pieces rather than hold it all
        lines = bytes(self._pending[:end]).splitlines(keepends=True)
        del self._pending[:end]
        return lines

    def flush(self) -> list[bytes]:
        rest = bytes(self._pending)
        self._pending.clear()
        return [rest] if rest else []
