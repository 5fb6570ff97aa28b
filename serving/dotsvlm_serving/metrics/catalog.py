"""Every dotsvlm metric in one place: name, type, labels, meaning (no torch, no ray).

The serving replicas register these with Ray (`ray.serve.metrics`), and Ray's metrics agent on each
node exports them on the node's metrics export port with a `ray_` prefix (a counter also gets
`_total`): `dotsvlm_requests` is scraped as `ray_dotsvlm_requests_total`. Each series carries the
labels listed here plus
- `dotsvlm_namespace`, `dotsvlm_deployment`: the DotsVLMDeployment (from the pod's environment,
  `local` outside Kubernetes), so dashboards and alerts work with any scrape configuration;
- Ray Serve's `deployment` (Ingress, VisionEncoder, TensorQueue, LLMServer), `replica`, `application`;
- Ray's own `Component`, `NodeAddress`, `SessionName`, `Version`, `WorkerId` (the operator's
  PodMonitor renames or drops them, see `dotsvlm_operator.monitoring.scrape`).

The operator's metrics (`OPERATOR_METRICS`) are served by the operator itself, without a prefix.
The autoscaler's (`AUTOSCALER_METRICS`) are published by the pool autoscaler in the Serve controller,
with the same two resource labels (`publish.resource_tags()`), which the dashboards filter by.
Dashboards, alerts and `docs/observability.md` are written from this catalogue: add a metric here first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RAY_PREFIX = "ray_"
# Labels every serving metric carries, whatever the scrape path (see the module docstring).
NAMESPACE_LABEL = "dotsvlm_namespace"
DEPLOYMENT_LABEL = "dotsvlm_deployment"
NAMESPACE_ENV = "DOTSVLM_NAMESPACE"
DEPLOYMENT_ENV = "DOTSVLM_DEPLOYMENT"
LOCAL = "local"
# Bounded label values.
MODALITIES = ("text", "image")  # a request with at least one image is "image"
NO_MODALITY = "none"  # a request refused before its messages were read
CLIENT_CLOSED = 499  # `code` of a request whose client went away before its answer (nginx's "client closed request")
POOLS = ("vision", "llm")

Kind = Literal["counter", "gauge", "histogram"]
Source = Literal["ingress", "vision", "queue", "llm", "autoscaler", "operator"]

# spec.slo's default time-to-first-token targets (text 2 s, image 10 s) are bucket bounds: histogram_quantile
# interpolates inside a bucket, which put a text p90 of 1.1 s at ~2.1 s while 2.0 fell inside (1, 2.5].
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
# Time to first token is held to each deployment's own spec.slo targets (DotsVLMTimeToFirstTokenHigh, on
# histogram_quantile, against the autoscaler's exact p90): a target that is a bucket bound is read exactly on
# either side, one between bounds only to within its bucket (a user's 15 s fell in (10, 30]: a p90 of 12 s read
# 16.7 s). So the bounds hold every target a user is likely to set (docs/observability.md lists them).
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0,
                20.0, 25.0, 30.0, 40.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0)
# Inter-token latency is held to spec.slo.interTokenSeconds the same way (DotsVLMInterTokenLatencyHigh): the bounds
# hold the targets a user is likely to set (default 0.2 s; a 0.05 s target fell in (0.04, 0.06]).
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.08, 0.1, 0.125, 0.15,
               0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 5.0)
# The vision stage is held to its encode budget, imageTTFTSeconds x vision.autoscaling.encodeBudgetFraction
# (DotsVLMVisionEncodeLatencyHigh, the autoscaler's EncodeLatency rule): the bounds hold every likely TTFT target
# and its half (the default fraction 0.5: 10 s -> 5 s, 15 s -> 7.5 s).
VISION_REQUEST_BUCKETS = tuple(sorted(set(TTFT_BUCKETS) | {b * 0.5 for b in TTFT_BUCKETS}))
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
RECONCILE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class MetricSpec:
    name: str  # as registered (serving: with Ray, which adds the ray_ prefix when exporting)
    kind: Kind
    help: str
    source: Source
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] | None = None

    @property
    def prometheus_name(self) -> str:
        """The name Prometheus stores (counters end in _total; histograms add _bucket/_sum/_count)."""
        base = self.name if self.source == "operator" else RAY_PREFIX + self.name
        return base + "_total" if self.kind == "counter" else base


def _m(name: str, kind: Kind, source: Source, help: str, labels: tuple[str, ...] = (),
       buckets: tuple[float, ...] | None = None) -> MetricSpec:
    if kind == "histogram" and buckets is None:
        raise ValueError(f"{name}: a histogram needs buckets")
    return MetricSpec(name=name, kind=kind, help=help, source=source, labels=labels, buckets=buckets)


SERVING_METRICS: tuple[MetricSpec, ...] = (
    # --- ingress (OpenAI API): what users see
    _m("dotsvlm_requests", "counter", "ingress",
       "Chat completion requests answered, by HTTP status code (499: the client went away before its answer; a "
       "stream counts when it ends, with the code of an error sent in it) and modality (text, image; none when "
       "refused before the messages were read)", ("code", "modality")),
    _m("dotsvlm_request_duration_seconds", "histogram", "ingress",
       "End-to-end latency of completed requests, from arrival to the last token", ("modality",), LATENCY_BUCKETS),
    _m("dotsvlm_time_to_first_token_seconds", "histogram", "ingress",
       "Time from request arrival to its first token (image loading and encoding included)", ("modality",),
       TTFT_BUCKETS),
    _m("dotsvlm_prompt_tokens", "counter", "ingress", "Prompt tokens of completed requests", ("modality",)),
    _m("dotsvlm_completion_tokens", "counter", "ingress", "Generated tokens of completed requests", ("modality",)),
    _m("dotsvlm_images", "counter", "ingress", "Images received in requests"),
    _m("dotsvlm_requests_in_flight", "gauge", "ingress",
       "Requests being served by this ingress replica (a stream until its last chunk is sent or its client leaves)"),
    _m("dotsvlm_rejected_requests", "counter", "ingress",
       "Requests answered 429 by backpressure, by the stage that was full (vision, ingress, queue) and reason "
       "(vision_backlog_full, image_bytes_full, queue_full)", ("stage", "reason")),
    _m("dotsvlm_ingress_image_bytes", "gauge", "ingress",
       "Image bytes this ingress replica holds for requests before their first token (bounded by "
       "api.maxImageBytesInFlight)"),
    _m("dotsvlm_vision_retries", "counter", "ingress",
       "Requests encoded again because their image embeddings were lost (a vision replica died)"),
    _m("dotsvlm_inter_token_latency_seconds", "histogram", "ingress",
       "Mean time between output tokens of a request (decode time / (tokens - 1)), one observation per "
       "request of two tokens or more", ("modality",), ITL_BUCKETS),
    # the vision stage as the ingress (and the pool autoscaler) sees it: known even with no vision replica
    _m("dotsvlm_vision_pending_images", "gauge", "ingress",
       "Images this ingress replica sent to the vision pool and has not got back (the autoscaler's vision backlog)"),
    _m("dotsvlm_vision_pending_pixels", "gauge", "ingress",
       "Pixels (after resize) of the images this ingress replica waits for from the vision pool"),
    _m("dotsvlm_vision_admitted_pixels", "counter", "ingress",
       "Pixels (after resize) this ingress replica sent to the vision pool: its rate is the demand the pool is sized for"),
    _m("dotsvlm_vision_request_seconds", "histogram", "ingress",
       "Time for one request's images to come back from the vision pool (queueing and batching included)", (),
       VISION_REQUEST_BUCKETS),
    # --- vision pool (VisionEncoder replicas), from VisionEncoder.stats() and each batch
    _m("dotsvlm_vision_images_encoded", "counter", "vision", "Images encoded by this vision replica"),
    _m("dotsvlm_vision_pixels_encoded", "counter", "vision", "Pixels (after resize) encoded by this vision replica"),
    _m("dotsvlm_vision_backlog_images", "gauge", "vision",
       "Images waiting in this vision replica for a batch (not yet encoding)"),
    _m("dotsvlm_vision_encoding_images", "gauge", "vision", "Images in the batch this vision replica is encoding"),
    _m("dotsvlm_vision_held_pixels", "gauge", "vision",
       "Pixels (after resize) this vision replica holds decoded, waiting or encoding (bounded by "
       "vision.maxPendingPixelsPerReplica; further requests wait undecoded)"),
    _m("dotsvlm_vision_batch_images", "histogram", "vision", "Images per encode batch", (), BATCH_BUCKETS),
    _m("dotsvlm_vision_encode_seconds", "histogram", "vision", "Time to encode one batch on the vision tower", (),
       LATENCY_BUCKETS),
    # --- tensor queue (one replica), from TensorQueueCore.stats()
    _m("dotsvlm_queue_depth", "gauge", "queue", "Items waiting in the tensor queue"),
    _m("dotsvlm_queue_bytes", "gauge", "queue", "Bytes of image embeddings waiting in the tensor queue"),
    _m("dotsvlm_queue_oldest_age_seconds", "gauge", "queue", "Age of the oldest waiting item (0 when empty)"),
    _m("dotsvlm_queue_waiting_producers", "gauge", "queue", "Requests waiting for room in the full queue"),
    _m("dotsvlm_queue_leased_items", "gauge", "queue", "Items taken by LLM replicas and not finished"),
    _m("dotsvlm_queue_max_items", "gauge", "queue", "Queue capacity in items"),
    _m("dotsvlm_queue_max_bytes", "gauge", "queue", "Queue capacity in bytes"),
    _m("dotsvlm_queue_consumers", "gauge", "queue", "LLM replicas heartbeating to the queue"),
    _m("dotsvlm_queue_events", "counter", "queue",
       "Tensor queue events: enqueued, taken, completed, cancelled, rejected_full (429), redelivered (an LLM "
       "replica died holding it), failed_consumer_lost, moved (sent on to the replica replacing this one), "
       "adopted (items and leases taken over from the replica this one replaced)", ("event",)),
    _m("dotsvlm_queue_wait_seconds", "histogram", "queue",
       "Time an item waited in the queue before an LLM replica took it", (), LATENCY_BUCKETS),
    # --- LLM pool (LLMServer replicas), from engine.stats() and each request
    _m("dotsvlm_llm_running_requests", "gauge", "llm", "Requests decoding in this LLM replica"),
    _m("dotsvlm_llm_waiting_requests", "gauge", "llm", "Requests taken by this LLM replica, not yet prefilled"),
    _m("dotsvlm_llm_kv_cache_used_tokens", "gauge", "llm", "KV-cache tokens held by running requests"),
    _m("dotsvlm_llm_kv_cache_reserved_tokens", "gauge", "llm",
       "KV-cache tokens reserved by admitted requests (prompt + max_tokens)"),
    _m("dotsvlm_llm_kv_cache_capacity_tokens", "gauge", "llm", "KV-cache token budget of this LLM replica"),
    _m("dotsvlm_llm_generated_tokens", "counter", "llm", "Tokens generated by this LLM replica"),
)

AUTOSCALER_METRICS: tuple[MetricSpec, ...] = (
    _m("dotsvlm_autoscaler_desired_replicas", "gauge", "autoscaler",
       "Replicas the pool autoscaler wants for a pool", ("pool",)),
    _m("dotsvlm_autoscaler_decisions", "counter", "autoscaler",
       "Pool autoscaler decisions by direction (up, down) and reason", ("pool", "direction", "reason")),
)

_RESOURCE = (NAMESPACE_LABEL, DEPLOYMENT_LABEL)
OPERATOR_METRICS: tuple[MetricSpec, ...] = (
    _m("dotsvlm_operator_reconciles", "counter", "operator",
       "Reconcile passes by result (success, error)", (*_RESOURCE, "result")),
    _m("dotsvlm_operator_reconcile_duration_seconds", "histogram", "operator", "Duration of a reconcile pass",
       _RESOURCE, RECONCILE_BUCKETS),
    _m("dotsvlm_operator_managed_deployments", "gauge", "operator", "DotsVLMDeployments this operator reconciles"),
    _m("dotsvlm_pool_desired_replicas", "gauge", "operator",
       "Replicas the operator wants for a pool (status.<pool>.desiredReplicas)", (*_RESOURCE, "pool")),
    _m("dotsvlm_pool_replicas", "gauge", "operator",
       "Replicas of a pool whose pods all exist (status.<pool>.replicas)", (*_RESOURCE, "pool")),
    _m("dotsvlm_pool_current_replicas", "gauge", "operator",
       "Replicas Ray Serve runs now (status.<pool>.currentReplicas; absent until the operator has read it)",
       (*_RESOURCE, "pool")),
    _m("dotsvlm_pool_ready_replicas", "gauge", "operator",
       "Replicas of a pool whose pods are all ready (status.<pool>.readyReplicas)", (*_RESOURCE, "pool")),
    _m("dotsvlm_pool_min_replicas", "gauge", "operator", "The spec's minReplicas of a pool", (*_RESOURCE, "pool")),
    _m("dotsvlm_pool_max_replicas", "gauge", "operator", "The spec's maxReplicas of a pool", (*_RESOURCE, "pool")),
    _m("dotsvlm_pool_unschedulable_pods", "gauge", "operator",
       "Pods of a pool the scheduler cannot place (often: not enough free GPUs)", (*_RESOURCE, "pool")),
    _m("dotsvlm_slo_time_to_first_token_seconds", "gauge", "operator",
       "The deployment's p90 time-to-first-token target per modality (spec.slo: what the autoscaler scales "
       "against and DotsVLMTimeToFirstTokenHigh holds it to)", (*_RESOURCE, "modality")),
    _m("dotsvlm_slo_inter_token_latency_seconds", "gauge", "operator",
       "The deployment's p90 inter-token latency target (spec.slo.interTokenSeconds: what the autoscaler scales "
       "against and DotsVLMInterTokenLatencyHigh holds it to)", _RESOURCE),
    _m("dotsvlm_slo_vision_encode_budget_seconds", "gauge", "operator",
       "The p90 time a request's images may take in the vision stage (spec.slo.imageTTFTSeconds x "
       "spec.vision.autoscaling.encodeBudgetFraction: what the autoscaler's EncodeLatency rule scales against and "
       "DotsVLMVisionEncodeLatencyHigh holds it to)", _RESOURCE),
)

ALL_METRICS: tuple[MetricSpec, ...] = SERVING_METRICS + AUTOSCALER_METRICS + OPERATOR_METRICS
BY_NAME: dict[str, MetricSpec] = {m.name: m for m in ALL_METRICS}


def spec(name: str) -> MetricSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"{name} is not in the metrics catalogue (dotsvlm_serving.metrics.catalog)") from None


def prom(name: str) -> str:
    """The Prometheus name of a catalogued metric, for PromQL in dashboards and alerts."""
    return spec(name).prometheus_name
