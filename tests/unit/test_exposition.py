"""The heartbeat's /metrics, written without prometheus_client, says what prometheus_client said.

The reference is the collector the heartbeat served through prometheus_client before (kept here,
as the oracle): for the same samples both outputs must be the same bytes and parse into the same
families. The server is then scraped over real HTTP, the way Prometheus does.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from activation.observability import samples
from activation.observability.catalog import SPECS, Spec
from activation.observability.metrics import CONTENT_TYPE, MetricsServer, exposition, go_float, render
from activation.observability.samples import Store, Values, WorkerMetrics

# -- the oracle: the heartbeat's collector as it was, on prometheus_client --------------------------


class _Reference:
    def __init__(self, values: Values) -> None:
        self.values = values

    def collect(self) -> Iterator[Metric]:
        for spec in SPECS:
            family = _reference_family(spec, self.values[spec.name])
            if family is not None:
                yield family


def _reference_family(spec: Spec, series: samples.Series) -> Metric | None:
    if spec.kind == "counter" and not spec.labels and not series:
        series = {(): 0.0}
    if not series:
        return None
    labels, rows = list(spec.labels), sorted(series.items())
    if spec.kind in ("counter", "gauge"):
        family: Any = (CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily)(
            spec.name, spec.help, labels=labels
        )
        for key, value in rows:
            family.add_metric(list(key), value)
        return family  # type: ignore[no-any-return]
    histogram = HistogramMetricFamily(spec.name, spec.help, labels=labels)
    bounds = [floatToGoString(bound) for bound in spec.buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
    for key, row in rows:
        cumulative, buckets = 0.0, []
        for bound, count in zip(bounds, row[:-1], strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        histogram.add_metric(list(key), buckets, sum_value=row[-1])
    return histogram


def reference(values: Values) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Reference(values))  # type: ignore[arg-type]
    return generate_latest(registry)


def families(text: bytes) -> list[tuple[str, str, str, list[tuple[str, dict[str, str], float]]]]:
    return [
        (f.name, f.type, f.documentation, [(s.name, s.labels, s.value) for s in f.samples])
        for f in text_string_to_metric_families(text.decode())
    ]


# -- samples to expose --------------------------------------------------------------------------------


def everything(store: Store) -> WorkerMetrics:
    """Every family set, with label values that need escaping and numbers of every shape."""
    metrics = WorkerMetrics(store)
    metrics.task_queue_size.labels("w1").set(3)
    metrics.task_queue_size.labels('we"ird\\na\nme').set(1e22)
    metrics.tasks_completed.labels("w1", "completed").inc(12345678)
    metrics.tasks_completed.labels("w1", "failed").inc(0.5)
    metrics.tasks_completed.labels("w1", "timeout")  # a labelled series at 0
    for seconds in (0.004, 0.01, 7, 4000, 1e-9):
        metrics.task_processing_seconds.labels("w1", "completed").observe(seconds)
    for seconds in (0.0005, 0.0007, 0.002, 99):
        metrics.activation_latency_seconds.labels("w1", "inotify").observe(seconds)
    metrics.activation_latency_seconds.labels("w1", "rescan").observe(0.3)
    metrics.tasks_dead_lettered.labels("w1", "invalid_json").inc()
    metrics.agent_timeouts.inc(2)
    metrics.listener_events.labels("inotify").inc(1_000_000)
    metrics.listener_refused.labels("not a task id").inc()
    metrics.worker_up.set(1)
    metrics.redis_connected.set(0)
    return metrics


def test_every_family_is_the_same_bytes_as_prometheus_client_wrote() -> None:
    values = everything(Store()).store.copy()
    ours = render(values)
    assert families(ours) == families(reference(values))
    assert ours == reference(values)
    assert {name for name, *_ in families(ours)} == {spec.name for spec in SPECS}


def test_an_idle_worker_is_the_same_as_prometheus_client_wrote() -> None:
    """No sample yet: only the unlabelled counters (at 0) and what the heartbeat sets."""
    store = Store()
    WorkerMetrics(store).worker_up.set(1)
    values = store.copy()
    assert render(values) == reference(values)
    assert {name for name, *_ in families(render(values))} == {
        "agent_timeouts",
        "inotify_overflows",
        "worker_up",
    }


@pytest.mark.parametrize("number", [0.0, 1.0, 0.0005, 1e-9, 123456.0, 1234567.0, 1e22, 2.5, -3.0, float("inf")])
def test_numbers_are_written_as_go_writes_them(number: float) -> None:
    assert go_float(number) == floatToGoString(number)  # type: ignore[no-untyped-call]


# -- the server ------------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[MetricsServer]:
    store = Store(tmp_path / "metrics" / "heartbeat.json", delay=0)
    everything(store)
    served = MetricsServer(0, exposition(tmp_path / "metrics", own=store), host="127.0.0.1")
    yield served
    served.close()
    store.close()


def fetch(port: int, path: str = "/metrics", method: str = "GET") -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_a_scrape_gets_the_text_format_with_its_content_type(server: MetricsServer) -> None:
    status, headers, body = fetch(server.port)
    assert status == 200
    assert headers["Content-Type"] == CONTENT_TYPE
    assert int(headers["Content-Length"]) == len(body)
    names = {name for name, *_ in families(body)}
    assert {"tasks_completed", "activation_latency_seconds", "worker_up"} <= names
    assert fetch(server.port, "/")[2] == body  # any path, as prometheus_client answered


def test_other_methods_are_refused_and_a_silent_client_does_not_stop_the_server(server: MetricsServer) -> None:
    assert fetch(server.port, method="POST")[0] == 405
    assert fetch(server.port, method="OPTIONS")[1]["Allow"] == "OPTIONS,GET"
    with socket.create_connection(("127.0.0.1", server.port), timeout=10):  # connects, says nothing
        assert fetch(server.port)[0] == 200


def test_a_taken_port_is_an_os_error_and_close_frees_the_port(server: MetricsServer, tmp_path: Path) -> None:
    with pytest.raises(OSError):
        MetricsServer(server.port, lambda: b"", host="127.0.0.1")
    port = server.port
    server.close()
    again = MetricsServer(port, lambda: b"# empty\n", host="127.0.0.1")
    try:
        assert fetch(port)[2] == b"# empty\n"
    finally:
        again.close()


def test_a_failing_render_is_a_500_and_the_next_scrape_is_served() -> None:
    calls = []

    def body() -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug")
        return b"ok 1.0\n"

    served = MetricsServer(0, body, host="127.0.0.1")
    try:
        assert fetch(served.port)[0] == 500
        assert fetch(served.port)[2] == b"ok 1.0\n"
    finally:
        served.close()
