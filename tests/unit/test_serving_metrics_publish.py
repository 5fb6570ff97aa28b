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
