"""StatsPublisher: a component's stats() become gauges (current values) and counters (growth only)."""

from __future__ import annotations

from dotsvlm_serving.metrics.catalog import ALL_METRICS, BY_NAME, SERVING_METRICS
from dotsvlm_serving.metrics.publish import StatsPublisher


class FakeMetrics:
    def __init__(self) -> None:
        self.gauges: dict[str, float] = {}
        self.counters: dict[tuple, float] = {}

    def set(self, name: str, value: float, **labels: str) -> None:
        self.gauges[name] = value

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        if value > 0:
            key = (name, tuple(sorted(labels.items())))
            self.counters[key] = self.counters.get(key, 0.0) + value


def test_gauges_copy_and_counters_grow_by_the_difference() -> None:
    m = FakeMetrics()
    stats = {"depth": 3, "images": 10, "counters": {"enqueued": 5, "rejected_full": 0}}
    pub = StatsPublisher(m, lambda: stats, gauges={"g": "depth"}, counters={"c": "images"},  # type: ignore[arg-type]
                         labelled_counters={"e": ("counters", "event")})
    pub.publish(stats)
    assert m.gauges == {"g": 3.0}
    assert m.counters == {("c", ()): 10.0, ("e", (("event", "enqueued"),)): 5.0}
    stats.update(depth=0, images=14, counters={"enqueued": 5, "rejected_full": 2})
    pub.publish(stats)
    assert m.gauges == {"g": 0.0}
    assert m.counters == {("c", ()): 14.0, ("e", (("event", "enqueued"),)): 5.0,
                          ("e", (("event", "rejected_full"),)): 2.0}


def test_catalogue_names_are_unique_prometheus_names_with_bounded_labels() -> None:
    names = [m.prometheus_name for m in ALL_METRICS]
    assert len(names) == len(set(names)) == len(BY_NAME)
    for m in ALL_METRICS:
        assert m.name.startswith("dotsvlm_") and m.name == m.name.lower()
        assert not m.name.endswith("_total"), "Ray and prometheus_client add _total to counters themselves"
        assert m.kind != "histogram" or m.name.endswith(("_seconds", "_images")), m.name
        # Serve adds deployment/replica/application; Ray adds its own; ours must not collide.
        assert not set(m.labels) & {"deployment", "replica", "application", "route", "le"}, m.name
    assert {m.source for m in SERVING_METRICS} == {"ingress", "vision", "queue", "llm"}


def _histogram_quantile(q: float, bounds: tuple[float, ...], samples: list[float]) -> float:
    """Prometheus's histogram_quantile over one histogram of `samples` with these bucket bounds (linear
    interpolation inside the bucket that holds the rank; the lowest bucket starts at 0)."""
    cumulative = [sum(1 for s in samples if s <= b) for b in bounds]
    rank = q * len(samples)
    for i, count in enumerate(cumulative):
        if count >= rank:
            start, below = (0.0, 0) if i == 0 else (bounds[i - 1], cumulative[i - 1])
            return start + (bounds[i] - start) * (rank - below) / (count - below)
    return bounds[-1]  # in +Inf: Prometheus answers the highest finite bound


# spec.slo time-to-first-token targets a user is likely to set (the defaults: text 2 s, image 10 s).
LIKELY_TTFT_TARGETS = (0.25, 0.5, 0.75, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 45, 60, 90, 120)


def test_the_ttft_alert_tells_a_p90_under_a_users_slo_target_from_one_over_it() -> None:
    """DotsVLMTimeToFirstTokenHigh compares histogram_quantile(0.9) with the deployment's own spec.slo target, the
    one the autoscaler scales against on exact samples. With buckets only at the default targets, a user's
    imageTTFTSeconds 15 read a p90 of 12 s as 16.7 s (the (10, 30] bucket interpolated): the alert fired while
    the autoscaler saw the target met; and a p90 of 29 s could read under 15. A target that is a bucket bound is
    read exactly on either side."""
    bounds = BY_NAME["dotsvlm_time_to_first_token_seconds"].buckets
    assert bounds is not None
    for target in LIKELY_TTFT_TARGETS:
        _reads_each_side_right(bounds, target)


def _reads_each_side_right(bounds: tuple[float, ...], target: float) -> None:
    for fast_share, p90 in ((0.85, 0.8 * target), (0.89, 1.25 * target), (0.5, 1.01 * target)):
        n_fast = int(round(fast_share * 1000))
        samples = [0.05 * target] * n_fast + [p90] * (1000 - n_fast)
        read = _histogram_quantile(0.9, bounds, samples)
        assert (read > target) == (p90 > target), (
            f"target {target:g} s: a p90 of {p90:g} s reads as {read:.3g} s with buckets {bounds}")


# spec.slo.interTokenSeconds targets a user is likely to set (the default: 0.2 s).
LIKELY_ITL_TARGETS = (0.01, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.075, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4,
                      0.5, 0.75, 1, 1.5, 2)


def test_the_inter_token_alert_tells_a_p90_under_a_users_slo_target_from_one_over_it() -> None:
    """DotsVLMInterTokenLatencyHigh compares histogram_quantile(0.9) of the inter-token histogram with the
    deployment's spec.slo.interTokenSeconds, as the autoscaler compares its exact p90. With the bounds 0.04 and
    0.06 around it, a 0.05 s target read a p90 of 0.045 s as over it (and 0.0505 s as within)."""
    bounds = BY_NAME["dotsvlm_inter_token_latency_seconds"].buckets
    assert bounds is not None
    for target in LIKELY_ITL_TARGETS:
        _reads_each_side_right(bounds, target)


def test_the_vision_stage_alert_tells_a_p90_under_the_encode_budget_from_one_over_it() -> None:
    """DotsVLMVisionEncodeLatencyHigh compares histogram_quantile(0.9) of the vision stage's time with the encode
    budget the autoscaler scales against (imageTTFTSeconds x encodeBudgetFraction, default 0.5). With the
    stage's old bounds (..., 5, 10, 30, ...) a 15 s image target's 7.5 s budget fell inside (5, 10]: a p90 of
    6 s read as over it."""
    from dotsvlm_serving.serve_config import SLOConfig, VisionAutoscaling

    bounds = BY_NAME["dotsvlm_vision_request_seconds"].buckets
    assert bounds is not None
    for image_target in LIKELY_TTFT_TARGETS:
        for fraction in (0.5, 1.0):
            budget = VisionAutoscaling(encode_budget_fraction=fraction).encode_budget_s(SLOConfig(image_ttft_s=image_target))
            _reads_each_side_right(bounds, budget)
