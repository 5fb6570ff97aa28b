"""How Prometheus finds every Ray pod's metrics (pure functions, no Kubernetes client).

Every Ray pod (head and pool workers) runs Ray's metrics agent with `--metrics-export-port`; each
Serve replica's metrics are exported by the agent of the node it runs on, so scraping every Ray pod
once gets every replica once. With the Prometheus Operator installed the operator renders a
PodMonitor (worker pods have no Service, so a ServiceMonitor would miss them); without it, the pods
carry the common `prometheus.io/*` scrape annotations instead, never both (a Prometheus that honours
both would scrape each pod twice).

Ray adds camelCase labels to every series (`Component`, `NodeAddress`, `WorkerId`, ...), which
Prometheus naming rules do not allow; the metric relabelings rename those worth keeping and drop the
rest. The test Prometheus applies the same relabelings (`prometheus_metric_relabel_configs`).
"""

from __future__ import annotations

from typing import Any

METRICS_PORT_NAME = "metrics"
METRICS_PATH = "/metrics"
# Ray label -> Prometheus-style name; None: dropped (constant per cluster or OpenTelemetry noise).
RAY_LABELS: dict[str, str | None] = {
    "Component": "ray_component",
    "NodeAddress": "ray_node_address",
    "WorkerId": "ray_worker_id",
    "SessionName": None,
    "Version": None,
    "otel_scope_name": None,
    "otel_scope_schema_url": None,
    "otel_scope_version": None,
}


def _relabelings() -> list[dict[str, Any]]:
    """Relabel rules in Prometheus' own (snake_case) spelling."""
    rules: list[dict[str, Any]] = []
    for old, new in RAY_LABELS.items():
        if new:
            rules.append({"action": "labelmap", "regex": f"^{old}$", "replacement": new})
    rules.append({"action": "labeldrop", "regex": "^(" + "|".join(RAY_LABELS) + ")$"})
    return rules


def prometheus_metric_relabel_configs() -> list[dict[str, Any]]:
    """`metric_relabel_configs` for a plain Prometheus scrape job of Ray pods."""
    return _relabelings()


def _camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(w.title() for w in rest)


def pod_monitor(meta: dict[str, Any], pod_selector: dict[str, str], interval: str) -> dict[str, Any]:
    """A PodMonitor for every Ray pod of one deployment (`pod_selector` matches head and pool pods)."""
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "PodMonitor", "metadata": meta,
        "spec": {
            "selector": {"matchLabels": dict(pod_selector)},
            "podMetricsEndpoints": [{
                "port": METRICS_PORT_NAME, "path": METRICS_PATH, "interval": interval,
                "metricRelabelings": [{_camel(k): v for k, v in r.items()} for r in _relabelings()],
            }],
        },
    }


def scrape_annotations(port: int) -> dict[str, str]:
    """Pod annotations for a Prometheus that discovers pods by annotation (no Prometheus Operator)."""
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(port), "prometheus.io/path": METRICS_PATH}
