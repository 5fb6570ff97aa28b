"""Prometheus metrics served by the ingress at /metrics.

Request-level metrics (latency, time to first token, tokens, encode latency, vision backlog) are
measured in the ingress itself. Queue and LLM-pool gauges are read from the tensor queue at scrape
time (LLM replicas report running requests and KV use there with their heartbeats), so one scrape of
the ingress shows the whole pipeline. The autoscaler reads these names: keep them stable.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _QueueCollector:
    """Exposes the latest tensor-queue snapshot (set by the /metrics handler before rendering)."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Any] | None = None

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        if not s:
            return
        for name, key, doc in [
            ("dotsvlm_queue_depth", "depth", "Items waiting in the tensor queue"),
            ("dotsvlm_queue_bytes", "bytes", "Bytes of image embeddings waiting in the tensor queue"),
            ("dotsvlm_queue_oldest_age_seconds", "oldest_age_s", "Age of the oldest waiting item"),
            ("dotsvlm_queue_waiting_producers", "waiting_producers", "Requests waiting for room in the queue"),
            ("dotsvlm_queue_leased_items", "leased", "Items taken by LLM replicas and not finished"),
            ("dotsvlm_queue_max_items", "max_items", "Queue capacity in items"),
            ("dotsvlm_queue_max_bytes", "max_bytes", "Queue capacity in bytes"),
        ]:
            yield GaugeMetricFamily(name, doc, value=float(s.get(key, 0)))
        counters = s.get("counters", {})
        c = CounterMetricFamily("dotsvlm_queue_events", "Tensor queue events by kind", labels=["event"])
        for k, v in sorted(counters.items()):
            c.add_metric([k], float(v))
        yield c
        consumers = s.get("consumers", {})
        yield GaugeMetricFamily("dotsvlm_llm_replicas", "LLM replicas heartbeating to the queue",
                                value=float(len(consumers)))
        for name, key, doc in [
            ("dotsvlm_llm_running_requests", "running", "Requests decoding in an LLM replica"),
            ("dotsvlm_llm_pending_requests", "pending", "Requests taken by an LLM replica, not yet prefilled"),
            ("dotsvlm_llm_kv_cache_tokens_used", "kv_tokens_used", "KV-cache tokens held by running requests"),
            ("dotsvlm_llm_kv_cache_tokens_reserved", "kv_tokens_reserved", "KV-cache tokens reserved (prompt + max_tokens)"),
            ("dotsvlm_llm_kv_cache_tokens_capacity", "kv_tokens_capacity", "KV-cache token budget of a replica"),
        ]:
            g = GaugeMetricFamily(name, doc, labels=["replica"])
            for cid, st in sorted(consumers.items()):
                g.add_metric([cid], float(st.get(key, 0)))
            yield g


class IngressMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dotsvlm_requests", "Chat completion requests by HTTP status", ["status"], registry=r)
        self.request_seconds = Histogram("dotsvlm_request_duration_seconds", "End-to-end request latency",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("dotsvlm_time_to_first_token_seconds", "Time from request arrival to the first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("dotsvlm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("dotsvlm_completion_tokens", "Generated tokens of finished requests",
                                         registry=r)
        self.images = Counter("dotsvlm_images", "Images received", registry=r)
        self.encode_seconds = Histogram("dotsvlm_vision_encode_seconds",
                                        "Vision encode latency per request as seen by the ingress (queueing and "
                                        "batching included)", buckets=LATENCY_BUCKETS, registry=r)
        self.vision_backlog = Gauge("dotsvlm_vision_backlog_images", "Images sent to the vision pool and not yet "
                                    "encoded (this ingress replica)", registry=r)
        self.vision_retries = Counter("dotsvlm_vision_retries", "Requests encoded again because their image "
                                      "embeddings were lost (e.g. a vision replica died)", registry=r)
        self.in_flight = Gauge("dotsvlm_requests_in_flight", "Requests being served by this ingress replica",
                               registry=r)
        self.queue = _QueueCollector()
        r.register(self.queue)  # type: ignore[arg-type]

    def render(self, queue_snapshot: dict[str, Any] | None) -> bytes:
        self.queue.snapshot = queue_snapshot
        return generate_latest(self.registry)
