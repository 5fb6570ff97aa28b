"""The alert rules with promtool: `check rules` and `test rules`, one firing and one silent case per alert.

The rules under test are the committed chart file (which another test keeps equal to the code); the
expected annotations are rendered here from the rules' own templates, so a summary or description
that does not render is caught too. Needs promtool (Debian's `prometheus` package, installed when missing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from support.prometheus import promtool

from dotsvlm_operator.monitoring import alerts

ROOT = Path(__file__).resolve().parents[2]
ALERTS_FILE = ROOT / "charts" / "dotsvlm-operator" / "files" / "alerts.yaml"
L = 'dotsvlm_namespace="ml",dotsvlm_deployment="dots"'
WHO = {"dotsvlm_namespace": "ml", "dotsvlm_deployment": "dots"}
EVAL = "30m"


def s(name: str, labels: str, values: str) -> dict:
    return {"series": f"{name}{{{L}{',' + labels if labels else ''}}}", "values": values}


def const(v: float) -> str:
    return f"{v:g}+0x40"


def hist(metric: str, labels: str, bucket_le: str, bounds: tuple[str, ...]) -> list[dict]:
    """A histogram's buckets (`bounds` and +Inf) with 10 observations a minute, all in the bucket `bucket_le`
    (earlier buckets empty)."""
    out = []
    for le in (*bounds, "+Inf"):
        grows = float(le.replace("+Inf", "inf")) >= float(bucket_le)
        out.append(s(f"{metric}_bucket", f'{labels}{"," if labels else ""}le="{le}"', "0+10x40" if grows else const(0)))
    return out


def ttft(modality: str, bucket_le: str) -> list[dict]:
    """10 requests a minute, all in the bucket `bucket_le` (earlier buckets empty)."""
    return hist("ray_dotsvlm_time_to_first_token_seconds", f'modality="{modality}"', bucket_le,
                ("1", "2", "2.5", "5", "10"))


def itl(bucket_le: str, modality: str = "text") -> list[dict]:
    return hist("ray_dotsvlm_inter_token_latency_seconds", f'modality="{modality}"', bucket_le,
                ("0.05", "0.1", "0.2", "0.25", "0.3", "0.5", "0.75"))


def vision_latency(bucket_le: str) -> list[dict]:
    return hist("ray_dotsvlm_vision_request_seconds", "", bucket_le, ("2.5", "5", "10", "12.5", "15", "20"))


# alert -> (firing series, the alert's extra labels, its $value; silent series)
CASES: dict[str, tuple[list[dict], dict[str, str], float, list[dict]]] = {
    # At maxReplicas with images waiting fires; at maxReplicas with every pending image being encoded (no
    # backlog: a pool sized right for a steady load) stays silent.
    "DotsVLMVisionPoolSaturated": (
        [s("dotsvlm_pool_desired_replicas", 'pool="vision"', const(4)),
         s("dotsvlm_pool_max_replicas", 'pool="vision"', const(4)),
         s("ray_dotsvlm_vision_pending_images", 'replica="a"', const(3)),
         s("ray_dotsvlm_vision_encoding_images", 'replica="v"', const(1))], {}, 4,
        [s("dotsvlm_pool_desired_replicas", 'pool="vision"', const(4)),
         s("dotsvlm_pool_max_replicas", 'pool="vision"', const(4)),
         s("ray_dotsvlm_vision_pending_images", 'replica="a"', const(3)),
         s("ray_dotsvlm_vision_encoding_images", 'replica="v"', const(3))]),
    "DotsVLMLLMPoolSaturated": (
        [s("dotsvlm_pool_desired_replicas", 'pool="llm"', const(2)),
         s("dotsvlm_pool_max_replicas", 'pool="llm"', const(2)),
         s("ray_dotsvlm_queue_depth", "", const(5))], {}, 2,
        [s("dotsvlm_pool_desired_replicas", 'pool="llm"', const(2)),
         s("dotsvlm_pool_max_replicas", 'pool="llm"', const(2)),
         s("ray_dotsvlm_queue_depth", "", const(0))]),
    "DotsVLMQueueRejecting": (
        [s("ray_dotsvlm_queue_events_total", 'event="rejected_full"', "0+6x40")], {}, 0.1,
        [s("ray_dotsvlm_queue_events_total", 'event="rejected_full"', const(5)),
         s("ray_dotsvlm_queue_events_total", 'event="enqueued"', "0+60x40")]),
    "DotsVLMQueueFilling": (
        [s("ray_dotsvlm_queue_depth", "", const(80)), s("ray_dotsvlm_queue_max_items", "", const(100))], {}, 0.8,
        [s("ray_dotsvlm_queue_depth", "", const(20)), s("ray_dotsvlm_queue_max_items", "", const(100))]),
    "DotsVLMQueueItemsWaitingLong": (
        [s("ray_dotsvlm_queue_oldest_age_seconds", "", const(120))], {}, 120,
        [s("ray_dotsvlm_queue_oldest_age_seconds", "", const(10))]),
    # The targets are spec.slo's defaults as p90s (text 2 s, image 10 s): an image p90 of 9.5 s is within its
    # target, a text p90 of 9.5 s is not.
    "DotsVLMTimeToFirstTokenHigh": (
        ttft("text", "10") + ttft("image", "1"), {"modality": "text"}, 9.5,
        ttft("text", "2") + ttft("image", "10")),
    # spec.slo's default inter-token target, 0.2 s, over both modalities (the autoscaler's one p90): text tokens
    # every 0.1-0.2 s and image ones every 0.25-0.3 s, as many, are over it (p90 0.29 s); both at 0.1-0.2 s are
    # within.
    "DotsVLMInterTokenLatencyHigh": (
        itl("0.2") + itl("0.3", "image"), {}, 0.29,
        itl("0.2") + itl("0.2", "image")),
    # The default encode budget (image TTFT 10 s x encodeBudgetFraction 0.5): 5 s.
    "DotsVLMVisionEncodeLatencyHigh": (
        vision_latency("10"), {}, 9.5,
        vision_latency("5")),
    "DotsVLMHighErrorRate": (
        [s("ray_dotsvlm_requests_total", 'code="500",modality="text"', "0+1x40"),
         s("ray_dotsvlm_requests_total", 'code="200",modality="text"', "0+9x40")], {}, 0.1,
        [s("ray_dotsvlm_requests_total", 'code="500",modality="text"', const(3)),
         s("ray_dotsvlm_requests_total", 'code="200",modality="text"', "0+9x40")]),
    "DotsVLMReplicasNotReady": (
        [s("dotsvlm_pool_ready_replicas", 'pool="llm"', const(1)),
         s("dotsvlm_pool_desired_replicas", 'pool="llm"', const(2))], {"pool": "llm"}, 1,
        [s("dotsvlm_pool_ready_replicas", 'pool="llm"', const(2)),
         s("dotsvlm_pool_desired_replicas", 'pool="llm"', const(2))]),
    "DotsVLMPodsUnschedulable": (
        [s("dotsvlm_pool_unschedulable_pods", 'pool="vision"', const(2))], {"pool": "vision"}, 2,
        [s("dotsvlm_pool_unschedulable_pods", 'pool="vision"', const(0))]),
    "DotsVLMOperatorReconcileErrors": (
        [s("dotsvlm_operator_reconciles_total", 'result="error"', "0+1x40")], {}, 10,
        [s("dotsvlm_operator_reconciles_total", 'result="error"', const(4)),
         s("dotsvlm_operator_reconciles_total", 'result="success"', "0+1x40")]),
}

_TEMPLATE = re.compile(r"\{\{\s*(\$labels\.(\w+)|\$value\s*\|\s*printf\s*\"([^\"]+)\")\s*\}\}")


def render(template: str, labels: dict[str, str], value: float) -> str:
    """The two template forms the rules use: {{ $labels.x }} and {{ $value | printf "FMT" }}."""
    def one(m: re.Match[str]) -> str:
        return labels[m.group(2)] if m.group(2) else m.group(3) % value
    out = _TEMPLATE.sub(one, template)
    assert "{{" not in out, f"a template form this test does not know: {template}"
    return out


def _rules() -> dict[str, dict]:
    doc = yaml.safe_load(ALERTS_FILE.read_text())
    return {r["alert"]: r for g in doc["groups"] for r in g["rules"]}


def test_every_alert_has_a_summary_a_description_and_test_cases() -> None:
    rules = _rules()
    assert set(rules) == {a.name for a in alerts.ALERTS} == set(CASES)
    for name, rule in rules.items():
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 80, name
        assert rule["labels"]["severity"] in ("warning", "critical"), name


def test_promtool_check_rules() -> None:
    done = promtool("check", "rules", str(ALERTS_FILE))
    assert done.returncode == 0 and f"SUCCESS: {len(alerts.ALERTS)} rules found" in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("name", sorted(CASES))
def test_promtool_alert_fires_when_it_should_and_stays_silent_otherwise(name: str, tmp_path: Path) -> None:
    rule = _rules()[name]
    firing, extra, value, silent = CASES[name]
    labels = {**WHO, **extra}
    expected = {"exp_labels": {**labels, "severity": rule["labels"]["severity"]},
                "exp_annotations": {k: render(v, labels, value) for k, v in rule["annotations"].items()}}
    doc = {
        "rule_files": [str(ALERTS_FILE)],
        "evaluation_interval": "1m",
        "tests": [
            {"interval": "1m", "input_series": firing,
             "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": [expected]},
                                 # not yet: the condition holds, but not for long enough
                                 {"eval_time": "2m", "alertname": name, "exp_alerts": []}]},
            {"interval": "1m", "input_series": silent,
             "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": []}]},
        ],
    }
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_vision_pool_saturated_fires_when_no_vision_replica_runs(tmp_path: Path) -> None:
    """At maxReplicas with images waiting and no vision replica running (their pods wait for GPUs): no vision
    replica exports `ray_dotsvlm_vision_encoding_images`, and `pending - encoding` over a missing series was
    empty, so the alert stayed silent in the very case it is for."""
    name = "DotsVLMVisionPoolSaturated"
    rule = _rules()[name]
    labels = dict(WHO)
    expected = {"exp_labels": {**labels, "severity": rule["labels"]["severity"]},
                "exp_annotations": {k: render(v, labels, 2) for k, v in rule["annotations"].items()}}
    firing = [s("dotsvlm_pool_desired_replicas", 'pool="vision"', const(2)),
              s("dotsvlm_pool_max_replicas", 'pool="vision"', const(2)),
              s("ray_dotsvlm_vision_pending_images", 'replica="a"', const(6))]
    # An idle deployment (nothing pending) at maxReplicas without a vision replica stays silent.
    silent = [s("dotsvlm_pool_desired_replicas", 'pool="vision"', const(2)),
              s("dotsvlm_pool_max_replicas", 'pool="vision"', const(2)),
              s("ray_dotsvlm_vision_pending_images", 'replica="a"', const(0))]
    doc = {"rule_files": [str(ALERTS_FILE)], "evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": firing,
                      "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": [expected]}]},
                     {"interval": "1m", "input_series": silent,
                      "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": []}]}]}
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_charts_ttft_alert_holds_each_deployment_to_its_own_slo(tmp_path: Path) -> None:
    """The chart's rules serve every deployment; its DotsVLMTimeToFirstTokenHigh compared the p90 with spec.slo's
    defaults, so a deployment with imageTTFTSeconds 30 was paged for a p90 of 20 s that its autoscaler (scaling
    against 30 s) rightly did nothing about. The rule now reads each deployment's targets from the operator's
    `dotsvlm_slo_time_to_first_token_seconds`, and keeps the defaults for one whose targets are not scraped."""
    name = "DotsVLMTimeToFirstTokenHigh"
    rule = _rules()[name]

    def image_p90_in(le_of_all: str) -> list[dict]:
        out = []
        for le in ("10", "20", "30", "40", "+Inf"):
            grows = float(le.replace("+Inf", "inf")) >= float(le_of_all)
            out.append(s("ray_dotsvlm_time_to_first_token_seconds_bucket", f'modality="image",le="{le}"',
                         "0+10x40" if grows else const(0)))
        return out

    target = s("dotsvlm_slo_time_to_first_token_seconds", 'modality="image"', const(30))
    labels = {**WHO, "modality": "image"}
    # p90 of every request in (30, 40]: 39 s, over the deployment's 30 s.
    expected = {"exp_labels": {**labels, "severity": rule["labels"]["severity"]},
                "exp_annotations": {k: render(v, labels, 39) for k, v in rule["annotations"].items()}}
    doc = {"rule_files": [str(ALERTS_FILE)], "evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": image_p90_in("20") + [target],  # p90 19 s: within 30 s
                      "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": []}]},
                     {"interval": "1m", "input_series": image_p90_in("40") + [target],
                      "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": [expected]}]},
                     # no target scraped: the default (image 10 s) holds, and 19 s is over it
                     {"interval": "1m", "input_series": image_p90_in("20"),
                      "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": [
                          {"exp_labels": expected["exp_labels"], "exp_annotations": {
                              k: render(v, labels, 19) for k, v in rule["annotations"].items()}}]}]}]}
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


# alert -> (its histogram's series with every observation in the bucket ending at `le`, the operator's target
# metric, the deployment's own target (above the default), a bucket whose p90 is within it, one over it, and
# the p90s those read as).
OWN_TARGETS = {
    # interTokenSeconds 0.5 (default 0.2): a p90 of 0.295 s is within it, 0.725 s over it.
    "DotsVLMInterTokenLatencyHigh": (itl, "dotsvlm_slo_inter_token_latency_seconds", 0.5, ("0.3", 0.295),
                                     ("0.75", 0.725)),
    # imageTTFTSeconds 30 with encodeBudgetFraction 0.5: a budget of 15 s (default 5 s); 12.25 s within, 19.5 over.
    "DotsVLMVisionEncodeLatencyHigh": (vision_latency, "dotsvlm_slo_vision_encode_budget_seconds", 15,
                                       ("12.5", 12.25), ("20", 19.5)),
}


@pytest.mark.parametrize("name", sorted(OWN_TARGETS))
def test_the_charts_latency_alerts_hold_each_deployment_to_its_own_target(name: str, tmp_path: Path) -> None:
    """The inter-token and vision-stage alerts, like the TTFT one, hold each deployment to the target its own
    autoscaler scales against (exported by the operator), and to the default where that is not scraped."""
    series, metric, own, (within_le, within), (over_le, over) = OWN_TARGETS[name]
    rule = _rules()[name]
    target = s(metric, "", const(own))

    def fires(value: float) -> list[dict]:
        return [{"exp_labels": {**WHO, "severity": rule["labels"]["severity"]},
                 "exp_annotations": {k: render(v, WHO, value) for k, v in rule["annotations"].items()}}]

    doc = {"rule_files": [str(ALERTS_FILE)], "evaluation_interval": "1m",
           "tests": [{"interval": "1m", "input_series": series(within_le) + [target],
                      "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": []}]},
                     {"interval": "1m", "input_series": series(over_le) + [target],
                      "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": fires(over)}]},
                     # no target scraped: the default holds, and the p90 within the deployment's own is over it
                     {"interval": "1m", "input_series": series(within_le),
                      "alert_rule_test": [{"eval_time": EVAL, "alertname": name, "exp_alerts": fires(within)}]}]}
    path = tmp_path / "test.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = promtool("test", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
