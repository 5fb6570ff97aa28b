"""Publishing the catalogued metrics from a Ray Serve replica, through Ray's own metrics export.

Each replica records its own numbers with `ray.serve.metrics`; Ray's agent on the replica's node
exports them on that node's metrics port, so every replica is scraped exactly once, whatever the
number of replicas and pods (nothing is aggregated by hand, nothing is reported by a proxy).

Gauges and cumulative counters come from the component's own `stats()` (the numbers the pool
autoscaler reads too): `StatsPublisher` copies them periodically. Ray forgets a gauge that is not set
again within two report intervals, so the copy runs every `PUBLISH_INTERVAL_S`. Per-request numbers
(latencies, request counts) are recorded where they happen.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from ray.serve import metrics as serve_metrics

from .catalog import (DEPLOYMENT_ENV, DEPLOYMENT_LABEL, LOCAL, NAMESPACE_ENV, NAMESPACE_LABEL, SERVING_METRICS,
                      MetricSpec, Source)

log = logging.getLogger("ray.serve")

PUBLISH_INTERVAL_S = 2.0


def resource_tags() -> dict[str, str]:
    """The DotsVLMDeployment this replica serves (set on every Ray pod by the operator)."""
    return {NAMESPACE_LABEL: os.environ.get(NAMESPACE_ENV) or LOCAL,
            DEPLOYMENT_LABEL: os.environ.get(DEPLOYMENT_ENV) or LOCAL}


def _instrument(m: MetricSpec, defaults: dict[str, str]) -> Any:
    keys = (NAMESPACE_LABEL, DEPLOYMENT_LABEL, *m.labels)
    if m.kind == "counter":
        inst = serve_metrics.Counter(m.name, description=m.help, tag_keys=keys)
    elif m.kind == "gauge":
        inst = serve_metrics.Gauge(m.name, description=m.help, tag_keys=keys)
    else:
        inst = serve_metrics.Histogram(m.name, description=m.help, boundaries=list(m.buckets or ()), tag_keys=keys)
    inst.set_default_tags(dict(defaults))
    return inst


class ReplicaMetrics:
    """The catalogued metrics of one component (`source`), registered in this replica."""

    def __init__(self, source: Source) -> None:
        defaults = resource_tags()
        self._specs = {m.name: m for m in SERVING_METRICS if m.source == source}
        self._inst = {name: _instrument(m, defaults) for name, m in self._specs.items()}

    def _get(self, name: str, kind: str) -> Any:
        m = self._specs.get(name)
        if m is None or m.kind != kind:
            raise KeyError(f"{name} is not a catalogued {kind} of this component")
        return self._inst[name]

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        if value > 0:  # Ray refuses 0; a counter that did not move has nothing to record
            self._get(name, "counter").inc(value, tags=labels or None)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._get(name, "gauge").set(float(value), tags=labels or None)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._get(name, "histogram").observe(float(value), tags=labels or None)


Stats = Mapping[str, Any]


class StatsPublisher:
    """Copies a `stats()` dict into gauges (its current values) and counters (the growth of cumulative
    values since the last copy), so the metrics and the autoscaler read one source."""

    def __init__(self, metrics: ReplicaMetrics, read: Callable[[], Stats | Awaitable[Stats]], *,
                 gauges: Mapping[str, str], counters: Mapping[str, str] | None = None,
                 labelled_counters: Mapping[str, tuple[str, str]] | None = None) -> None:
        """gauges/counters: metric name -> stats key; labelled_counters: metric name -> (stats key of a
        {label value: total} dict, label name)."""
        self.metrics, self.read = metrics, read
        self.gauges, self.counters = dict(gauges), dict(counters or {})
        self.labelled = dict(labelled_counters or {})
        self._last: dict[tuple[str, str], float] = {}

    def _grow(self, name: str, key: str, total: float, labels: dict[str, str]) -> None:
        prev = self._last.get((name, key), 0.0)
        self._last[(name, key)] = total
        if total > prev:
            self.metrics.inc(name, total - prev, **labels)

    def publish(self, stats: Stats) -> None:
        for name, key in self.gauges.items():
            self.metrics.set(name, float(stats.get(key, 0.0)))
        for name, key in self.counters.items():
            self._grow(name, key, float(stats.get(key, 0.0)), {})
        for name, (key, label) in self.labelled.items():
            for value, total in sorted((stats.get(key) or {}).items()):
                self._grow(name, f"{key}/{value}", float(total), {label: str(value)})

    async def run_forever(self, interval_s: float = PUBLISH_INTERVAL_S) -> None:
        while True:
            try:
                got = self.read()
                self.publish(await got if asyncio.iscoroutine(got) or isinstance(got, Awaitable) else got)
            except asyncio.CancelledError:
                raise
            except Exception:  # metrics must never take a replica down
                log.exception("publishing metrics failed")
            await asyncio.sleep(interval_s)
