"""The dashboard pictures' renderer (monitoring/render.py): every panel of every committed dashboard is
drawn from query results, legends follow the panels' formats, and empty panels are reported."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from dotsvlm_operator.monitoring import render

DASHBOARDS = sorted((Path(__file__).resolve().parents[2] / "charts" / "dotsvlm-operator" / "files" / "dashboards")
                    .glob("*.json"))


def test_legend_follows_grafana_format() -> None:
    assert render.legend("p95 {{modality}}", {"modality": "image", "code": "200"}) == "p95 image"
    assert render.legend("", {"__name__": "x", "pool": "llm"}) == "{pool=llm}"


@pytest.mark.parametrize(("value", "unit", "text"), [(0.25, "s", "250 ms"), (2.5, "s", "2.50 s"),
                                                     (0.5, "percentunit", "50%"), (3 << 20, "bytes", "3.0 MiB"),
                                                     (4.0, "reqps", "4 req/s")])
def test_values_in_the_panel_unit(value: float, unit: str, text: str) -> None:
    assert render.format_value(value, unit) == text


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_every_panel_is_drawn_and_empty_ones_are_named(path: Path, tmp_path: Path) -> None:
    dashboard = json.loads(path.read_text())
    titles = [p["title"] for p in render.panels(dashboard)]
    first = titles[0]
    asked: list[str] = []
    now = time.time()

    def query_range(expr: str) -> list[dict]:
        asked.append(expr)
        return [{"metric": {"pool": "llm", "modality": "text"}, "values": [[now - 60 + i, str(i)] for i in range(60)]}]

    out = tmp_path / f"{path.stem}.png"
    assert render.render_dashboard(dashboard, query_range, out) == []
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 20_000
    assert len(asked) == sum(len(p.get("targets", [])) for p in render.panels(dashboard))
    # A panel whose queries return nothing is drawn as "No data" and reported by title.
    first_exprs = {t["expr"] for t in next(render.panels(dashboard)).get("targets", [])}
    empty = render.render_dashboard(dashboard, lambda e: [] if e in first_exprs else query_range(e), out)
    assert first in empty


def test_the_overview_draws_each_deployments_own_ttft_targets() -> None:
    """The Overview's time-to-first-token panel drew spec.slo's default targets (text 2 s, image 10 s) as
    constants for every deployment: with imageTTFTSeconds 30 a p90 of 20 s sat over the drawn 10 s line while
    the autoscaler and the deployment's alert saw the target met. The operator now exports each deployment's
    targets, and the panel draws those."""
    from prometheus_client import generate_latest

    from dotsvlm_operator import models as m
    from dotsvlm_operator.monitoring import dashboards
    from dotsvlm_operator.monitoring.operator_metrics import OperatorMetrics
    from dotsvlm_serving.metrics.catalog import prom

    metrics = OperatorMetrics()
    spec = m.DotsVLMDeploymentSpec.model_validate({"image": "x", "model": {"path": "/m", "volume": {
        "persistentVolumeClaim": {"claimName": "w"}}}, "slo": {"imageTTFTSeconds": 30, "textTTFTSeconds": 1.5}})
    metrics.observe_status("ml", "dots", spec, m.DotsVLMDeploymentStatus(), {})
    name = prom("dotsvlm_slo_time_to_first_token_seconds")
    text = generate_latest(metrics.registry).decode()
    assert f'{name}{{dotsvlm_deployment="dots",dotsvlm_namespace="ml",modality="image"}} 30.0' in text, text
    assert f'{name}{{dotsvlm_deployment="dots",dotsvlm_namespace="ml",modality="text"}} 1.5' in text, text
    panel = next(p for p in dashboards.OVERVIEW.rows[1][1] if p.title == "Time to first token")
    exprs = [q for q, _ in panel.queries]
    assert not [q for q in exprs if q.startswith("vector(")], exprs
    assert any(name in q and 'dotsvlm_deployment=~"$deployment"' in q for q in exprs), exprs
    metrics.forget("ml", "dots")
    assert name + "{" not in generate_latest(metrics.registry).decode()
