"""The Grafana dashboards, as code (grafana-foundation-sdk; a dev dependency, never imported by the operator).

Six dashboards: overview, vision pool, tensor queue, LLM pool, autoscaler decisions, operator. Each is
templated by data source, namespace and deployment (the `dotsvlm_namespace` / `dotsvlm_deployment`
labels every dotsvlm series carries). Metric names come from the catalogue, so a renamed metric breaks
the generator rather than a dashboard. The serving test runs every panel's queries against a real
Prometheus and fails on a panel that returns nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from dotsvlm_serving.metrics.catalog import DEPLOYMENT_LABEL, NAMESPACE_LABEL, prom
from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus as gp
from grafana_foundation_sdk.builders import stat as gstat
from grafana_foundation_sdk.builders import timeseries as gts
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as dm

from dotsvlm_operator.monitoring.alerts import (ENCODE_BUDGET_SECONDS, ITL_TARGET_SECONDS, TTFT_QUANTILE,
                                                TTFT_TARGET_SECONDS)

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
S = f'{NAMESPACE_LABEL}=~"$namespace",{DEPLOYMENT_LABEL}=~"$deployment"'
RATE = "$__rate_interval"
TAGS = ["dotsvlm"]
SERVER_ERRORS = 'code=~"5.."'


def sel(*extra: str) -> str:
    return "{" + ",".join([S, *extra]) + "}"


def rate(metric: str, *extra: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    return f"sum{group} (rate({prom(metric)}{sel(*extra)}[{RATE}]))"


def quantile(q: float, metric: str, by: str = "") -> str:
    keys = f"{by}, le" if by else "le"
    return f"histogram_quantile({q:g}, sum by ({keys}) (rate({prom(metric)}_bucket{sel()}[{RATE}])))"


def mean(metric: str, by: str = "") -> str:
    group = f" by ({by})" if by else ""
    name = prom(metric)
    return (f"sum{group} (rate({name}_sum{sel()}[{RATE}])) / sum{group} (rate({name}_count{sel()}[{RATE}]))")


def gauge(metric: str, agg: str = "sum", by: str = "", *extra: str) -> str:
    group = f" by ({by})" if by else ""
    return f"{agg}{group} ({prom(metric)}{sel(*extra)})"


# A target line's `source` label: the deployment's own (exported by the operator), or spec.slo's default where
# the operator's metrics are not scraped (what the chart's alerts then hold the deployment to).
OWN_TARGET = "spec.slo"
DEFAULT_TARGET = "spec.slo default, operator metrics not scraped"


def _labelled(expr: str, **labels: str) -> str:
    for name, value in labels.items():
        expr = f'label_replace({expr}, "{name}", "{value}", "", "")'
    return expr


def target(metric: str, default: float | dict[str, float], by: str = "") -> str:
    """A target line as the chart's alert and the autoscaler read it: the deployment's own from the operator's
    `metric`, and spec.slo's `default` (per value of the label `by` when a dict) where that is not scraped."""
    own = _labelled(gauge(metric, "max", by), source=OWN_TARGET)
    if isinstance(default, dict):
        fallback = " or ".join(_labelled(f"vector({v:g})", **{by: k}, source=DEFAULT_TARGET)
                               for k, v in default.items())
        return f"{own} or on ({by}) ({fallback})"
    return f"{own} or on () {_labelled(f'vector({default:g})', source=DEFAULT_TARGET)}"


@dataclass
class Panel:
    title: str
    description: str
    queries: list[tuple[str, str]]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"  # or "stat"
    width: int = 12
    min_zero: bool = True


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    # The namespace/deployment drop-downs' source: a gauge of a component that always runs (ingress, queue,
    # operator), not of a pool that can be at zero, nor a counter that exists only after its first event.
    variable_metric: str
    rows: list[tuple[str, list[Panel]]] = field(default_factory=list)


def _panel(p: Panel) -> gts.Panel | gstat.Panel:
    b = gts.Panel() if p.kind == "timeseries" else gstat.Panel()
    b.title(p.title).description(p.description).datasource(DS).unit(p.unit).span(p.width)
    b.height(8 if p.kind == "timeseries" else 5)
    if p.min_zero:
        b.min(0)
    for i, (expr, legend) in enumerate(p.queries):
        b.with_target(gp.Dataquery().expr(expr).legend_format(legend).ref_id(chr(ord("A") + i)))
    return b


def build(d: Dashboard) -> dict:
    metric = prom(d.variable_metric)
    b = (gd.Dashboard(d.title).uid(d.uid).description(d.description).tags(TAGS).editable()
         .time("now-1h", "now").refresh("30s").tooltip(dm.DashboardCursorSync.CROSSHAIR)
         .with_variable(gd.DatasourceVariable("datasource").label("Data source").type("prometheus"))
         .with_variable(gd.QueryVariable("namespace").label("Namespace").datasource(DS)
                        .query(f"label_values({metric}, {NAMESPACE_LABEL})")
                        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC))
         .with_variable(gd.QueryVariable("deployment").label("DotsVLMDeployment").datasource(DS)
                        .query(f'label_values({metric}{{{NAMESPACE_LABEL}=~"$namespace"}}, {DEPLOYMENT_LABEL})')
                        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED).sort(dm.VariableSort.ALPHABETICAL_ASC)))
    # Panels straight on the grid, row by row (Grafana's row panels would start collapsed).
    panel_id = 0
    for _title, panels in d.rows:
        for p in panels:
            panel_id += 1
            b.with_panel(_panel(p).id(panel_id))
    out = json.loads(json.dumps(b.build(), cls=JSONEncoder))
    for panel in out["panels"]:
        if panel.get("options") is None:
            panel.pop("options", None)
    return out


# --- the dashboards --------------------------------------------------------------------------------------

def _replicas(pool: str) -> Panel:
    return Panel(f"{pool} pool replicas", f"Desired, current and ready replicas of the {pool} pool, as the operator "
                 "reports them in the resource's status.",
                 [(gauge("dotsvlm_pool_desired_replicas", "max", "", f'pool="{pool}"'), "desired"),
                  (gauge("dotsvlm_pool_current_replicas", "max", "", f'pool="{pool}"'), "running (Serve)"),
                  (gauge("dotsvlm_pool_replicas", "max", "", f'pool="{pool}"'), "pods exist"),
                  (gauge("dotsvlm_pool_ready_replicas", "max", "", f'pool="{pool}"'), "ready"),
                  (gauge("dotsvlm_pool_max_replicas", "max", "", f'pool="{pool}"'), "max")])


def _ttft_with_targets() -> list[tuple[str, str]]:
    out = [(quantile(TTFT_QUANTILE, "dotsvlm_time_to_first_token_seconds", "modality"), "p90 {{modality}}"),
           (quantile(0.5, "dotsvlm_time_to_first_token_seconds", "modality"), "p50 {{modality}}")]
    # Each deployment's own spec.slo (the operator exports it), as the autoscaler and its alert read it.
    out.append((target("dotsvlm_slo_time_to_first_token_seconds", TTFT_TARGET_SECONDS, "modality"),
                "target {{modality}} ({{source}})"))
    return out


def _itl_with_target() -> list[tuple[str, str]]:
    # DotsVLMInterTokenLatencyHigh and the autoscaler's InterTokenLatencyMiss hold the p90 over both modalities.
    return [(quantile(TTFT_QUANTILE, "dotsvlm_inter_token_latency_seconds"), "p90 (all requests)"),
            (quantile(0.5, "dotsvlm_inter_token_latency_seconds", "modality"), "p50 {{modality}}"),
            (target("dotsvlm_slo_inter_token_latency_seconds", ITL_TARGET_SECONDS), "target ({{source}})")]


ITL_DESCRIPTION = ("Per-request mean time between output tokens: p90 over all requests against the deployment's "
                   "spec.slo.interTokenSeconds (the autoscaler scales the LLM pool against it; "
                   "DotsVLMInterTokenLatencyHigh fires over it; drawn from the operator's metrics), p50 per "
                   "modality.")


OVERVIEW = Dashboard(
    "dotsvlm-overview", "dotsvlm / Overview",
    "Traffic, errors and latency of one DotsVLMDeployment, per modality (text-only vs with images).",
    "dotsvlm_requests_in_flight",
    [("Traffic and errors", [
        Panel("Requests per second", "Chat completion requests answered, by modality (none: refused before the "
              "messages were read).", [(rate("dotsvlm_requests", by="modality"), "{{modality}}")], "reqps", width=8),
        Panel("Errors per second by code", "Requests answered with a 4xx or 5xx status.",
              [(rate("dotsvlm_requests", 'code!~"2.."', by="code"), "{{code}}")], "reqps",
              width=8),
        Panel("Server error ratio", "Share of requests answered with 5xx (the DotsVLMHighErrorRate alert fires over "
              "5% for 10 minutes).",
              [(f"({rate('dotsvlm_requests', SERVER_ERRORS)} or vector(0)) / {rate('dotsvlm_requests')}", "5xx ratio")],
              "percentunit", "stat", width=4),
        Panel("Requests in flight", "Requests being served, over all ingress replicas.",
              [(gauge("dotsvlm_requests_in_flight"), "in flight")], "short", "stat", width=4),
    ]),
     ("Latency per modality", [
         Panel("Time to first token", "p50 and p90 per modality, against the deployment's spec.slo targets (the "
               "autoscaler scales against them; DotsVLMTimeToFirstTokenHigh fires over them; drawn from the "
               "operator's metrics).",
               _ttft_with_targets(), "s", width=8),
         Panel("Inter-token latency", ITL_DESCRIPTION, _itl_with_target(), "s", width=8),
         Panel("End-to-end latency", "p50 and p95 per modality, from arrival to the last token.",
               [(quantile(0.95, "dotsvlm_request_duration_seconds", "modality"), "p95 {{modality}}"),
                (quantile(0.5, "dotsvlm_request_duration_seconds", "modality"), "p50 {{modality}}")], "s", width=8),
     ]),
     ("Throughput and capacity", [
         Panel("Tokens per second", "Prompt and generated tokens of completed requests, by modality.",
               [(rate("dotsvlm_completion_tokens", by="modality"), "generated {{modality}}"),
                (rate("dotsvlm_prompt_tokens", by="modality"), "prompt {{modality}}")], "short", width=8),
         Panel("Images per second", "Images received by the API.", [(rate("dotsvlm_images"), "images")], "short", width=8),
         Panel("Ready replicas per pool", "Ready replicas of each pool (operator status).",
               [(gauge("dotsvlm_pool_ready_replicas", "max", "pool"), "{{pool}}")], "short", width=8),
     ])],
)

VISION = Dashboard(
    "dotsvlm-vision", "dotsvlm / Vision pool",
    "The vision encoder pool: throughput, batching, latency and backlog, per replica.",
    "dotsvlm_vision_pending_images",  # (the ingress's: there with the pool at zero too)
    [("Work", [
        Panel("Images encoded per second", "Per vision replica.",
              [(rate("dotsvlm_vision_images_encoded", by="replica"), "{{replica}}")], "short"),
        Panel("Pixels encoded per second", "After resize, per vision replica.",
              [(rate("dotsvlm_vision_pixels_encoded", by="replica"), "{{replica}}")], "short"),
        Panel("Backlog", "Images sent to the vision pool and not back yet, as the ingress (and the pool "
              "autoscaler) counts them; and, per vision replica, images waiting for a batch and being encoded.",
              [(gauge("dotsvlm_vision_pending_images"), "pending (ingress view)"),
               (gauge("dotsvlm_vision_backlog_images", "sum", "replica"), "waiting {{replica}}"),
               (gauge("dotsvlm_vision_encoding_images", "sum", "replica"), "encoding {{replica}}")], "short"),
        Panel("Request encode latency", "Time for one request's images to come back from the vision pool, queueing "
              "and batching included, p90 and p50, against the deployment's encode budget "
              "(spec.slo.imageTTFTSeconds x spec.vision.autoscaling.encodeBudgetFraction: the autoscaler's "
              "EncodeLatency rule scales the pool against it; DotsVLMVisionEncodeLatencyHigh fires over it; drawn "
              "from the operator's metrics).",
              [(quantile(TTFT_QUANTILE, "dotsvlm_vision_request_seconds"), "p90"),
               (quantile(0.5, "dotsvlm_vision_request_seconds"), "p50"),
               (target("dotsvlm_slo_vision_encode_budget_seconds", ENCODE_BUDGET_SECONDS), "budget ({{source}})")],
              "s"),
        Panel("Batch encode latency", "Time to encode one batch on the tower, p50 and p95.",
              [(quantile(0.95, "dotsvlm_vision_encode_seconds"), "p95"),
               (quantile(0.5, "dotsvlm_vision_encode_seconds"), "p50")], "s"),
        Panel("Images per batch", "Mean and p95 batch size (batches are cut by spec.vision.maxBatchPixels).",
              [(mean("dotsvlm_vision_batch_images"), "mean"),
               (quantile(0.95, "dotsvlm_vision_batch_images"), "p95")], "short"),
        _replicas("vision"),
    ]),
     ("Backpressure", [
         Panel("Refused with 429 per second", "Requests refused because a stage was full, by stage and reason: "
               "vision (vision_backlog_full: spec.vision.maxPendingPixelsPerReplica / maxPendingPixels), ingress "
               "(image_bytes_full: spec.api.maxImageBytesInFlight), queue (queue_full).",
               [(f"sum by (stage, reason) (rate({prom('dotsvlm_rejected_requests')}{sel()}[{RATE}])) or vector(0)",
                 "{{stage}}: {{reason}}")], "reqps"),
         Panel("Memory held for waiting images", "Pixels each vision replica holds decoded (bounded per replica) "
               "and image bytes each API replica holds before the first token (bounded per API replica).",
               [(gauge("dotsvlm_vision_held_pixels", "sum", "replica"), "vision pixels {{replica}}"),
                (gauge("dotsvlm_ingress_image_bytes", "sum", "replica"), "ingress bytes {{replica}}")], "short"),
     ])],
)

QUEUE = Dashboard(
    "dotsvlm-queue", "dotsvlm / Tensor queue",
    "The tensor queue between the pools: depth against capacity, waiting time, rejections and redeliveries.",
    "dotsvlm_queue_depth",
    [("Queue", [
        Panel("Depth", "Items waiting, against capacity (spec.queue.maxItems).",
              [(gauge("dotsvlm_queue_depth", "max"), "depth"), (gauge("dotsvlm_queue_max_items", "max"), "capacity"),
               (gauge("dotsvlm_queue_leased_items", "max"), "leased to LLM replicas")], "short"),
        Panel("Bytes", "Bytes of image embeddings waiting, against capacity (spec.queue.maxBytes).",
              [(gauge("dotsvlm_queue_bytes", "max"), "bytes"), (gauge("dotsvlm_queue_max_bytes", "max"), "capacity")],
              "bytes"),
        Panel("Oldest item age", "How long the oldest waiting item has waited (DotsVLMQueueItemsWaitingLong at 60 s).",
              [(gauge("dotsvlm_queue_oldest_age_seconds", "max"), "oldest")], "s"),
        Panel("Wait time", "Time from enqueue to an LLM replica taking the item, p50 and p95.",
              [(quantile(0.95, "dotsvlm_queue_wait_seconds"), "p95"), (quantile(0.5, "dotsvlm_queue_wait_seconds"), "p50")],
              "s"),
        Panel("Events per second", "Enqueued, taken, completed, cancelled; rejected_full (answered 429); "
              "redelivered and failed_consumer_lost (an LLM replica died holding work).",
              [(rate("dotsvlm_queue_events", by="event"), "{{event}}")], "short"),
        Panel("Rejections per second", "Requests refused with 429 because the queue stayed full "
              "(DotsVLMQueueRejecting).", [(rate("dotsvlm_queue_events", 'event="rejected_full"'), "rejected")], "short"),
        Panel("Producers waiting for room", "Requests waiting to enter the full queue.",
              [(gauge("dotsvlm_queue_waiting_producers", "max"), "waiting")], "short"),
        Panel("LLM replicas heartbeating", "Consumers the queue hears from.",
              [(gauge("dotsvlm_queue_consumers", "max"), "consumers")], "short"),
    ])],
)

LLM = Dashboard(
    "dotsvlm-llm", "dotsvlm / LLM pool",
    "The LLM pool: running and waiting requests, KV-cache use, tokens per second, inter-token latency.",
    "dotsvlm_queue_depth",  # (the queue's: there with the pool at zero too)
    [("Load", [
        Panel("Running requests", "Requests decoding, per LLM replica.",
              [(gauge("dotsvlm_llm_running_requests", "sum", "replica"), "{{replica}}")], "short"),
        Panel("Waiting requests", "Taken by a replica, not yet prefilled; and waiting in the tensor queue.",
              [(gauge("dotsvlm_llm_waiting_requests", "sum", "replica"), "{{replica}}"),
               (gauge("dotsvlm_queue_depth", "max"), "in the tensor queue")], "short"),
        Panel("KV-cache use", "Tokens held, and reserved (prompt + max_tokens), over capacity, per replica.",
              [(f'{gauge("dotsvlm_llm_kv_cache_used_tokens", "sum", "replica")} / '
                f'{gauge("dotsvlm_llm_kv_cache_capacity_tokens", "sum", "replica")}', "used {{replica}}"),
               (f'{gauge("dotsvlm_llm_kv_cache_reserved_tokens", "sum", "replica")} / '
                f'{gauge("dotsvlm_llm_kv_cache_capacity_tokens", "sum", "replica")}', "reserved {{replica}}")],
              "percentunit"),
        Panel("Tokens per second", "Tokens generated, per LLM replica.",
              [(rate("dotsvlm_llm_generated_tokens", by="replica"), "{{replica}}")], "short"),
        Panel("Inter-token latency", ITL_DESCRIPTION, _itl_with_target(), "s"),
        _replicas("llm"),
    ])],
)

AUTOSCALER = Dashboard(
    "dotsvlm-autoscaler", "dotsvlm / Autoscaler decisions",
    "What the pool autoscaler wants and why, beside the signals it reads and what the operator runs.",
    "dotsvlm_pool_desired_replicas",
    [("Decisions", [
        Panel("Autoscaler desired replicas", "Replicas the pool autoscaler wants, per pool.",
              [(gauge("dotsvlm_autoscaler_desired_replicas", "max", "pool"), "{{pool}}")], "short"),
        Panel("Decisions", "Scale decisions per pool and direction (up, down) over 5 minutes.",
              [(f'sum by (pool, direction) (increase({prom("dotsvlm_autoscaler_decisions")}{sel()}[5m]))',
                "{{pool}} {{direction}}")], "short"),
        Panel("Decisions by reason", "Why the autoscaler decided, per pool, over 5 minutes.",
              [(f'sum by (pool, reason) (increase({prom("dotsvlm_autoscaler_decisions")}{sel()}[5m]))',
                "{{pool}}: {{reason}}")], "short", width=24),
    ]),
     ("Operator and signals", [
         Panel("Desired vs ready replicas", "Per pool, from the operator's status.",
               [(gauge("dotsvlm_pool_desired_replicas", "max", "pool"), "desired {{pool}}"),
                (gauge("dotsvlm_pool_ready_replicas", "max", "pool"), "ready {{pool}}")], "short"),
         Panel("Vision backlog and arrivals", "Images and pixels sent to the vision pool and not back yet, and "
               "pixels arriving per second: the pool is sized for the arrivals plus the backlog cleared within its "
               "encode budget (counted by the ingress replicas).",
               [(gauge("dotsvlm_vision_pending_images"), "images"),
                (gauge("dotsvlm_vision_pending_pixels"), "pixels"),
                (rate("dotsvlm_vision_admitted_pixels"), "pixels arriving /s")], "short"),
         Panel("Tensor queue depth and oldest age", "The LLM pool's scaling signals from the queue.",
               [(gauge("dotsvlm_queue_depth", "max"), "depth"),
                (gauge("dotsvlm_queue_oldest_age_seconds", "max"), "oldest age (s)")], "short"),
         Panel("LLM running requests and KV reserved", "The LLM pool's own load, summed over replicas. KV "
               "reserved is the policy's KV-cache signal: tokens reserved by admitted requests (prompt plus "
               "max_tokens) over the pool's KV capacity.",
               [(gauge("dotsvlm_llm_running_requests"), "running"),
                (f'{gauge("dotsvlm_llm_kv_cache_reserved_tokens")} / {gauge("dotsvlm_llm_kv_cache_capacity_tokens")}',
                 "KV reserved (fraction)")], "short"),
     ])],
)

OPERATOR = Dashboard(
    "dotsvlm-operator", "dotsvlm / Operator",
    "The dotsvlm operator: reconcile passes, errors and durations, and each pool's replicas as it reports them.",
    "dotsvlm_pool_desired_replicas",
    [("Reconciles", [
        Panel("Reconciles per second", "Reconcile passes of this deployment by result.",
              [(rate("dotsvlm_operator_reconciles", by="result"), "{{result}}")], "short", width=8),
        Panel("Reconcile errors per second", "Failed passes (DotsVLMOperatorReconcileErrors when they persist).",
              [(rate("dotsvlm_operator_reconciles", 'result="error"'), "errors")], "short", width=8),
        Panel("Reconcile duration", "p50 and p95 of a pass.",
              [(quantile(0.95, "dotsvlm_operator_reconcile_duration_seconds"), "p95"),
               (quantile(0.5, "dotsvlm_operator_reconcile_duration_seconds"), "p50")], "s", width=8),
    ]),
     ("Pools", [
         _replicas("vision"),
         _replicas("llm"),
         Panel("Unschedulable pods", "Pods the scheduler cannot place, per pool (DotsVLMPodsUnschedulable).",
               [(gauge("dotsvlm_pool_unschedulable_pods", "max", "pool"), "{{pool}}")], "short"),
         Panel("Managed deployments", "DotsVLMDeployments this operator reconciles (all namespaces).",
               [(f'max ({prom("dotsvlm_operator_managed_deployments")})', "deployments")], "short", "stat"),
     ])],
)

DASHBOARDS: dict[str, Dashboard] = {"overview": OVERVIEW, "vision-pool": VISION, "tensor-queue": QUEUE,
                                    "llm-pool": LLM, "autoscaler": AUTOSCALER, "operator": OPERATOR}


def dashboard_files() -> dict[str, str]:
    """File name (without .json) -> the dashboard's JSON, as committed in the chart."""
    return {name: json.dumps(build(d), indent=2, sort_keys=True) + "\n" for name, d in DASHBOARDS.items()}
