"""What each Serve replica reports to the autoscaler (Ray Serve's `record_autoscaling_stats` hook).

The stat names here are the contract between the replicas and `serve_policy`: each replica returns a
flat dict of floats, Serve carries it to its controller, and `serve_policy.snapshot_from_stats` turns
the latest values of every running replica into the policy's `Snapshot`. Pure Python (no ray): the
ingress keeps an `IngressSignals` and the unit tests drive it directly.
"""

from __future__ import annotations

import math
from collections import deque

NO_DATA = -1.0  # Serve accepts only numbers: "no sample in the window" travels as -1
P90_WINDOW_S = 30.0  # the latencies' p90s cover this many recent seconds

# Ingress (summed over ingress replicas).
VISION_PENDING_REQUESTS = "vision_pending_requests"
VISION_PENDING_IMAGES = "vision_pending_images"
VISION_PENDING_PIXELS = "vision_pending_pixels"
VISION_ADMITTED_PIXELS = "vision_admitted_pixels_total"  # pixels sent to the vision stage (cumulative): demand
ENCODE_LATENCY_P90 = "encode_latency_p90_s"
TTFT_IMAGE_P90 = "ttft_image_p90_s"
TTFT_TEXT_P90 = "ttft_text_p90_s"
ITL_P90 = "inter_token_p90_s"
# VisionEncoder replicas.
ENCODE_PIXELS_PER_S = "encode_pixels_per_s"
# TensorQueue replica.
QUEUE_DEPTH = "queue_depth"
QUEUE_OLDEST_AGE = "queue_oldest_age_s"
QUEUE_WAITING_PRODUCERS = "queue_waiting_producers"
QUEUE_REJECTED = "queue_rejected_total"
QUEUE_COMPLETED = "queue_completed_total"  # requests the LLM pool finished (cumulative): its service rate
# LLMServer replicas.
LLM_RUNNING = "llm_running"
LLM_WAITING = "llm_waiting"
LLM_KV_USED_FRACTION = "llm_kv_used_fraction"


class RecentValues:
    """Values observed in the last `window_s` seconds, for a p90 that forgets old load."""

    def __init__(self, window_s: float, max_samples: int = 4096) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, now: float, value: float) -> None:
        self._samples.append((now, value))

    def p90(self, now: float) -> float:
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        if not self._samples:
            return NO_DATA
        values = sorted(v for _, v in self._samples)
        return values[min(len(values) - 1, math.ceil(0.9 * len(values)) - 1)]


class IngressSignals:
    """The ingress's view: image work it has sent to the vision stage and not got back (so the backlog is
    known even while the vision pool has no replica), and recent latencies per modality."""

    def __init__(self, window_s: float = P90_WINDOW_S) -> None:
        self.pending_requests = 0
        self.pending_images = 0
        self.pending_pixels = 0
        self.admitted_pixels = 0
        self.encode = RecentValues(window_s)
        self.ttft = {"image": RecentValues(window_s), "text": RecentValues(window_s)}
        self.itl = RecentValues(window_s)

    def vision_started(self, images: int, pixels: int) -> None:
        self.pending_requests += 1
        self.pending_images += images
        self.pending_pixels += pixels
        self.admitted_pixels += pixels

    def vision_finished(self, images: int, pixels: int, now: float, seconds: float | None) -> None:
        self.pending_requests -= 1
        self.pending_images -= images
        self.pending_pixels -= pixels
        if seconds is not None:
            self.encode.add(now, seconds)

    def first_token(self, now: float, with_images: bool, seconds: float) -> None:
        self.ttft["image" if with_images else "text"].add(now, seconds)

    def finished(self, now: float, first_token_at: float | None, completion_tokens: int) -> float | None:
        """Mean time between tokens of one request (its decode phase), one sample per request; returned
        too, for the inter-token latency metric (one number for both)."""
        if first_token_at is None or completion_tokens <= 1:
            return None
        sample = (now - first_token_at) / (completion_tokens - 1)
        self.itl.add(now, sample)
        return sample

    def stats(self, now: float) -> dict[str, float]:
        return {VISION_PENDING_REQUESTS: float(self.pending_requests),
                VISION_PENDING_IMAGES: float(self.pending_images),
                VISION_PENDING_PIXELS: float(self.pending_pixels),
                VISION_ADMITTED_PIXELS: float(self.admitted_pixels),
                ENCODE_LATENCY_P90: self.encode.p90(now),
                TTFT_IMAGE_P90: self.ttft["image"].p90(now),
                TTFT_TEXT_P90: self.ttft["text"].p90(now),
                ITL_P90: self.itl.p90(now)}


def vision_stats(stats: dict[str, float]) -> dict[str, float]:
    """A vision replica's autoscaling stats from its own counters (VisionEncoder.stats())."""
    busy = stats.get("encode_seconds_total", 0.0)
    rate = stats.get("pixels_total", 0.0) / busy if busy > 0 else NO_DATA
    return {ENCODE_PIXELS_PER_S: rate}


def queue_stats(stats: dict) -> dict[str, float]:
    """The tensor queue's autoscaling stats from its snapshot (TensorQueueCore.stats())."""
    counters = stats.get("counters", {})
    return {QUEUE_DEPTH: float(stats.get("depth", 0)), QUEUE_OLDEST_AGE: float(stats.get("oldest_age_s", 0.0)),
            QUEUE_WAITING_PRODUCERS: float(stats.get("waiting_producers", 0)),
            QUEUE_REJECTED: float(counters.get("rejected_full", 0)),
            QUEUE_COMPLETED: float(counters.get("completed", 0))}


def llm_stats(stats: dict[str, float]) -> dict[str, float]:
    """An LLM replica's autoscaling stats from its engine (Engine.stats())."""
    capacity = stats.get("kv_tokens_capacity", 0.0)
    return {LLM_RUNNING: float(stats.get("running", 0.0)), LLM_WAITING: float(stats.get("pending", 0.0)),
            LLM_KV_USED_FRACTION: stats.get("kv_tokens_reserved", 0.0) / capacity if capacity else 0.0}
