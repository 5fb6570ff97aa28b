"""The operator's own metrics, on its own port (`dotsvlm operator --metrics-port`).

Reconcile passes (count by result, duration) and, per DotsVLMDeployment and pool, the replica counts
the operator writes into the resource's status (desired, current, ready), the spec's bounds and the
pods the scheduler cannot place; per DotsVLMDeployment, its spec.slo targets (time to first token, inter-token
latency, and the vision stage's encode budget) that the chart's alerts hold it to. Names
and labels come from the catalogue
(`dotsvlm_serving.metrics.catalog.OPERATOR_METRICS`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from dotsvlm_serving.metrics.catalog import OPERATOR_METRICS, MetricSpec
from prometheus_client import (CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               start_http_server)

from dotsvlm_operator import models as m
from dotsvlm_operator import serve_app

_POOL_GAUGES = {  # metric -> how to read it from (status pool, spec pool, unschedulable pods)
    "dotsvlm_pool_desired_replicas": lambda st, sp, u: st.desired_replicas,
    "dotsvlm_pool_replicas": lambda st, sp, u: st.replicas,
    "dotsvlm_pool_ready_replicas": lambda st, sp, u: st.ready_replicas,
    "dotsvlm_pool_min_replicas": lambda st, sp, u: sp.min_replicas,
    "dotsvlm_pool_max_replicas": lambda st, sp, u: sp.max_replicas,
    "dotsvlm_pool_unschedulable_pods": lambda st, sp, u: u,
}


def _make(spec: MetricSpec, registry: CollectorRegistry) -> Any:
    if spec.kind == "counter":
        # prometheus_client adds _total itself
        return Counter(spec.name, spec.help, spec.labels, registry=registry)
    if spec.kind == "gauge":
        return Gauge(spec.name, spec.help, spec.labels, registry=registry)
    return Histogram(spec.name, spec.help, spec.labels, buckets=spec.buckets or (), registry=registry)


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._m = {s.name: _make(s, self.registry) for s in OPERATOR_METRICS}

    def reconciled(self, namespace: str, name: str, seconds: float, ok: bool) -> None:
        self._m["dotsvlm_operator_reconciles"].labels(namespace, name, "success" if ok else "error").inc()
        self._m["dotsvlm_operator_reconcile_duration_seconds"].labels(namespace, name).observe(seconds)

    def managed(self, count: int) -> None:
        self._m["dotsvlm_operator_managed_deployments"].set(count)

    def observe_status(self, namespace: str, name: str, spec: m.DotsVLMDeploymentSpec,
                       status: m.DotsVLMDeploymentStatus, unschedulable: dict[str, int]) -> None:
        """Export the per-pool counts of the status the operator just computed."""
        for pool, st, sp in (("vision", status.vision, spec.vision), ("llm", status.llm, spec.llm)):
            for metric, read in _POOL_GAUGES.items():
                self._m[metric].labels(namespace, name, pool).set(read(st, sp, unschedulable.get(pool, 0)))
            current = self._m["dotsvlm_pool_current_replicas"]
            if st.current_replicas is not None:
                current.labels(namespace, name, pool).set(st.current_replicas)
            elif (namespace, name, pool) in _label_sets(current):
                current.remove(namespace, name, pool)
        # The targets its own dashboards draw (the Overview), not spec.slo's defaults.
        slo = self._m["dotsvlm_slo_time_to_first_token_seconds"]
        slo.labels(namespace, name, "text").set(spec.slo.text_ttft_seconds)
        slo.labels(namespace, name, "image").set(spec.slo.image_ttft_seconds)
        self._m["dotsvlm_slo_inter_token_latency_seconds"].labels(namespace, name).set(spec.slo.inter_token_seconds)
        self._m["dotsvlm_slo_vision_encode_budget_seconds"].labels(namespace, name).set(
            serve_app.encode_budget_seconds(spec))

    def forget(self, namespace: str, name: str) -> None:
        """A deleted resource's series go away (its counters too: they would only mislead)."""
        for metric in self._m.values():
            for labels in list(_label_sets(metric)):
                if labels[:2] == (namespace, name):
                    metric.remove(*labels)

    def serve(self, port: int, addr: str = "0.0.0.0") -> None:
        start_http_server(port, addr=addr, registry=self.registry)


def _label_sets(metric: Any) -> Iterable[tuple[str, ...]]:
    if not metric._labelnames:  # noqa: SLF001 - prometheus_client keeps no public accessor
        return []
    return list(metric._metrics.keys())  # noqa: SLF001


disable_created_metrics()  # no *_created series: noise for dashboards and alerts
METRICS = OperatorMetrics()
