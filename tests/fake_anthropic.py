"""A loopback fake of the Anthropic Messages API, enough for the real ``claude -p`` to run against it.

It answers ``POST /v1/messages`` (server-sent events when ``stream`` is true, one JSON message
otherwise), ``count_tokens``, the model listing, and anything else Claude Code probes with something
harmless. What each messages request gets is scriptable (a reply text, an HTTP error, a delay), and
every request is recorded. Point claude at it with ``ANTHROPIC_BASE_URL=fake.url``.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_REPLY = "Hello from the fake Anthropic API."
MODEL_IDS = ("claude-opus-4-1", "claude-sonnet-4-5", "claude-haiku-4-5")

# HTTP status -> the error type the real API names in its error body.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


@dataclass(frozen=True)
class Behaviour:
    """What one messages request gets.

    ``tool`` answers with one ``tool_use`` block (``stop_reason: tool_use``) instead of text, so
    the client runs that tool and comes back with its result. ``status`` other than 200 answers
    with the API's error body; ``retry`` is sent as the ``x-should-retry`` header (the Anthropic
    SDK obeys it), so ``retry=False`` makes a client fail at once instead of backing off.
    ``delay`` holds the response open that long before answering (for a stream: after the
    headers and ``message_start``, as a slow model would).
    """

    text: str = DEFAULT_REPLY
    status: int = 200
    message: str = "fake API error"
    retry: bool | None = None
    delay: float = 0.0
    tool: tuple[str, dict[str, Any]] | None = None  # answer with this tool_use (name, input) instead of text


def reply(text: str = DEFAULT_REPLY) -> Behaviour:
    return Behaviour(text=text)


def error(status: int = 500, message: str = "fake API error", *, retry: bool | None = False) -> Behaviour:
    return Behaviour(status=status, message=message, retry=retry)


def slow(seconds: float, text: str = DEFAULT_REPLY) -> Behaviour:
    return Behaviour(text=text, delay=seconds)


def tool_use(name: str, **tool_input: Any) -> Behaviour:
    return Behaviour(tool=(name, tool_input))


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body, the raw text when it is not JSON, or None
    at: float = field(default_factory=time.monotonic)

    @property
    def is_messages(self) -> bool:
        return self.method == "POST" and self.path.split("?")[0] == "/v1/messages"

    @property
    def prompt(self) -> str:
        """The text of the latest user message (empty for other requests).

        Only the latest: a follow-up request repeats the whole conversation, and a marker in the
        first prompt must not match the request that carries a tool's result.
        """
        messages = self.body.get("messages") if isinstance(self.body, dict) else None
        users = [m for m in messages or [] if isinstance(m, dict) and m.get("role") == "user"]
        if not users:
            return ""
        content = users[-1].get("content")
        if isinstance(content, str):
            return content
        if isinstance(content, list):
            return "\n".join(str(b.get("text", "")) for b in content if isinstance(b, dict))
        return ""


class FakeAnthropic:
    """The server: ``start()``, ``url``, ``stop()``; script it with ``on``, ``push`` and ``default``.

    A messages request gets the behaviour of the first ``on(marker, …)`` whose marker occurs in its
    prompt, else the next one ``push``ed, else ``default``.
    """

    def __init__(self, default: Behaviour | None = None, host: str = "127.0.0.1") -> None:
        self.default = default or Behaviour()
        self.host = host
        self.requests: list[RecordedRequest] = []
        self._rules: list[tuple[str, Behaviour]] = []
        self._queue: deque[Behaviour] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._connections: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> FakeAnthropic:
        self._stopping.clear()
        self._server = _Server((self.host, 0), _Handler, self)
        # Daemon threads, all joined by stop(): a test that forgets stop() fails the leak check
        # instead of hanging the interpreter's exit.
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="fake-anthropic", daemon=True
        )
        self._thread.start()
        return self

    @property
    def port(self) -> int:
        assert self._server is not None, "not started"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        """Stop serving, cut open connections, release held responses, and join every thread."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        with self._lock:
            connections = list(self._connections)
        for conn in connections:  # idle keep-alive connections would hold their threads forever
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        server.server_close()
        thread.join(5)
        for handler in server.handler_threads():
            handler.join(5)
        self._server = self._thread = None

    def __enter__(self) -> FakeAnthropic:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- scripting ----------------------------------------------------------------------------

    def on(self, marker: str, behaviour: Behaviour) -> None:
        """Every messages request whose prompt contains ``marker`` gets ``behaviour``."""
        with self._lock:
            self._rules.append((marker, behaviour))

    def push(self, *behaviours: Behaviour) -> None:
        """The next messages requests (without a matching marker) get these, in order."""
        with self._lock:
            self._queue.extend(behaviours)

    def behaviour_for(self, request: RecordedRequest) -> Behaviour:
        prompt = request.prompt
        with self._lock:
            for marker, behaviour in self._rules:
                if marker in prompt:
                    return behaviour
            return self._queue.popleft() if self._queue else self.default

    # -- looking ------------------------------------------------------------------------------

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def messages(self, marker: str = "") -> list[RecordedRequest]:
        """The messages requests received so far, optionally only those whose prompt has ``marker``."""
        with self._lock:
            return [r for r in self.requests if r.is_messages and marker in r.prompt]

    def paths(self) -> list[str]:
        with self._lock:
            return [f"{r.method} {r.path}" for r in self.requests]

    def wait_stopping(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when the server is stopping (so held responses end)."""
        return self._stopping.wait(seconds)

    def track(self, conn: socket.socket, alive: bool) -> None:
        with self._lock:
            if alive:
                self._connections.add(conn)
            else:
                self._connections.discard(conn)


class _Server(ThreadingHTTPServer):
    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeAnthropic) -> None:
        self.fake = fake
        self._handlers: list[threading.Thread] = []
        self._handlers_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        # One daemon thread per connection, remembered so that FakeAnthropic.stop() can join it.
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), name="fake-anthropic-conn", daemon=True
        )
        with self._handlers_lock:
            self._handlers = [t for t in self._handlers if t.is_alive()]
            self._handlers.append(thread)
        thread.start()

    def handler_threads(self) -> list[threading.Thread]:
        with self._handlers_lock:
            return list(self._handlers)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client killed mid-request (a task timeout) is expected here, not worth a traceback.
        import sys

        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the SDK expects
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.server.fake.track(self.connection, True)

    def finish(self) -> None:
        self.server.fake.track(self.connection, False)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # quiet: requests are recorded instead
        pass

    # -- dispatch -----------------------------------------------------------------------------

    def _record(self) -> RecordedRequest:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode(errors="replace")
        request = RecordedRequest(self.command, self.path, dict(self.headers.items()), body)
        self.server.fake.record(request)
        return request

    def do_HEAD(self) -> None:
        self._record()
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        request = self._record()
        if request.path.split("?")[0] == "/v1/models":
            created = "2025-01-01T00:00:00Z"
            data = [{"type": "model", "id": m, "display_name": m, "created_at": created} for m in MODEL_IDS]
            self._json(200, {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]})
        else:
            self._json(200, {})

    def do_POST(self) -> None:
        request = self._record()
        path = request.path.split("?")[0]
        if path == "/v1/messages/count_tokens":
            self._json(200, {"input_tokens": max(1, len(json.dumps(request.body)) // 4)})
        elif path == "/v1/messages":
            self._messages(request)
        else:  # telemetry, event logging and the like: accept and forget
            self._json(200, {})

    # -- answers ------------------------------------------------------------------------------

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.send_header("request-id", "req_fake")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _messages(self, request: RecordedRequest) -> None:
        fake = self.server.fake
        behaviour = fake.behaviour_for(request)
        body = request.body if isinstance(request.body, dict) else {}
        model = str(body.get("model") or MODEL_IDS[0])
        if behaviour.status != 200:
            if behaviour.delay and fake.wait_stopping(behaviour.delay):
                return
            headers = {} if behaviour.retry is None else {"x-should-retry": str(behaviour.retry).lower()}
            kind = ERROR_TYPES.get(behaviour.status, "api_error")
            error = {"type": "error", "error": {"type": kind, "message": behaviour.message}}
            self._json(behaviour.status, error, headers)
            return
        usage = {"input_tokens": 10, "output_tokens": max(1, len(behaviour.text.split()))}
        if behaviour.tool is not None:
            name, tool_input = behaviour.tool
            block: dict[str, Any] = {"type": "tool_use", "id": f"toolu_fake_{len(fake.requests)}", "name": name}
            delta = {"type": "input_json_delta", "partial_json": json.dumps(tool_input)}
            full = {**block, "input": tool_input}
            block["input"] = {}
            stop_reason = "tool_use"
        else:
            block = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": behaviour.text}
            full = {"type": "text", "text": behaviour.text}
            stop_reason = "end_turn"
        message: dict[str, Any] = {
            "id": f"msg_fake_{len(fake.requests)}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 1},
        }
        if not body.get("stream"):
            if behaviour.delay and fake.wait_stopping(behaviour.delay):
                return
            self._json(200, {**message, "content": [full], "stop_reason": stop_reason, "usage": usage})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("request-id", "req_fake")
        self.send_header("connection", "close")  # the stream ends with the connection
        self.end_headers()
        self.close_connection = True
        try:
            self._event("message_start", {"type": "message_start", "message": message})
            if behaviour.delay and fake.wait_stopping(behaviour.delay):
                return
            self._event("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
            self._event("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            self._event("content_block_stop", {"type": "content_block_stop", "index": 0})
            end = {"stop_reason": stop_reason, "stop_sequence": None}
            self._event("message_delta", {"type": "message_delta", "delta": end, "usage": usage})
            self._event("message_stop", {"type": "message_stop"})
        except OSError:  # the client went away (killed at a timeout): nothing to answer
            return

    def _event(self, name: str, data: dict[str, Any]) -> None:
        self.wfile.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
        self.wfile.flush()


def main() -> None:
    """Run the fake by hand: ``python -m tests.fake_anthropic [reply text]``; logs each request."""
    import sys

    fake = FakeAnthropic(reply(" ".join(sys.argv[1:]) or DEFAULT_REPLY)).start()
    print(f"ANTHROPIC_BASE_URL={fake.url}", flush=True)
    seen = 0
    try:
        while True:
            time.sleep(0.2)
            paths = fake.paths()
            for path in paths[seen:]:
                print(path, flush=True)
            seen = len(paths)
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()


if __name__ == "__main__":
    main()
