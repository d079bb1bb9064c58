"""The orchestrator's admin HTTP API: routing, authentication, request bodies and JSON errors.

It is built on the standard library's ``http.server`` on purpose: the surface is a dozen small
JSON routes for an operator and Prometheus, so a web framework would add a dependency (and its
CVEs) for nothing. Each request is served by a thread of its own, taken from a pool that keeps
the threads it started (orchestrator/request_pool), so a slow client does not stall the
others. Abuse is bounded here: at most ``max_connections`` requests are served at once (the next
ones get 503 at once, from the accepting thread), and a connection still open past
``request_timeout`` is cut, however slowly it dribbles bytes in or reads them out. What each
route does is the `AdminService`'s job (the orchestrator).
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import logging
import re
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from activation.errors import ActivationError, Broken, ConfigError, Conflict, Invalid, NotFound, Unavailable
from activation.orchestrator.request_pool import RequestPool
from activation.spool import codec

log = logging.getLogger("activation.orchestrator")

MAX_BODY = 1024 * 1024  # larger request bodies get 413 without being read
DISCARD_LIMIT = 8 * MAX_BODY  # refused bodies up to this size are drained, so the client reads our answer
DISCARD_SECONDS = 2.0  # ... for at most this long
REQUEST_TIMEOUT = 10.0  # default: seconds one connection may take in all, from accept to its last byte
MAX_CONNECTIONS = 32  # default: requests served at once, each by a thread of its own
DEADLINE_CHECK = 0.2  # how often the accepting thread cuts connections past their deadline, while any is open
ACCEPT_RETRY = 0.05  # after a failed accept (EMFILE, say), which would fail again at once: never spin
_BUSY_BODY = b'{"error": "the admin API is serving too many requests at once; retry"}\n'
BUSY_RESPONSE = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)


class ApiError(ActivationError):
    """An answer other than success: an HTTP status and a one-line message for the client."""

    def __init__(self, status: int, message: str, *, allow: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.allow = allow  # for 405: the methods the path does take


# The orchestrator's domain errors (activation.errors), as HTTP statuses.
DOMAIN_STATUS: dict[type[ActivationError], int] = {
    Invalid: HTTPStatus.BAD_REQUEST,
    NotFound: HTTPStatus.NOT_FOUND,
    Conflict: HTTPStatus.CONFLICT,
    Unavailable: HTTPStatus.SERVICE_UNAVAILABLE,
    Broken: HTTPStatus.INTERNAL_SERVER_ERROR,
}
DOMAIN_ERRORS = tuple(DOMAIN_STATUS)


class AdminService(Protocol):
    """What the routes call; each returns the JSON body of a success or raises ApiError."""

    def get_config(self) -> dict[str, Any]: ...
    def set_mode(self, mode: str) -> dict[str, Any]: ...
    def get_status(self) -> dict[str, Any]: ...
    def submit_task(self, body: dict[str, Any]) -> dict[str, Any]: ...
    def get_task(self, task_id: str) -> dict[str, Any]: ...
    def cancel_task(self, task_id: str) -> dict[str, Any]: ...
    def list_dead_letters(self) -> dict[str, Any]: ...
    def retry_dead_letter(self, key: str) -> dict[str, Any]: ...
    def render_metrics(self) -> tuple[bytes, str]: ...


def parse_bind(bind: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8000`` for IPv6) as a host and a port."""
    host, _, port = bind.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` only ever means this machine. Any name but ``localhost`` counts as not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse a bind that the network can reach when no admin token protects the writes."""
    if not token and not is_loopback(host):
        raise ConfigError(
            f"ACTIVATION_ADMIN_BIND: {host} is not a loopback address; set ACTIVATION_ADMIN_TOKEN "
            "to expose the admin API, or bind 127.0.0.1"
        )


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    call: Callable[[AdminService, dict[str, Any] | None, tuple[str, ...]], tuple[int, Any]]


def _routes() -> list[_Route]:
    ok, accepted = HTTPStatus.OK, HTTPStatus.ACCEPTED

    def route(method: str, path: str, call: Callable[..., tuple[int, Any]]) -> _Route:
        return _Route(method, re.compile(f"^{path}$"), call)

    segment = "([^/]+)"
    return [
        route("GET", "/", lambda s, b, a: (ok, index())),
        route("GET", "/config", lambda s, b, a: (ok, s.get_config())),
        route("POST", "/config", lambda s, b, a: (ok, s.set_mode(_field(b, "mode")))),
        route("GET", "/status", lambda s, b, a: (ok, s.get_status())),
        route("POST", "/tasks", lambda s, b, a: (accepted, s.submit_task(_object(b)))),
        route("GET", f"/tasks/{segment}", lambda s, b, a: (ok, s.get_task(a[0]))),
        route("POST", f"/tasks/{segment}/cancel", lambda s, b, a: (ok, s.cancel_task(a[0]))),
        route("GET", "/dlq", lambda s, b, a: (ok, s.list_dead_letters())),
        route("POST", f"/dlq/{segment}/retry", lambda s, b, a: (ok, s.retry_dead_letter(a[0]))),
        route("GET", "/metrics", lambda s, b, a: (ok, s.render_metrics())),
    ]


ROUTES = _routes()


def index() -> dict[str, Any]:
    """``GET /``: what this API answers, so that a newcomer's first request is not a 404."""
    routes = [{"method": r.method, "path": r.pattern.pattern.strip("^$").replace("([^/]+)", "<id>")} for r in ROUTES]
    return {"service": "activation orchestrator admin API", "routes": routes}


def _object(body: dict[str, Any] | None) -> dict[str, Any]:
    if body is None:
        raise ApiError(HTTPStatus.BAD_REQUEST, "expected a JSON object in the request body")
    return body


def _field(body: dict[str, Any] | None, name: str) -> Any:
    obj = _object(body)
    if name not in obj:
        raise ApiError(HTTPStatus.BAD_REQUEST, f"missing field {name!r}")
    return obj[name]


class _Handler(BaseHTTPRequestHandler):
    """One request. Every path out of here is a JSON answer; nothing escapes to kill the thread."""

    server: _Server
    protocol_version = "HTTP/1.0"  # one request per connection: handler threads end promptly
    server_version = "activation-orchestrator"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.request_timeout)  # per recv; the server cuts the whole

    def do_GET(self) -> None:
        self._handle("GET")

    def do_POST(self) -> None:
        self._handle("POST")

    def do_PUT(self) -> None:
        self._handle("PUT")

    def do_DELETE(self) -> None:
        self._handle("DELETE")

    def do_PATCH(self) -> None:
        self._handle("PATCH")

    def _handle(self, method: str) -> None:
        self._body_read = False
        try:
            path = urlsplit(self.path).path
            route, args, allowed = _match(method, path)
            if route is None:
                if allowed:
                    raise ApiError(HTTPStatus.METHOD_NOT_ALLOWED, f"{method} not allowed on {path}", allow=allowed)
                raise ApiError(HTTPStatus.NOT_FOUND, f"no route {path}")
            body = None
            if method == "POST":
                length = self._content_length()
                self._authorize()
                body = self._read_json(length)
            status, payload = route.call(self.server.service, body, args)
        except ApiError as exc:
            self._refuse(exc.status, exc.message, exc.allow)
            return
        except DOMAIN_ERRORS as exc:  # the domain says what is wrong; only here does it become a status
            self._refuse(DOMAIN_STATUS[type(exc)], str(exc))
            return
        except Exception:
            log.exception("admin API: %s %s failed", method, self.path[:200], extra={"event": "api_error"})
            self._refuse(HTTPStatus.INTERNAL_SERVER_ERROR, "internal error; see the orchestrator's log")
            return
        if isinstance(payload, tuple):  # /metrics: already encoded, with its own content type
            self._send(status, payload[0], payload[1])
        else:
            self._send_json(status, payload)

    # -- the request ------------------------------------------------------------------------

    def _content_length(self) -> int:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise ApiError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length, not a chunked body")
        raw = self.headers.get("Content-Length")
        if raw is None:
            return 0
        if not raw.strip().isdigit():
            raise ApiError(HTTPStatus.BAD_REQUEST, "bad Content-Length")
        length = int(raw)
        if length > MAX_BODY:
            raise ApiError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"request body over {MAX_BODY} bytes")
        return length

    def _authorize(self) -> None:
        token = self.server.token
        if not token:
            return
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise ApiError(HTTPStatus.UNAUTHORIZED, "this write needs Authorization: Bearer <ACTIVATION_ADMIN_TOKEN>")
        if not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise ApiError(HTTPStatus.FORBIDDEN, "wrong admin token")

    def _read_json(self, length: int) -> dict[str, Any] | None:
        """The body as a JSON object, whatever the Content-Type: ``curl -d`` sends form encoding."""
        data = self.rfile.read(length) if length else b""
        self._body_read = True
        if len(data) < length:
            raise ApiError(HTTPStatus.BAD_REQUEST, "request body shorter than its Content-Length")
        if not data.strip():
            return None
        try:
            body = codec.loads(data)
        except codec.Uncarryable as exc:  # JSON, but not a value a task can carry (spool.codec)
            raise ApiError(HTTPStatus.BAD_REQUEST, f"request body cannot be carried: {exc.detail[:200]}") from None
        except ValueError as exc:  # also UnicodeDecodeError
            raise ApiError(HTTPStatus.BAD_REQUEST, f"request body is not JSON: {str(exc)[:200]}") from None
        if not isinstance(body, dict):
            raise ApiError(HTTPStatus.BAD_REQUEST, "expected a JSON object in the request body")
        return body

    # -- the answer -------------------------------------------------------------------------

    def _refuse(self, status: int, message: str, allow: str | None = None) -> None:
        self._discard_body()
        headers = {"Allow": allow} if allow else {}
        if status == HTTPStatus.UNAUTHORIZED:
            headers["WWW-Authenticate"] = 'Bearer realm="activation"'
        level = logging.WARNING if status in (HTTPStatus.UNAUTHORIZED, HTTPStatus.FORBIDDEN) else logging.INFO
        log.log(level, "admin API: %s %s -> %d %s", self.command, self.path[:200], status, message)
        self._send_json(status, {"error": message}, headers)

    def _discard_body(self) -> None:
        """Drain a body we refused, so closing the socket does not reset the connection under our answer."""
        if self._body_read:
            return
        self._body_read = True
        raw = self.headers.get("Content-Length", "") if self.headers else ""
        remaining = int(raw) if raw.strip().isdigit() else 0
        if remaining > DISCARD_LIMIT:
            return
        deadline = time.monotonic() + DISCARD_SECONDS  # a client that dribbles does not hold us
        with contextlib.suppress(OSError, ValueError):
            while remaining > 0 and time.monotonic() < deadline:
                self.connection.settimeout(max(0.05, deadline - time.monotonic()))
                chunk = self.rfile.read(min(remaining, 64 * 1024))
                if not chunk:
                    break
                remaining -= len(chunk)

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = codec.encode(payload, default=str)
        self._send(status, data, "application/json", headers)

    def _send(self, status: int, data: bytes, content_type: str, headers: dict[str, str] | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Cache-Control", "no-store")
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)
        except OSError:
            pass  # the client went away; nothing to tell it

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unsupported method), as JSON too."""
        self._body_read = True
        self.close_connection = True
        # A garbled request line leaves http.server assuming HTTP/0.9, which has no status line;
        # nobody speaks 0.9 any more, and a client deserves to see the status.
        self.request_version = self.protocol_version
        self._send_json(code, {"error": message or HTTPStatus(code).phrase})

    def version_string(self) -> str:
        return self.server_version  # no Python version for the network to fingerprint

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("admin API: %s %s", self.address_string(), format % args)


def _match(method: str, path: str) -> tuple[_Route | None, tuple[str, ...], str]:
    """The route for ``method`` and ``path``, its arguments, and the methods the path allows."""
    allowed = []
    for route in ROUTES:
        found = route.pattern.match(path)
        if found is None:
            continue
        if route.method == method:
            return route, tuple(unquote(g) for g in found.groups()), ""
        allowed.append(route.method)
    return None, (), ", ".join(allowed)


class _Server(HTTPServer):
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        service: AdminService,
        token: str | None,
        *,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.service = service
        self.token = token
        self.request_timeout = request_timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self._open: dict[socket.socket, float] = {}  # connection -> its deadline (monotonic)
        self._open_lock = threading.Lock()
        self._next_check = 0.0
        self._stopping = threading.Event()
        self.turned_away = 0
        self.cut = 0
        # Request threads are joined on close (not daemons), so stop() leaves no thread behind.
        self._pool = RequestPool(self._serve, name="admin-api-request")
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)

    def serve(self) -> None:
        """Accept until stop_serving(): asleep while no connection is open, else waking every
        DEADLINE_CHECK to cut those past their deadline.

        socketserver's serve_forever wakes every poll interval whatever happens: five times a
        second at 0.2 s, half of an idle orchestrator's CPU. stop_serving() wakes this wait by
        shutting the listening socket down, as the metrics server and the work queue do.
        """
        with selectors.DefaultSelector() as selector:
            selector.register(self.socket, selectors.EVENT_READ)
            while not self._stopping.is_set():
                with self._open_lock:
                    busy = bool(self._open)
                ready = selector.select(DEADLINE_CHECK if busy else None)
                if self._stopping.is_set():
                    return
                if ready and not self._accept_one():
                    self._stopping.wait(ACCEPT_RETRY)
                self.service_actions()

    def _accept_one(self) -> bool:
        """socketserver's _handle_request_noblock, through its public methods; False if accept failed."""
        try:
            request, client_address = self.get_request()
        except OSError:
            return False
        if not self.verify_request(request, client_address):
            self.shutdown_request(request)
            return True
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        except BaseException:
            self.shutdown_request(request)
            raise
        return True

    def stop_serving(self) -> None:
        """End serve(), wherever it waits; the connections open stay for cut_all()."""
        self._stopping.set()
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)  # wakes the select on it

    def process_request(self, request: Any, client_address: Any) -> None:
        """Serve in a pool thread if a slot is free; else answer 503 from here, without one."""
        if not self._slots.acquire(blocking=False):
            self.turned_away += 1
            self._turn_away(request)
            return
        with self._open_lock:
            self._open[request] = time.monotonic() + self.request_timeout
        try:
            self._pool.submit(request, client_address)
        except BaseException:  # no thread could be started: give the slot back
            self._release(request)
            self.shutdown_request(request)
            raise

    def _serve(self, request: Any, client_address: Any) -> None:
        """One connection, in a pool thread (socketserver's ThreadingMixIn does the same per thread)."""
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            self._release(request)

    def _release(self, request: Any) -> None:
        with self._open_lock:
            self._open.pop(request, None)
        self._slots.release()

    def _turn_away(self, request: socket.socket) -> None:
        # A fresh socket's send buffer is empty: a non-blocking send of a small answer never waits.
        with contextlib.suppress(OSError):
            request.setblocking(False)
            request.send(BUSY_RESPONSE)
            request.shutdown(socket.SHUT_WR)
        request.close()
        if self.turned_away in (1, 10, 100) or self.turned_away % 1000 == 0:
            log.warning(
                "admin API: %d connection(s) turned away with 503: all %s slots busy",
                self.turned_away,
                self.max_connections,
                extra={"event": "api_busy"},
            )

    def service_actions(self) -> None:
        """After each wake of serve(): cut connections past their deadline."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + DEADLINE_CHECK
        with self._open_lock:
            late = [conn for conn, deadline in self._open.items() if deadline <= now]
            for conn in late:
                self._open[conn] = float("inf")  # cut once
        for conn in late:
            self.cut += 1
            log.info(
                "admin API: cut a connection still open after %gs", self.request_timeout, extra={"event": "api_cut"}
            )
            _cut(conn)

    def server_close(self) -> None:
        super().server_close()
        self._pool.close()  # after cut_all(), the threads are free to end

    def cut_all(self) -> None:
        """Cut every open connection: their threads end, and server_close() can join them."""
        with self._open_lock:
            open_now = list(self._open)
            for conn in open_now:
                self._open[conn] = float("inf")
        for conn in open_now:
            _cut(conn)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr; a reset connection is not worth one.
        log.debug("admin API: connection from %s failed", client_address, exc_info=True)


def _cut(conn: socket.socket) -> None:
    """Wake the thread blocked on ``conn`` (recv gets EOF, send gets EPIPE); its thread closes it."""
    with contextlib.suppress(OSError):
        conn.shutdown(socket.SHUT_RDWR)


class AdminApi:
    """The HTTP server in a thread of its own. Port 0 binds a free port; `port` says which."""

    def __init__(
        self,
        service: AdminService,
        *,
        host: str,
        port: int,
        token: str | None,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        check_bind(host, token)
        self.host = host
        self._server = _Server(
            (host, port), service, token or None, max_connections=max_connections, request_timeout=request_timeout
        )
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._server.serve, name="admin-api", daemon=True)
        self._thread.start()
        log.info("admin API listening on %s", self.url, extra={"event": "api_up"})

    def stop(self) -> None:
        """Stop accepting, cut the connections still open, and join their threads.

        A slow client gets no say in how long this takes: its connection is cut, not waited for.
        Only a route still computing its answer is waited for.
        """
        if self._thread is not None:
            self._server.stop_serving()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.cut_all()
        self._server.server_close()  # joins the request threads, which the cut has ended
