"""The alert rules, as data: one source for the chart's file and the operator's PrometheusRule.

Each alert says what is wrong (summary) and what to check (description); `docs/observability.md`
explains each one further. Every rule aggregates by `dotsvlm_namespace` and `dotsvlm_deployment`, the
labels that every dotsvlm series carries, so one rule file serves any number of deployments (the
chart), and the operator's per-deployment PrometheusRule narrows each rule to its own deployment.

`charts/dotsvlm-operator/files/alerts.yaml` is written by `python -m dotsvlm_operator.monitoring.generate`;
a unit test fails when it differs from `alerts_file()`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from dotsvlm_serving.metrics.catalog import DEPLOYMENT_LABEL, NAMESPACE_LABEL, prom
from dotsvlm_serving.serve_config import SLOConfig, VisionAutoscaling

GROUP = "dotsvlm"
BY = f"{NAMESPACE_LABEL}, {DEPLOYMENT_LABEL}"
# Time to first token, inter-token latency and the vision stage's time are held to the same service level the
# autoscaler scales against and status.slo reports on: spec.slo's p90s (per modality for TTFT; the vision stage's
# budget is imageTTFTSeconds x vision.autoscaling.encodeBudgetFraction, the EncodeLatency rule's). The chart's
# rules (every deployment) read each deployment's own from the operator's metrics, with the defaults where those
# are not scraped; the operator's per-deployment PrometheusRule has the deployment's own written in.
TTFT_QUANTILE = 0.9
TTFT_TARGET_SECONDS: dict[str, float] = {"text": SLOConfig().text_ttft_s, "image": SLOConfig().image_ttft_s}
ITL_TARGET_SECONDS = SLOConfig().inter_token_s
ENCODE_BUDGET_SECONDS = VisionAutoscaling().encode_budget_s(SLOConfig())
ERROR_RATIO = 0.05
_TARGETS = "@TTFT_TARGETS@"  # in a description: the targets its rule uses
_ITL_TARGET = "@ITL_TARGET@"
_ENCODE_BUDGET = "@ENCODE_BUDGET@"


class Sel:
    """A label selector: the deployment's own labels (empty for the chart's generic rules) plus extras, and
    the deployment's latency targets (spec.slo: time to first token, inter-token latency, and the vision stage's
    encode budget; the defaults for the chart's rules)."""

    def __init__(self, namespace: str | None = None, deployment: str | None = None,
                 ttft_targets: dict[str, float] | None = None, itl_target: float | None = None,
                 encode_budget: float | None = None) -> None:
        self.base = [] if namespace is None else [f'{NAMESPACE_LABEL}="{namespace}"', f'{DEPLOYMENT_LABEL}="{deployment}"']
        self.ttft_targets = ttft_targets or TTFT_TARGET_SECONDS
        self.itl_target = itl_target or ITL_TARGET_SECONDS
        self.encode_budget = encode_budget or ENCODE_BUDGET_SECONDS
        # The chart's rules serve every deployment: each is held to its own spec.slo as the operator exports it
        # (the defaults only where that is not scraped); the operator's own rule knows its deployment's.
        self.exported_targets = namespace is None

    def _own(self, values: str) -> str:
        if self.exported_targets:
            return f"this deployment's own; {values} where the operator's metrics are not scraped"
        return values

    def targets_text(self) -> str:
        return self._own(", ".join(f"{k} {v:g} s" for k, v in self.ttft_targets.items()))

    def describe(self, text: str) -> str:
        """A description with the targets its rule uses written in."""
        return (text.replace(_TARGETS, self.targets_text()).replace(_ITL_TARGET, self._own(f"{self.itl_target:g} s"))
                .replace(_ENCODE_BUDGET, self._own(f"{self.encode_budget:g} s")))

    def __call__(self, *extra: str) -> str:
        matchers = [*self.base, *extra]
        return "{" + ",".join(matchers) + "}" if matchers else ""


@dataclass(frozen=True)
class Alert:
    name: str
    expr: Callable[[Sel], str]
    for_: str
    severity: Literal["warning", "critical"]
    summary: str
    description: str

    def rule(self, sel: Sel) -> dict[str, Any]:
        return {"alert": self.name, "expr": self.expr(sel), "for": self.for_,
                "labels": {"severity": self.severity},
                "annotations": {"summary": self.summary, "description": sel.describe(self.description)}}


def _pool(metric: str, pool: str, s: Sel) -> str:
    selector = s(f'pool="{pool}"')
    return f"max by ({BY}) ({prom(metric)}{selector})"


def _sum_rate(metric: str, s: Sel, *match: str, window: str = "5m") -> str:
    return f"sum by ({BY}) (rate({prom(metric)}{s(*match)}[{window}]))"


def _p90(histogram: str, s: Sel, by: str, *match: str) -> str:
    bucket = prom(histogram) + "_bucket" + s(*match)
    return f"histogram_quantile({TTFT_QUANTILE:g}, sum by ({by}, le) (rate({bucket}[10m])))"


def _over_target(p90: str, s: Sel, target: float, target_metric: str, by: str, *match: str) -> str:
    """`p90` over the deployment's own target: written in (the operator's rule), or read from the operator's
    `target_metric` with `target` (the default) for a deployment whose operator metrics are not scraped."""
    if not s.exported_targets:
        return f"{p90} > {target:g}"
    own = f"max by ({by}) ({prom(target_metric)}{s(*match)})"
    return f"{p90}\n  > on ({by}) {own}\nor ({p90} > {target:g}\n  unless on ({by}) {own})"


def _ttft(s: Sel) -> str:
    parts = []
    for modality, target in s.ttft_targets.items():
        match = f'modality="{modality}"'
        p90 = _p90("dotsvlm_time_to_first_token_seconds", s, f"{BY}, modality", match)
        parts.append(_over_target(p90, s, target, "dotsvlm_slo_time_to_first_token_seconds", f"{BY}, modality", match))
    return "\n  or\n".join(f"({p})" for p in parts)


def _itl(s: Sel) -> str:
    # Over both modalities, as the autoscaler's one inter-token p90 (its InterTokenLatencyMiss rule).
    return _over_target(_p90("dotsvlm_inter_token_latency_seconds", s, BY), s, s.itl_target,
                        "dotsvlm_slo_inter_token_latency_seconds", BY)


def _vision_latency(s: Sel) -> str:
    return _over_target(_p90("dotsvlm_vision_request_seconds", s, BY), s, s.encode_budget,
                        "dotsvlm_slo_vision_encode_budget_seconds", BY)


WHO = "{{ $labels.dotsvlm_namespace }}/{{ $labels.dotsvlm_deployment }}"

ALERTS: tuple[Alert, ...] = (
    Alert(
        "DotsVLMVisionPoolSaturated",
        lambda s: (f"{_pool('dotsvlm_pool_desired_replicas', 'vision', s)} >= "
                   f"{_pool('dotsvlm_pool_max_replicas', 'vision', s)}\n"
                   # Images waiting for a batch: sent by the ingresses and not back, less those being encoded;
                   # all of them while no vision replica runs (none exports the encoding gauge then: `a - b`
                   # of a missing `b` is empty, and the alert would stay silent when replicas cannot start).
                   f"and on ({BY}) ((sum by ({BY}) ({prom('dotsvlm_vision_pending_images')}{s()})\n"
                   f"  - sum by ({BY}) ({prom('dotsvlm_vision_encoding_images')}{s()}))\n"
                   f"  or sum by ({BY}) ({prom('dotsvlm_vision_pending_images')}{s()})) > 0"),
        "10m", "warning",
        f"{WHO}: the vision pool is at its maximum replicas and images are still waiting",
        "The vision pool wants maxReplicas ({{ $value | printf \"%.0f\" }}) and its replicas still have a backlog, so requests "
        "with images wait longer. Check the 'Vision pool' dashboard (backlog, encode latency, batch size); "
        "raise spec.vision.maxReplicas if the cluster has GPUs for it, or lower spec.vision.maxBatchPixels "
        "if batches are slow."),
    Alert(
        "DotsVLMLLMPoolSaturated",
        lambda s: (f"{_pool('dotsvlm_pool_desired_replicas', 'llm', s)} >= "
                   f"{_pool('dotsvlm_pool_max_replicas', 'llm', s)}\n"
                   f"and on ({BY}) max by ({BY}) ({prom('dotsvlm_queue_depth')}{s()}) > 0"),
        "10m", "warning",
        f"{WHO}: the LLM pool is at its maximum replicas and work waits in the tensor queue",
        "The LLM pool wants maxReplicas ({{ $value | printf \"%.0f\" }}) while requests wait in the tensor queue. Check the "
        "'LLM pool' dashboard (running requests, KV-cache use) and the 'Tensor queue' dashboard; raise "
        "spec.llm.maxReplicas if GPUs are free, or spec.llm.maxRunningRequests if the KV cache has room."),
    Alert(
        "DotsVLMQueueRejecting",
        lambda s: _sum_rate("dotsvlm_queue_events", s, 'event="rejected_full"') + " > 0",
        "5m", "critical",
        f"{WHO}: the tensor queue is full and requests are refused with 429",
        "Requests waited spec.queue.enqueueTimeoutSeconds for room in the tensor queue and were refused "
        "({{ $value | printf \"%.2f\" }} per second). The LLM pool does not keep up: check whether it is at "
        "maxReplicas (DotsVLMLLMPoolSaturated), whether LLM replicas are ready (DotsVLMReplicasNotReady), "
        "and the 'Tensor queue' dashboard. spec.queue.maxItems/maxBytes only buys time."),
    Alert(
        "DotsVLMQueueFilling",
        lambda s: (f"max by ({BY}) ({prom('dotsvlm_queue_depth')}{s()})\n"
                   f"/ max by ({BY}) ({prom('dotsvlm_queue_max_items')}{s()}) > 0.5"),
        "10m", "warning",
        f"{WHO}: the tensor queue has stayed over half full",
        "The tensor queue is {{ $value | printf \"%.2f\" }} full (1 = at capacity) and has been over half full for "
        "10 minutes: "
        "the LLM pool takes work more slowly than it arrives. Check LLM replicas (ready, KV-cache use, "
        "running requests) on the 'LLM pool' dashboard and whether the pool autoscaler adds replicas "
        "('Autoscaler decisions' dashboard). Rejections (429) follow when it is full."),
    Alert(
        "DotsVLMQueueItemsWaitingLong",
        lambda s: f"max by ({BY}) ({prom('dotsvlm_queue_oldest_age_seconds')}{s()}) > 60",
        "5m", "warning",
        f"{WHO}: work has waited over a minute in the tensor queue",
        "The oldest item in the tensor queue is {{ $value | printf \"%.0f\" }} s old. If LLM replicas are "
        "running below maxRunningRequests, an item may need more KV cache than any replica has free (check "
        "KV-cache use); if no LLM replica heartbeats (ray_dotsvlm_queue_consumers is 0), check the LLM pods' "
        "logs and `kubectl describe` of the DotsVLMDeployment."),
    Alert(
        "DotsVLMTimeToFirstTokenHigh",
        _ttft,
        "10m", "warning",
        f"{WHO}: p90 time to first token is over target for {{{{ $labels.modality }}}} requests",
        "The 90th percentile time to first token of {{ $labels.modality }} requests is {{ $value | "
        "printf \"%.2f\" }} s (targets, spec.slo: " + _TARGETS + "), although the autoscaler scales "
        "against the same targets: its pools are most likely at maxReplicas or short of GPUs. For image requests check the vision pool (backlog, encode latency); for all, the tensor queue "
        "wait and the LLM pool's running requests. See the 'Overview' dashboard."),
    Alert(
        "DotsVLMInterTokenLatencyHigh",
        _itl,
        "10m", "warning",
        f"{WHO}: p90 inter-token latency is over target",
        "The 90th percentile of the mean time between two generated tokens of a request is {{ $value | "
        "printf \"%.3f\" }} s (target, spec.slo.interTokenSeconds: " + _ITL_TARGET + "), although the autoscaler "
        "scales the LLM pool against the same target: the pool is most likely at maxReplicas "
        "(DotsVLMLLMPoolSaturated) or its new replicas cannot be placed (DotsVLMPodsUnschedulable). Check the 'LLM "
        "pool' dashboard: running requests per replica and KV-cache use (lower spec.llm.maxRunningRequests for "
        "faster tokens at less throughput), and raise spec.llm.maxReplicas if GPUs are free."),
    Alert(
        "DotsVLMVisionEncodeLatencyHigh",
        _vision_latency,
        "10m", "warning",
        f"{WHO}: images take longer in the vision stage than their share of the image TTFT target",
        "The 90th percentile time for a request's images to come back from the vision pool (queueing and batching "
        "included) is {{ $value | printf \"%.2f\" }} s, over the encode budget (spec.slo.imageTTFTSeconds x "
        "spec.vision.autoscaling.encodeBudgetFraction: " + _ENCODE_BUDGET + "), although the autoscaler scales the "
        "vision pool against the same budget: the vision pool does not keep up. Check the 'Vision pool' dashboard: "
        "at maxReplicas (DotsVLMVisionPoolSaturated) raise spec.vision.maxReplicas; pods pending "
        "(DotsVLMPodsUnschedulable) need GPUs; slow batches with a short backlog: lower spec.vision.maxBatchPixels."),
    Alert(
        "DotsVLMHighErrorRate",
        lambda s: (_sum_rate("dotsvlm_requests", s, 'code=~"5.."') + "\n/ " + _sum_rate("dotsvlm_requests", s)
                   + f" > {ERROR_RATIO:g}"),
        "10m", "critical",
        f"{WHO}: over {ERROR_RATIO:.0%} of requests fail with a server error",
        "A fraction of {{ $value | printf \"%.2f\" }} of chat requests end in 5xx. 503 means a serving component was "
        "unavailable (replicas restarting, Ray failures): check the Ray pods' logs and restarts; 504 means "
        "requests hit spec.api.requestTimeoutSeconds. The 'Overview' dashboard shows errors by code."),
    Alert(
        "DotsVLMReplicasNotReady",
        lambda s: (f"max by ({BY}, pool) ({prom('dotsvlm_pool_ready_replicas')}{s()})\n"
                   f"< max by ({BY}, pool) ({prom('dotsvlm_pool_desired_replicas')}{s()})"),
        "15m", "warning",
        f"{WHO}: the {{{{ $labels.pool }}}} pool has fewer ready replicas than it wants",
        "Only {{ $value | printf \"%.0f\" }} replicas of the {{ $labels.pool }} pool are ready, fewer than desired, for 15 "
        "minutes. Check `kubectl describe dotsvlmdeployment` (its conditions say why), the pool's pods "
        "(Pending: see DotsVLMPodsUnschedulable; CrashLoopBackOff or ImagePullBackOff: the pod's events "
        "and logs)."),
    Alert(
        "DotsVLMPodsUnschedulable",
        lambda s: f"max by ({BY}, pool) ({prom('dotsvlm_pool_unschedulable_pods')}{s()}) > 0",
        "10m", "warning",
        f"{WHO}: {{{{ $value | printf \"%.0f\" }}}} pods of the {{{{ $labels.pool }}}} pool cannot be scheduled",
        "The scheduler cannot place these pods, most often for lack of free GPUs (nvidia.com/gpu). Run "
        "`kubectl describe pod` on a Pending pod of the pool: the events name what is missing. Check the "
        "GPU nodes' allocatable GPUs, the pool's nodeSelector and tolerations, and whether a cluster "
        "autoscaler can add GPU nodes; or lower the pool's maxReplicas."),
    Alert(
        "DotsVLMOperatorReconcileErrors",
        lambda s: (f"sum by ({BY}) (increase({prom('dotsvlm_operator_reconciles')}"
                   + s('result="error"') + "[10m])) > 0"),
        "15m", "warning",
        f"{WHO}: the operator keeps failing to reconcile this deployment",
        "Reconcile passes have failed for 15 minutes ({{ $value | printf \"%.0f\" }} in the last 10 minutes). The "
        "DotsVLMDeployment's Degraded condition (reason ReconcileFailed) carries the API server's message: "
        "`kubectl describe dotsvlmdeployment`. Common causes: RBAC (the operator's ServiceAccount), an "
        "admission webhook refusing a child object, the Ray head unreachable. The operator's logs have "
        "the full error."),
)


def rule_groups(sel: Sel | None = None) -> list[dict[str, Any]]:
    return [{"name": GROUP, "rules": [a.rule(sel or Sel()) for a in ALERTS]}]


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (PromQL) as literal blocks, so the file reads like the code."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


def alerts_file() -> str:
    """The chart's alerts.yaml: a document with a top-level `groups:` list (the PrometheusRule spec)."""
    head = "# Generated by `python -m dotsvlm_operator.monitoring.generate` from monitoring/alerts.py; do not edit.\n"
    return head + dump({"groups": rule_groups()})


def prometheus_rule(meta: dict[str, Any], namespace: str, deployment: str,
                    ttft_targets: dict[str, float] | None = None, itl_target: float | None = None,
                    encode_budget: float | None = None) -> dict[str, Any]:
    """The PrometheusRule the operator renders for one deployment (its rules see only its own series, and
    hold it to its own spec.slo)."""
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule", "metadata": meta,
            "spec": {"groups": rule_groups(Sel(namespace, deployment, ttft_targets, itl_target, encode_budget))}}
