"""The worker's /metrics: every program's samples (samples.py), served by prometheus_client.

Only the heartbeat imports this module, and with it prometheus_client; it uses a plain registry,
no multiprocess mode. At each scrape a collector reads the programs' files, so what is served is
at most one write (samples.FLUSH_DELAY) behind the programs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from activation.observability.catalog import SPECS, Spec
from activation.observability.samples import Series, Store, merged

__all__ = ["WorkerCollector", "worker_registry"]


class WorkerCollector(Collector):
    """The catalog's families, filled from the files in ``folder`` and the reader's own store."""

    def __init__(self, folder: Path, own: Store | None = None) -> None:
        self.folder = folder
        self.own = own

    def collect(self) -> Iterator[Metric]:
        values = merged(self.folder, own=self.own)
        for spec in SPECS:
            family = _family(spec, values[spec.name])
            if family is not None:
                yield family


def _family(spec: Spec, series: Series) -> Metric | None:
    if spec.kind == "counter" and not spec.labels and not series:
        series = {(): 0.0}  # an unlabelled counter reads 0 before its first event, as Prometheus expects
    if not series:
        return None
    labels = list(spec.labels)
    rows = sorted(series.items())
    if spec.kind == "counter":
        counter = CounterMetricFamily(spec.name, spec.help, labels=labels)
        for key, value in rows:
            counter.add_metric(list(key), value)
        return counter
    if spec.kind == "gauge":
        gauge = GaugeMetricFamily(spec.name, spec.help, labels=labels)
        for key, value in rows:
            gauge.add_metric(list(key), value)
        return gauge
    histogram = HistogramMetricFamily(spec.name, spec.help, labels=labels)
    bounds = [floatToGoString(bound) for bound in spec.buckets] + ["+Inf"]  # type: ignore[no-untyped-call]
    for key, row in rows:
        cumulative, buckets = 0.0, []
        for bound, count in zip(bounds, row[:-1], strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        histogram.add_metric(list(key), buckets, sum_value=row[-1])
    return histogram


def worker_registry(folder: Path, own: Store | None = None) -> CollectorRegistry:
    """A registry holding only the worker's collector (no process or platform collectors)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(WorkerCollector(folder, own))
    return registry
