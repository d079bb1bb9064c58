"""The worker's /metrics: every program's samples (samples.py) in Prometheus' text format 0.0.4.

Only the heartbeat serves it, and without prometheus_client (about 12 MB of an idle process with
its WSGI server): the format is small and fixed (tests/unit/test_exposition.py holds the output
to prometheus_client's, byte for byte). At each scrape the programs' files are read, so what is
served is at most one write (samples.FLUSH_DELAY) behind the programs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from activation.observability.catalog import SPECS, Spec
from activation.observability.samples import Series, Store, Values, merged

__all__ = ["CONTENT_TYPE", "MetricsServer", "exposition", "render"]

log = logging.getLogger("activation.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
MAX_REQUEST = 16 << 10  # bytes of request line and headers; a scrape sends a few hundred
CLIENT_TIMEOUT = 10.0  # seconds a client may take to send its request and read the answer


def go_float(value: float) -> str:
    """A number as Prometheus (Go) writes it: ``+Inf``, ``1.0``, ``1e+06`` (prometheus_client's floatToGoString)."""
    value = float(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:  # Go switches to an exponent sooner than Python
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text


def _label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _sample(name: str, labels: list[tuple[str, str]], value: float) -> str:
    if not labels:
        return f"{name} {go_float(value)}\n"
    pairs = ",".join(f'{key}="{_label_value(val)}"' for key, val in sorted(labels))
    return f"{name}{{{pairs}}} {go_float(value)}\n"


def _family(spec: Spec, series: Series) -> Iterator[str]:
    if spec.kind == "counter" and not spec.labels and not series:
        series = {(): 0.0}  # an unlabelled counter reads 0 before its first event, as Prometheus expects
    if not series:
        return
    name = f"{spec.name}_total" if spec.kind == "counter" else spec.name
    help_text = spec.help.replace("\\", r"\\").replace("\n", r"\n")
    yield f"# HELP {name} {help_text}\n"
    yield f"# TYPE {name} {spec.kind}\n"
    for key, row in sorted(series.items()):
        labels = list(zip(spec.labels, key, strict=True))
        if spec.kind != "histogram":
            yield _sample(name, labels, row)
            continue
        cumulative = 0.0
        for bound, count in zip([*map(go_float, spec.buckets), "+Inf"], row[:-1], strict=True):
            cumulative += count
            yield _sample(f"{name}_bucket", [*labels, ("le", bound)], cumulative)
        yield _sample(f"{name}_count", labels, cumulative)
        yield _sample(f"{name}_sum", labels, row[-1])


def render(values: Values) -> bytes:
    """The catalog's families in the text format, in catalog order, series sorted by labels."""
    return "".join(line for spec in SPECS for line in _family(spec, values[spec.name])).encode()


def exposition(folder: Path, own: Store | None = None) -> Callable[[], bytes]:
    """What /metrics serves: the files in ``folder`` and the reader's own store, read at each call."""
    return lambda: render(merged(folder, own=own))


class MetricsServer:
    """/metrics over plain HTTP on ``port``: a thread blocked in accept(), one short thread per scrape.

    No poll loop (socketserver's serve_forever wakes twice a second): an idle worker is not woken
    between scrapes. Any path answers the metrics, as prometheus_client's server did.
    """

    def __init__(self, port: int, body: Callable[[], bytes], host: str = "0.0.0.0") -> None:
        self.body = body
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self.sock.bind((host, port))
            self.sock.listen(16)
        except BaseException:
            self.sock.close()
            raise
        self.port = int(self.sock.getsockname()[1])
        self._closed = threading.Event()
        self.thread = threading.Thread(target=self._accept_loop, name="metrics-http", daemon=True)
        self.thread.start()

    def _accept_loop(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                if self._closed.is_set():
                    return
                # A client that reset before accept, or EMFILE, which would fail again at once:
                # a short pause, as the work queue's accept loop does, so that it never spins.
                time.sleep(0.05)
                continue
            threading.Thread(target=self._serve, args=(client,), name="metrics-scrape", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        with client:
            client.settimeout(CLIENT_TIMEOUT)
            try:
                head = _read_head(client)
                client.sendall(self._answer(head))
            except OSError:
                return  # the scraper went away or was too slow: its next scrape is a new connection

    def _answer(self, head: bytes) -> bytes:
        method, _, rest = head.partition(b" ")
        path = rest.partition(b" ")[0].partition(b"?")[0]
        headers = b""
        if method == b"GET" and path == b"/favicon.ico":
            status, body = b"200 OK", b""
        elif method == b"GET":
            try:
                status, body, headers = b"200 OK", self.body(), f"Content-Type: {CONTENT_TYPE}\r\n".encode()
            except Exception:  # a bug must not kill the server thread: say it, and serve the next scrape
                log.exception("cannot render /metrics", extra={"event": "metrics_error"})
                status, body = b"500 Internal Server Error", b"# cannot render the metrics; see the heartbeat's log\n"
        elif method == b"OPTIONS":
            status, body, headers = b"200 OK", b"", b"Allow: OPTIONS,GET\r\n"
        else:
            status, headers = b"405 Method Not Allowed", b"Allow: OPTIONS,GET\r\n"
            body = b"# HTTP 405 Method Not Allowed: " + method[:32] + b"; use OPTIONS or GET\n"
        return (
            b"HTTP/1.0 " + status + b"\r\n" + headers + b"Content-Length: " + str(len(body)).encode() + b"\r\n"
            b"Connection: close\r\n\r\n" + body
        )

    def close(self) -> None:
        """Stop accepting (shutdown() wakes the blocked accept(); close() alone would not) and free the port."""
        self._closed.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=2)


def _read_head(client: socket.socket) -> bytes:
    """The request line and headers, up to the blank line; OSError on a client that never ends them."""
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        chunk = client.recv(4096)
        if not chunk:
            break  # HTTP/0.9-style or a half-closed client: answer what came
        data += chunk
        if len(data) > MAX_REQUEST:
            raise OSError("request head too large")
    return data.split(b"\n", 1)[0].strip()
