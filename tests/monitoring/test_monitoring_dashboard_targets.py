"""The dashboards' latency panels draw the lines the alerts and the autoscaler use, evaluated with promtool on the
shipped dashboard JSON: the p90 the alert holds to its target (TTFT per modality; inter-token latency and the
vision stage over all requests), and the target itself, the deployment's own as the operator exports it, or
spec.slo's default where the operator's metrics are not scraped (what the chart's alerts fall back to)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from support.prometheus import promtool

from dotsvlm_operator.monitoring import alerts
from dotsvlm_operator.monitoring.dashboards import DEFAULT_TARGET, OWN_TARGET

DASHBOARDS = Path(__file__).resolve().parents[2] / "charts" / "dotsvlm-operator" / "files" / "dashboards"
NS, DEP = "ml", "dots"
EVAL = "30m"


def _series(name: str, deployment: str, labels: str, values: str) -> dict:
    extra = f",{labels}" if labels else ""
    return {"series": f'{name}{{dotsvlm_namespace="{NS}",dotsvlm_deployment="{deployment}"{extra}}}', "values": values}


def _hist(name: str, labels: str, bucket_le: str, bounds: tuple[str, ...]) -> list[dict]:
    """10 observations a minute, all in the bucket ending at `bucket_le`."""
    out = []
    for le in (*bounds, "+Inf"):
        grows = float(le.replace("+Inf", "inf")) >= float(bucket_le)
        sep = "," if labels else ""
        out.append(_series(name + "_bucket", DEP, f'{labels}{sep}le="{le}"', "0+10x40" if grows else "0+0x40"))
    return out


def _expand(expr: str) -> str:
    return expr.replace("$namespace", NS).replace("$deployment", DEP).replace("$__rate_interval", "5m")


def _panel(dashboard: str, title: str) -> _Queries:
    """legend -> query of a shipped panel."""
    dash = json.loads((DASHBOARDS / f"{dashboard}.json").read_text())
    panel = next(p for p in dash["panels"] if p["title"] == title)
    return _Queries({t["legendFormat"]: t["expr"] for t in panel["targets"]}, f"{dashboard}: {title}")


class _Queries(dict):
    """A panel's queries by legend; a missing line names the panel and the lines it has."""

    def __init__(self, queries: dict[str, str], panel: str) -> None:
        super().__init__(queries)
        self.panel = panel

    def __missing__(self, legend: str) -> str:
        raise AssertionError(f"{self.panel} draws no {legend!r} line, only {sorted(self)}")


def _check(exprs: list[tuple[str, list[dict], list[dict]]], tmp_path: Path) -> None:
    """Each (query, input series, expected samples) evaluated by promtool at EVAL."""
    tests = [{"interval": "1m", "input_series": series, "promql_expr_test": [
        {"expr": _expand(expr), "eval_time": EVAL, "exp_samples": expected}]} for expr, series, expected in exprs]
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump({"rule_files": [], "evaluation_interval": "1m", "tests": tests}, sort_keys=False))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def _target_cases(expr: str, metric: str, labels: str, own: float, default: float) -> list:
    """The deployment's own target (another deployment's beside it is not drawn), and the default without it."""
    extra = f",{labels}" if labels else ""
    mine, other = _series(metric, DEP, labels, f"{own:g}+0x40"), _series(metric, "other", labels, "99+0x40")
    return [(expr, [mine, other], [{"labels": f'{{source="{OWN_TARGET}"{extra}}}', "value": own}]),
            (expr, [other], [{"labels": f'{{source="{DEFAULT_TARGET}"{extra}}}', "value": default}])]


ITL_BOUNDS = ("0.05", "0.1", "0.2", "0.25", "0.3", "0.5")
VISION_BOUNDS = ("2.5", "5", "7.5", "10", "12.5", "15")


@pytest.mark.parametrize(("dashboard", "title"),
                         [("overview", "Inter-token latency"), ("llm-pool", "Inter-token latency")])
def test_the_inter_token_panels_draw_the_alerts_p90_and_the_deployments_own_target(dashboard: str, title: str,
                                                                                     tmp_path: Path) -> None:
    """The inter-token latency panels drew p95 (and p50) per modality with no target, so an SRE could not see
    what DotsVLMInterTokenLatencyHigh and the autoscaler's InterTokenLatencyMiss compare: the p90 over all
    requests against the deployment's spec.slo.interTokenSeconds. Both are drawn now."""
    queries = _panel(dashboard, title)
    p90, goal = queries["p90 (all requests)"], queries["target ({{source}})"]
    # Half the requests (text) at <= 0.1 s, half (image) in (0.25, 0.3]: the p90 over all is 0.29 s, as the alert
    # reads it (and neither modality's own p90).
    series = (_hist("ray_dotsvlm_inter_token_latency_seconds", 'modality="text"', "0.1", ITL_BOUNDS)
              + _hist("ray_dotsvlm_inter_token_latency_seconds", 'modality="image"', "0.3", ITL_BOUNDS))
    _check([(p90, series, [{"labels": "{}", "value": 0.29}]),
            *_target_cases(goal, "dotsvlm_slo_inter_token_latency_seconds", "", 0.05, alerts.ITL_TARGET_SECONDS)],
           tmp_path)


def test_the_vision_request_latency_panel_draws_the_alerts_p90_and_the_deployments_encode_budget(
        tmp_path: Path) -> None:
    """The vision pool's request encode latency panel drew p95 and p50 with no line, though the autoscaler's
    EncodeLatency rule and DotsVLMVisionEncodeLatencyHigh hold its p90 to the deployment's encode budget
    (imageTTFTSeconds x encodeBudgetFraction): a p95 over a budget nobody could see. Both are drawn now."""
    queries = _panel("vision-pool", "Request encode latency")
    series = _hist("ray_dotsvlm_vision_request_seconds", "", "12.5", VISION_BOUNDS)  # p90 12.25 s
    _check([(queries["p90"], series, [{"labels": "{}", "value": 12.25}]),
            *_target_cases(queries["budget ({{source}})"], "dotsvlm_slo_vision_encode_budget_seconds", "", 15,
                           alerts.ENCODE_BUDGET_SECONDS)], tmp_path)


def test_the_ttft_panel_draws_the_defaults_where_the_operator_is_not_scraped(tmp_path: Path) -> None:
    """Without the operator's metrics the TTFT panel drew no target at all, while the chart's
    DotsVLMTimeToFirstTokenHigh still held the deployment to spec.slo's defaults; it draws those now, named so."""
    goal = _panel("overview", "Time to first token")["target {{modality}} ({{source}})"]
    metric = "dotsvlm_slo_time_to_first_token_seconds"
    own = [_series(metric, DEP, 'modality="text"', "1.5+0x40"), _series(metric, DEP, 'modality="image"', "30+0x40")]
    defaults = [{"labels": f'{{modality="{m}",source="{DEFAULT_TARGET}"}}', "value": v}
                for m, v in alerts.TTFT_TARGET_SECONDS.items()]
    _check([(goal, own, [{"labels": f'{{modality="text",source="{OWN_TARGET}"}}', "value": 1.5},
                         {"labels": f'{{modality="image",source="{OWN_TARGET}"}}', "value": 30}]),
            (goal, [_series(metric, "other", 'modality="image"', "99+0x40")], defaults)], tmp_path)
