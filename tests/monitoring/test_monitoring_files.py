"""The monitoring files the chart ships are the generators' output, and every metric they (and the docs)
name is in the catalogue, so a renamed metric cannot leave a dashboard or an alert silently empty."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dotsvlm_operator.monitoring import generate, scrape
from dotsvlm_serving.metrics.catalog import ALL_METRICS, RAY_PREFIX

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dotsvlm-operator"
DOC = ROOT / "docs" / "observability.md"
NAME = re.compile(r"\b(?:ray_)?dotsvlm_[a-z_]+[a-z]\b")
SUFFIXES = ("_bucket", "_sum", "_count", "_total")
CATALOGUED = {m.prometheus_name for m in ALL_METRICS}
# Label names, not metrics.
NOT_METRICS = {"dotsvlm_namespace", "dotsvlm_deployment", "dotsvlm_operator", "dotsvlm_serving", "dotsvlm_io_deployment"}


def _metric_names(text: str) -> set[str]:
    out = set()
    for name in NAME.findall(text):
        if name in NOT_METRICS or name.startswith("dotsvlm_operator.") or name.startswith("dotsvlm_serving"):
            continue
        base = name
        for suffix in ("_bucket", "_sum", "_count"):
            if base.endswith(suffix) and base[: -len(suffix)] in CATALOGUED:
                base = base[: -len(suffix)]
        out.add(base)
    return out


def test_committed_chart_files_are_the_generators_output() -> None:
    wanted = generate.outputs()
    for rel, text in wanted.items():
        path = CHART / rel
        assert path.is_file() and path.read_text() == text, (
            f"{path} differs from the generator's output: run `make monitoring` and commit the result")
    committed = {f"files/dashboards/{p.name}" for p in (CHART / "files" / "dashboards").glob("*.json")}
    assert committed == {k for k in wanted if k.startswith("files/dashboards/")}


def test_dashboards_and_alerts_name_only_catalogued_metrics() -> None:
    texts = {p.name: p.read_text() for p in (CHART / "files" / "dashboards").glob("*.json")}
    texts["alerts.yaml"] = (CHART / "files" / "alerts.yaml").read_text()
    for name, text in texts.items():
        unknown = _metric_names(text) - CATALOGUED
        assert not unknown, f"{name} names metrics that are not in the catalogue: {sorted(unknown)}"


def test_every_dashboard_is_templated_by_namespace_and_deployment() -> None:
    for path in (CHART / "files" / "dashboards").glob("*.json"):
        dash = json.loads(path.read_text())
        assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "namespace", "deployment"}, path
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: panel ids repeat"
        for panel in dash["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                if expr.startswith("vector(") or "managed_deployments" in expr:
                    continue
                assert '$namespace' in expr and '$deployment' in expr, f"{path.name}: {panel['title']}: {expr}"


def test_the_docs_describe_every_metric_and_no_other() -> None:
    text = DOC.read_text()
    named = _metric_names(text)
    missing = CATALOGUED - named
    assert not missing, f"docs/observability.md does not describe {sorted(missing)}"
    unknown = {n for n in named - CATALOGUED if n.startswith(RAY_PREFIX) or n.endswith(SUFFIXES)}
    assert not unknown, f"docs/observability.md names metrics that do not exist: {sorted(unknown)}"


def test_pod_monitor_uses_the_prometheus_operator_spelling_of_the_relabelings() -> None:
    pm = scrape.pod_monitor({"name": "dots", "namespace": "ml"}, {"dotsvlm.io/deployment": "dots"}, "30s")
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "30s"
    plain = scrape.prometheus_metric_relabel_configs()
    assert [set(r) for r in endpoint["metricRelabelings"]] == [
        {{"source_labels": "sourceLabels"}.get(k, k) for k in r} for r in plain]
    renamed = {r["regex"].strip("^$"): r["replacement"] for r in plain if r["action"] == "labelmap"}
    assert renamed == {k: v for k, v in scrape.RAY_LABELS.items() if v}


def test_each_dashboards_drop_downs_come_from_a_series_that_exists_while_the_deployment_runs() -> None:
    """The namespace/deployment drop-downs list the label values of one metric. The vision and LLM dashboards
    read them from their pool's own replicas, so with the pool at zero (vision scales to zero by default)
    there was no deployment to choose, and every panel, the ingress's pending images and the replica
    counts included, was empty: on a cold start, the moment someone looks. (The overview's was a counter,
    absent until the first request.) A gauge of the ingress, the queue or the operator is always there."""
    from dotsvlm_operator.monitoring.dashboards import DASHBOARDS
    from dotsvlm_serving.metrics.catalog import spec

    for name, d in DASHBOARDS.items():
        m = spec(d.variable_metric)
        assert m.kind == "gauge" and m.source in ("ingress", "queue", "operator"), (name, m.name, m.source, m.kind)
