"""The adapter between Ray Serve's autoscaling contexts and the pure policy (no Ray cluster needed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
# Imported here, not in `_serve_configs`: its first import took over metricsStaleSeconds on a loaded machine,
# between a test's contexts and its policy call, so their samples read as stale.
from ray.serve.config import AutoscalingConfig

from dotsvlm_serving.autoscaling import serve_policy
from dotsvlm_serving.autoscaling import signals as sig
from dotsvlm_serving.serve_config import (INGRESS_DEPLOYMENT, LLM_DEPLOYMENT, QUEUE_DEPLOYMENT, VISION_DEPLOYMENT,
                                          ServeAppConfig)


@dataclass(frozen=True)
class _Sample:
    timestamp: float
    value: float


@dataclass(frozen=True)
class _DeploymentID:
    name: str
    app_name: str = "dotsvlm"


@dataclass
class _Ctx:
    """The fields of Serve's AutoscalingContext the adapter reads."""

    running_replicas: list[str]
    target_num_replicas: int
    raw_metrics: dict[str, dict[str, list[_Sample]]]
    policy_state: dict[str, Any] = field(default_factory=dict)
    config: Any = None  # Serve's AutoscalingConfig of the deployment
    total_num_requests: float = 0.0  # requests at the deployment's handles and replicas, as Serve counts them

    @property
    def current_num_replicas(self) -> int:
        return len(self.running_replicas)


def _ctx(replicas: dict[str, dict[str, float]], target: int, now: float, age: float = 0.5) -> _Ctx:
    raw: dict[str, dict[str, list[_Sample]]] = {}
    for rid, stats in replicas.items():
        for name, value in stats.items():
            raw.setdefault(name, {})[rid] = [_Sample(now - age - 3, 0.0), _Sample(now - age, value)]
    return _Ctx(running_replicas=list(replicas), target_num_replicas=target, raw_metrics=raw)


def _contexts(now: float, *, ingress_age: float = 0.5, vision_replicas: int = 1) -> dict[str, _Ctx]:
    ingress = {"i1": {sig.VISION_PENDING_REQUESTS: 3, sig.VISION_PENDING_IMAGES: 4, sig.VISION_PENDING_PIXELS: 4e6,
                      sig.VISION_ADMITTED_PIXELS: 30e6, sig.ENCODE_LATENCY_P90: 0.5, sig.TTFT_IMAGE_P90: sig.NO_DATA, sig.TTFT_TEXT_P90: 1.5,
                      sig.ITL_P90: 0.05},
               "i2": {sig.VISION_PENDING_REQUESTS: 5, sig.VISION_PENDING_IMAGES: 5, sig.VISION_PENDING_PIXELS: 6e6,
                      sig.VISION_ADMITTED_PIXELS: 50e6, sig.ENCODE_LATENCY_P90: 2.5, sig.TTFT_IMAGE_P90: 4.0, sig.TTFT_TEXT_P90: sig.NO_DATA,
                      sig.ITL_P90: 0.08}}
    vision = {f"v{i}": {sig.ENCODE_PIXELS_PER_S: 2e6 if i == 0 else 4e6} for i in range(vision_replicas)}
    llm = {"l1": {sig.LLM_RUNNING: 4, sig.LLM_WAITING: 1, sig.LLM_KV_USED_FRACTION: 0.5},
           "l2": {sig.LLM_RUNNING: 2, sig.LLM_WAITING: 0, sig.LLM_KV_USED_FRACTION: 0.7}}
    queue = {"q": {sig.QUEUE_DEPTH: 7, sig.QUEUE_OLDEST_AGE: 1.2, sig.QUEUE_WAITING_PRODUCERS: 2, sig.QUEUE_REJECTED: 0,
                   sig.QUEUE_COMPLETED: 41}}
    return {INGRESS_DEPLOYMENT: _ctx(ingress, 2, now, ingress_age), VISION_DEPLOYMENT: _ctx(vision, vision_replicas, now),
            LLM_DEPLOYMENT: _ctx(llm, 2, now), QUEUE_DEPLOYMENT: _ctx(queue, 1, now)}


def test_snapshot_sums_counts_over_replicas_and_takes_the_worst_latency() -> None:
    snap = serve_policy.snapshot_from_contexts(_contexts(1000.0), 1000.0)
    v, m = snap.vision, snap.llm
    assert v is not None and m is not None
    assert (v.pending_requests, v.pending_images, v.pending_pixels) == (8, 9, 10e6), "summed over both ingresses"
    assert v.admitted_pixels_total == 80e6, "the ingresses' pixel counters add up to the stage's arrivals"
    assert v.encode_latency_s == 2.5 and v.encode_pixels_per_s == 2e6
    two = serve_policy.snapshot_from_contexts(_contexts(1000.0, vision_replicas=3), 1000.0).vision
    assert two is not None and two.encode_pixels_per_s == pytest.approx((2e6 + 4e6 + 4e6) / 3), "mean rate per replica"
    assert (m.running, m.waiting, m.queue_depth, m.waiting_producers) == (6, 1, 7, 2)
    assert m.completed_total == 41, "the queue's completed counter: the LLM pool's service rate"
    assert m.kv_used_fraction == pytest.approx(0.6), "mean KV use over the LLM replicas"
    assert (m.ttft_image_s, m.ttft_text_s, m.inter_token_s) == (4.0, 1.5, 0.08), "no-data samples are not latencies"
    assert v.age_s == pytest.approx(0.5)


def test_a_vision_pool_at_zero_still_has_signals_from_the_ingress() -> None:
    snap = serve_policy.snapshot_from_contexts(_contexts(1000.0, vision_replicas=0), 1000.0)
    assert snap.vision is not None and snap.vision.running_replicas == 0 and snap.vision.pending_requests == 8
    assert snap.vision.encode_pixels_per_s is None


def test_without_queue_or_ingress_reports_the_pools_have_no_signals() -> None:
    ctxs = _contexts(1000.0)
    del ctxs[QUEUE_DEPLOYMENT]
    del ctxs[INGRESS_DEPLOYMENT]
    snap = serve_policy.snapshot_from_contexts(ctxs, 1000.0)
    assert snap.vision is None and snap.llm is None


def _serve_configs(cfg: ServeAppConfig, by_name: dict[str, _Ctx]) -> None:
    """Each context's `config` as Serve builds it from the deploy body's autoscaling_config."""
    for name, options in cfg.deployment_options().items():
        by_name[name].config = AutoscalingConfig(**options["autoscaling_config"])


def test_the_policy_class_decides_both_pools_and_keeps_its_state_per_deployment(monkeypatch) -> None:
    published: list[dict] = []
    monkeypatch.setattr(serve_policy, "publish", lambda decisions, state, now, spec: published.append(decisions))
    monkeypatch.setattr(serve_policy, "_Metrics", lambda: type("M", (), {"record": lambda self, d: None})())
    cfg = ServeAppConfig.model_validate({"model_path": "/m",
                                         "vision": {"autoscaling": {"min_replicas": 0, "max_replicas": 6,
                                                                    "upscale_delay_s": 0}},
                                         "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                                                 "upscale_delay_s": 0}}})
    assert cfg.autoscaling_policy() == {"policy_function": serve_policy.__name__ + ":DotsVLMAutoscalingPolicy"}
    policy = serve_policy.DotsVLMAutoscalingPolicy(read=lambda: cfg.policy_config())
    import time

    now = time.time()
    by_name = _contexts(now, vision_replicas=0)  # image requests wait on a vision pool at zero
    _serve_configs(cfg, by_name)
    contexts = {_DeploymentID(name): ctx for name, ctx in by_name.items()}
    decisions, state = policy(contexts)
    named = {dep.name: n for dep, n in decisions.items()}
    assert set(named) == {VISION_DEPLOYMENT, LLM_DEPLOYMENT}, "Ingress and TensorQueue keep their size"
    assert named[VISION_DEPLOYMENT] > 1 and named[LLM_DEPLOYMENT] > 2
    assert {dep.name for dep in state} == {VISION_DEPLOYMENT, LLM_DEPLOYMENT}
    assert all(serve_policy.STATE_KEY in s for s in state.values())
    assert published and set(published[0]) == {"vision", "llm"}


def test_the_policy_reads_bounds_from_serve_and_knobs_from_the_ingress_on_every_call(monkeypatch) -> None:
    """No setting is the policy's kwargs (Ray would restart every replica on a change): a new bound or
    target arrives in the deployment's AutoscalingConfig (ctx.config), the SLO and windows in the
    settings the ingress hands over, and the next calls decide with them."""
    import time

    published: list[tuple[dict, Any]] = []
    monkeypatch.setattr(serve_policy, "publish", lambda decisions, state, now, spec: published.append((decisions, spec)))
    monkeypatch.setattr(serve_policy, "_Metrics", lambda: type("M", (), {"record": lambda self, d: None})())
    monkeypatch.setattr(serve_policy, "SETTINGS_REFRESH_S", 0.0)
    raw = {"model_path": "/m", "vision": {"autoscaling": {"min_replicas": 0, "max_replicas": 6, "upscale_delay_s": 0}},
           "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 4, "upscale_delay_s": 0}}}
    current = {"cfg": ServeAppConfig.model_validate(raw)}
    policy = serve_policy.DotsVLMAutoscalingPolicy(read=lambda: current["cfg"].policy_config())

    def call() -> tuple[dict[str, int], Any]:
        by_name = _contexts(time.time(), vision_replicas=0)  # no encode rate measured: requests per replica count
        _serve_configs(current["cfg"], by_name)
        decisions, _ = policy({_DeploymentID(name): ctx for name, ctx in by_name.items()})
        return {dep.name: n for dep, n in decisions.items()}, policy._last_spec

    first, spec = call()
    assert first[VISION_DEPLOYMENT] == 2, "8 image requests in the vision stage at the default target of 4"
    assert first[LLM_DEPLOYMENT] == 3, "the queue's oldest item (1.2 s) is over half the text TTFT target (2 s)"
    assert spec.vision.max_replicas == 6 and spec.slo.text_ttft_s == 2.0
    raw["vision"]["autoscaling"] = {**raw["vision"]["autoscaling"], "max_replicas": 3, "target_ongoing_requests": 1}
    raw["slo"] = {"text_ttft_s": 4.0}
    current["cfg"] = ServeAppConfig.model_validate(raw)
    second, spec = call()
    assert second[VISION_DEPLOYMENT] == 3, "target 1 asks for 8; the new maxReplicas bounds it"
    assert second[LLM_DEPLOYMENT] == 2, "1.2 s in the queue is within half the new text TTFT target"
    assert (spec.vision.max_replicas, spec.vision.target_ongoing_requests, spec.slo.text_ttft_s) == (3, 1, 4.0)
    assert spec.vision.upscale_delay_s == 0 and spec.llm.max_replicas == 4
    assert published[-1][1] is spec, "the decision is published with the settings it was made with"


def test_without_settings_the_policy_holds_every_pool_and_keeps_serves_state(monkeypatch) -> None:
    import time

    monkeypatch.setattr(serve_policy, "_Metrics", lambda: type("M", (), {"record": lambda self, d: None})())
    policy = serve_policy.DotsVLMAutoscalingPolicy(read=lambda: None)
    by_name = _contexts(time.time())
    by_name[LLM_DEPLOYMENT].policy_state = {"serve-internal": 1}
    decisions, state = policy({_DeploymentID(name): ctx for name, ctx in by_name.items()})
    assert decisions == {}, "no decision: Serve keeps every target"
    assert {dep.name: s for dep, s in state.items()}[LLM_DEPLOYMENT] == {"serve-internal": 1}


def test_published_decisions_carry_the_settings_they_were_made_with(monkeypatch) -> None:
    """What the operator's status and a person at /-/autoscaler read: the pool's bounds, target and SLO."""
    from dotsvlm_serving.autoscaling.policy import Decision, PolicySpec, PolicyState

    stored: dict[str, bytes] = {}
    import ray.experimental.internal_kv as kv

    monkeypatch.setattr(kv, "_internal_kv_put", lambda key, value, overwrite, namespace: stored.update({key: value}))
    monkeypatch.setattr(kv, "_internal_kv_get", lambda key, namespace: stored.get(key))
    cfg = ServeAppConfig.model_validate({"model_path": "/m", "slo": {"text_ttft_s": 1.5},
                                         "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 3}}})
    spec = PolicySpec(slo=cfg.slo, vision=cfg.vision.autoscaling, llm=cfg.llm.autoscaling)
    d = Decision(pool="llm", desired=2, current=1, raw=2, reason="QueueDepth", message="m")
    serve_policy.publish({"llm": d}, PolicyState(), 1000.0, spec)
    record = serve_policy.read_published()
    assert record["llm"]["settings"]["max_replicas"] == 3 and record["llm"]["slo"]["text_ttft_s"] == 1.5
    assert record["llm"]["settings"]["target_ongoing_requests"] == cfg.llm.autoscaling.target_ongoing_requests
    settings = cfg.policy_config()
    assert settings is not None
    serve_policy.publish_settings(settings)
    assert serve_policy.read_settings() == settings


def test_the_queue_reports_how_many_requests_the_llm_pool_finished() -> None:
    stats = sig.queue_stats({"depth": 3, "oldest_age_s": 0.5, "counters": {"completed": 9, "rejected_full": 1}})
    assert stats[sig.QUEUE_COMPLETED] == 9 and stats[sig.QUEUE_REJECTED] == 1


def _serve_wrapped_app(cfg: ServeAppConfig, monkeypatch) -> tuple[Any, list[tuple[str, str, str]], list[dict]]:
    """dotsvlm's policy wrapped as Ray Serve (as installed) wraps an application-level policy; the actions it
    counts in `dotsvlm_autoscaler_decisions` and what it publishes."""
    from ray.serve.autoscaling_policy import _apply_app_level_autoscaling_config

    counted: list[tuple[str, str, str]] = []
    published: list[dict] = []

    class _Counted:
        def record(self, d: Any) -> None:
            if d.direction != "hold":
                counted.append((d.pool, d.direction, d.reason))

    monkeypatch.setattr(serve_policy, "_Metrics", _Counted)
    monkeypatch.setattr(serve_policy, "publish", lambda decisions, state, now, spec: published.append(
        {pool: (d, state.pool(pool).last_reason, state.pool(pool).last_message) for pool, d in decisions.items()}))
    monkeypatch.setattr(serve_policy, "PUBLISH_INTERVAL_S", 0.0)
    policy = serve_policy.DotsVLMAutoscalingPolicy(read=lambda: cfg.policy_config())
    return _apply_app_level_autoscaling_config(policy), counted, published


def _app_contexts(now: float, targets: dict[str, int], running: dict[str, int], states: dict[str, dict],
                  cfg: ServeAppConfig, *, images_waiting: int) -> dict[_DeploymentID, _Ctx]:
    ingress = {"i1": {sig.VISION_PENDING_REQUESTS: images_waiting, sig.VISION_PENDING_IMAGES: images_waiting,
                      sig.VISION_PENDING_PIXELS: 2e6 * images_waiting, sig.VISION_ADMITTED_PIXELS: 2e6 * images_waiting,
                      sig.ENCODE_LATENCY_P90: sig.NO_DATA, sig.TTFT_IMAGE_P90: sig.NO_DATA,
                      sig.TTFT_TEXT_P90: sig.NO_DATA, sig.ITL_P90: sig.NO_DATA}}
    reports = {INGRESS_DEPLOYMENT: ingress,
               VISION_DEPLOYMENT: {f"v{i}": {sig.ENCODE_PIXELS_PER_S: sig.NO_DATA} for i in range(running[VISION_DEPLOYMENT])},
               LLM_DEPLOYMENT: {"l1": {sig.LLM_RUNNING: 0, sig.LLM_WAITING: 0, sig.LLM_KV_USED_FRACTION: 0}},
               QUEUE_DEPLOYMENT: {"q": {sig.QUEUE_DEPTH: 0, sig.QUEUE_OLDEST_AGE: 0, sig.QUEUE_WAITING_PRODUCERS: 0,
                                        sig.QUEUE_COMPLETED: 0}}}
    by_name = {}
    for name, replicas in reports.items():
        ctx = _ctx(replicas, targets[name], now)
        ctx.running_replicas = [f"{name}-{i}" for i in range(running[name])]
        ctx.policy_state = dict(states.get(name, {}))
        ctx.total_num_requests = images_waiting if name == VISION_DEPLOYMENT else 0
        by_name[name] = ctx
    _serve_configs(cfg, by_name)
    return {_DeploymentID(name): ctx for name, ctx in by_name.items()}


def test_a_cold_wake_up_records_and_counts_the_replica_serve_starts(monkeypatch) -> None:
    """While no replica of a pool runs and requests wait, Serve starts max(1, target) replicas and ignores the
    policy's number (`_get_cold_start_scale_up_replicas`). The policy records and publishes that: one action
    0 -> 1 (WakeUp), not an "up 1 -> 4" on every tick of the wake-up; once the replica runs, the policy sizes
    the pool."""
    import time

    cfg = ServeAppConfig.model_validate({"model_path": "/m", "vision": {"autoscaling": {"min_replicas": 0, "max_replicas": 8}},
                                         "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}})
    wrapped, counted, published = _serve_wrapped_app(cfg, monkeypatch)
    targets = {VISION_DEPLOYMENT: 0, LLM_DEPLOYMENT: 1, INGRESS_DEPLOYMENT: 1, QUEUE_DEPLOYMENT: 1}
    running = {VISION_DEPLOYMENT: 0, LLM_DEPLOYMENT: 1, INGRESS_DEPLOYMENT: 1, QUEUE_DEPLOYMENT: 1}
    states: dict[str, dict] = {}

    def tick() -> None:
        decisions, state = wrapped(_app_contexts(time.time(), targets, running, states, cfg, images_waiting=16))
        targets.update({dep.name: n for dep, n in decisions.items()})
        states.update({dep.name: s for dep, s in state.items()})

    for _ in range(20):  # the replica is starting
        tick()
        d, last_reason, last_message = published[-1]["vision"]
        assert targets[VISION_DEPLOYMENT] == 1 and d.desired == 1, "published: what Serve applies"
        assert last_reason == serve_policy.WAKE_UP and "starts 1 replica(s) first" in last_message, last_message
    assert [c for c in counted if c[0] == "vision"] == [("vision", "up", serve_policy.WAKE_UP)]
    assert published[0]["vision"][0].direction == "up" and published[-1]["vision"][0].direction == "hold"
    running[VISION_DEPLOYMENT] = 1  # it runs: Serve applies the policy's number again
    tick()
    assert targets[VISION_DEPLOYMENT] == 4, "16 image requests at 4 per replica"
    assert [c for c in counted if c[0] == "vision"][1:] == [("vision", "up", "VisionRequests")]


def test_a_scale_to_zero_that_serve_stops_at_one_replica_is_not_taken_for_a_wake_up(monkeypatch) -> None:
    """Serve takes a pool to zero only from one replica: an IdleToZero step 2 -> 0 is applied as 2 -> 1. The
    policy records 1, so the next call does not see a target that "moved outside the autoscaler" from 0 to 1
    (a WakeUp that never happened)."""
    import time

    cfg = ServeAppConfig.model_validate({"model_path": "/m", "vision": {"autoscaling": {
        "min_replicas": 0, "max_replicas": 8, "max_scale_down_step": 2, "idle_to_zero_s": 0, "downscale_delay_s": 0}},
        "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}})
    wrapped, counted, published = _serve_wrapped_app(cfg, monkeypatch)
    targets = {VISION_DEPLOYMENT: 2, LLM_DEPLOYMENT: 1, INGRESS_DEPLOYMENT: 1, QUEUE_DEPLOYMENT: 1}
    states: dict[str, dict] = {}
    for _ in range(3):
        decisions, state = wrapped(_app_contexts(time.time(), targets, dict(targets), states, cfg, images_waiting=0))
        targets.update({dep.name: n for dep, n in decisions.items()})
        states.update({dep.name: s for dep, s in state.items()})
        time.sleep(0.01)
    assert targets[VISION_DEPLOYMENT] == 1
    d, last_reason, last_message = published[-1]["vision"]
    assert last_reason == "IdleToZero" and "only from 1 replica: 2 -> 1" in last_message, (last_reason, last_message)
    assert [c for c in counted if c[0] == "vision"] == [("vision", "down", "IdleToZero")]


def test_a_stat_that_is_not_a_number_is_no_sample_and_does_not_stop_the_policy(monkeypatch) -> None:
    """A replica's report with NaN or inf in it (a rate over a zero time, a broken engine counter) reached
    `decide` as it was: `math.ceil(nan)` raised in every call, so neither pool was sized again. Such a value
    counts as no sample, like NO_DATA; the other replicas' values still count."""
    import time

    monkeypatch.setattr(serve_policy, "publish", lambda decisions, state, now, spec: None)
    monkeypatch.setattr(serve_policy, "_Metrics", lambda: type("M", (), {"record": lambda self, d: None})())
    now = time.time()
    by_name = _contexts(now, vision_replicas=2)
    bad = {VISION_DEPLOYMENT: ("v1", sig.ENCODE_PIXELS_PER_S, float("inf")),
           INGRESS_DEPLOYMENT: ("i2", sig.VISION_PENDING_PIXELS, float("nan")),
           LLM_DEPLOYMENT: ("l2", sig.LLM_RUNNING, float("nan")),
           QUEUE_DEPLOYMENT: ("q", sig.QUEUE_OLDEST_AGE, float("-inf"))}
    for name, (rid, stat, value) in bad.items():
        by_name[name].raw_metrics[stat][rid] = [_Sample(now - 0.5, value)]
    by_name[INGRESS_DEPLOYMENT].raw_metrics[sig.ITL_P90]["i1"] = [_Sample(now - 0.5, float("nan"))]
    snap = serve_policy.snapshot_from_contexts(by_name, now)
    v, m = snap.vision, snap.llm
    assert v is not None and m is not None
    assert v.encode_pixels_per_s == 2e6 and v.pending_pixels == 4e6, "only the finite values"
    assert m.running == 4 and m.queue_oldest_age_s == 0.0 and m.inter_token_s == 0.08
    cfg = ServeAppConfig.model_validate({"model_path": "/m", "vision": {"autoscaling": {"max_replicas": 6}},
                                         "llm": {"autoscaling": {"max_replicas": 4}}})
    _serve_configs(cfg, by_name)
    policy = serve_policy.DotsVLMAutoscalingPolicy(read=lambda: cfg.policy_config())
    decisions, _ = policy({_DeploymentID(name): ctx for name, ctx in by_name.items()})
    assert {dep.name for dep in decisions} == {VISION_DEPLOYMENT, LLM_DEPLOYMENT}


def test_published_decisions_lie_within_the_bounds_published_with_them(monkeypatch) -> None:
    """maxReplicas lowered from 8 to 2 while Serve's target is still 4: what the policy publishes (desired in
    /-/autoscaler and the status, dotsvlm_autoscaler_desired_replicas) and returns lies within the new bounds, also
    while no replica runs and requests wait (Serve's cold start keeps the target it had, then bounds it)."""
    import time

    raw = {"model_path": "/m", "vision": {"autoscaling": {"min_replicas": 0, "max_replicas": 2}},
           "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}}
    cfg = ServeAppConfig.model_validate(raw)
    wrapped, counted, published = _serve_wrapped_app(cfg, monkeypatch)
    targets = {VISION_DEPLOYMENT: 4, LLM_DEPLOYMENT: 1, INGRESS_DEPLOYMENT: 1, QUEUE_DEPLOYMENT: 1}
    for running_vision in (4, 0):
        running = {VISION_DEPLOYMENT: running_vision, LLM_DEPLOYMENT: 1, INGRESS_DEPLOYMENT: 1, QUEUE_DEPLOYMENT: 1}
        wrapped(_app_contexts(time.time(), targets, running, {}, cfg, images_waiting=16))
        d = published[-1]["vision"][0]
        assert d.desired <= 2 and d.current <= 2, (running_vision, d)
    assert not [c for c in counted if c[0] == "vision"], "the bounds moved the target, not the autoscaler"


def test_a_pool_whose_deployment_serve_did_not_pass_is_neither_decided_nor_published(monkeypatch) -> None:
    """Serve passes a context only for deployments it has a target for (one being created or deleted has none).
    The policy published a MetricsMissing decision for such a pool all the same, sized and bounded by defaults
    (1 replica, bounds 1..1, whatever the pool's size and spec): /-/autoscaler, the resource's status and
    dotsvlm_autoscaler_desired_replicas showed it. Only the pools Serve passed are decided and published (the
    status keeps the other's last decision)."""
    import time

    published: list[dict] = []
    recorded: list[str] = []
    monkeypatch.setattr(serve_policy, "publish", lambda decisions, state, now, spec: published.append(dict(decisions)))
    monkeypatch.setattr(serve_policy, "_Metrics", lambda: type("M", (), {"record": lambda self, d: recorded.append(d.pool)})())
    cfg = ServeAppConfig.model_validate({"model_path": "/m", "vision": {"autoscaling": {"min_replicas": 0, "max_replicas": 6}},
                                         "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}}})
    policy = serve_policy.DotsVLMAutoscalingPolicy(read=lambda: cfg.policy_config())
    by_name = _contexts(time.time())
    _serve_configs(cfg, by_name)
    del by_name[VISION_DEPLOYMENT]
    decisions, _ = policy({_DeploymentID(name): ctx for name, ctx in by_name.items()})
    assert {dep.name for dep in decisions} == {LLM_DEPLOYMENT}
    assert set(published[-1]) == {"llm"} and set(recorded) == {"llm"}, (published[-1], recorded)


def _publishing_policy(monkeypatch) -> tuple[serve_policy.DotsVLMAutoscalingPolicy, ServeAppConfig, list[dict]]:
    """The policy on a config with vision 1..6 and LLM 1..4 (no upscale delay), and the decisions it publishes."""
    published: list[dict] = []
    monkeypatch.setattr(serve_policy, "publish", lambda decisions, state, now, spec: published.append(dict(decisions)))
    monkeypatch.setattr(serve_policy, "_Metrics", lambda: type("M", (), {"record": lambda self, d: None})())
    cfg = ServeAppConfig.model_validate({"model_path": "/m",
                                         "vision": {"autoscaling": {"min_replicas": 1, "max_replicas": 6}},
                                         "llm": {"autoscaling": {"min_replicas": 1, "max_replicas": 4,
                                                                 "upscale_delay_s": 0}}})
    return serve_policy.DotsVLMAutoscalingPolicy(read=lambda: cfg.policy_config()), cfg, published


def test_a_stale_ingress_does_not_freeze_the_llm_pool_while_the_queue_reports(monkeypatch) -> None:
    """The ingress's stats stop reaching Serve's controller (an overloaded ingress replica) while the queue and
    the LLM replicas report: the LLM pool held at its size with MetricsStale, under a full queue, although with
    no ingress at all it decided on the queue's figures. It scales on the queue now; only the latency rules
    (fed by the ingress) wait for fresh figures. The vision pool, whose signals are the ingress's, holds."""
    import time

    policy, cfg, published = _publishing_policy(monkeypatch)
    by_name = _contexts(time.time(), ingress_age=120.0)  # the ingress's newest sample is 2 minutes old
    _serve_configs(cfg, by_name)
    decisions, _ = policy({_DeploymentID(name): ctx for name, ctx in by_name.items()})
    named = {dep.name: n for dep, n in decisions.items()}
    llm, vision = published[-1]["llm"], published[-1]["vision"]
    assert named[LLM_DEPLOYMENT] > 2 and llm.reason != "MetricsStale", llm  # the queue's 7 items and 2 waiting
    assert vision.reason == "MetricsStale" and named[VISION_DEPLOYMENT] == 1, vision
    snap = serve_policy.snapshot_from_contexts(by_name, time.time())
    assert snap.llm is not None and snap.llm.age_s < 5 and snap.llm.latency_age_s > 100


def test_replicas_on_a_clock_behind_the_controllers_are_not_stale_while_they_report(monkeypatch) -> None:
    """Serve stamps a replica's samples with the replica's wall clock; with `spec.apiPool` the ingress and the
    queue run on API pool nodes, not on the head with Serve's controller. The policy took the controller's wall
    clock less that stamp as the samples' age: with an API node's clock 2 minutes behind, every pool held at its
    size (MetricsStale) however long the queue grew. A sample is fresh now while it keeps changing."""
    import time

    policy, cfg, published = _publishing_policy(monkeypatch)
    for k in range(3):  # the controller calls it; the replicas report new samples between the calls
        by_name = _contexts(time.time() - 120.0 + 0.01 * k)  # stamped 2 minutes behind the controller's clock
        _serve_configs(cfg, by_name)
        policy({_DeploymentID(name): ctx for name, ctx in by_name.items()})
    llm, vision = published[-1]["llm"], published[-1]["vision"]
    assert llm.reason != "MetricsStale" and vision.reason != "MetricsStale", (llm, vision)


def test_a_replica_on_a_clock_ahead_that_stops_reporting_goes_stale_after_metrics_stale_seconds() -> None:
    """Stamped an hour ahead of the controller's clock, a replica's last samples looked fresh for an hour after
    it stopped reporting (an overloaded ingress): the pools were sized on its frozen figures. Now they go stale
    once unchanged for metricsStaleSeconds on the controller's monotonic clock; a replica still reporting keeps
    the deployment's newest sample fresh, whatever its clock."""
    mono = [100.0]
    ages = serve_policy.SampleAges(clock=lambda: mono[0])
    wall = 5000.0
    assert ages.age("Ingress", {"i1": wall + 3600.0}, wall) == 0.0
    mono[0] += 29.0
    assert ages.age("Ingress", {"i1": wall + 3600.0}, wall + 29.0) == pytest.approx(29.0)
    mono[0] += 2.0
    assert ages.age("Ingress", {"i1": wall + 3600.0}, wall + 31.0) == pytest.approx(31.0)  # over the default 30 s
    assert ages.age("Ingress", {"i1": wall + 3600.0, "i2": wall - 300.0}, wall + 31.0) == pytest.approx(31.0)
    mono[0] += 1.0
    assert ages.age("Ingress", {"i1": wall + 3600.0, "i2": wall - 299.0}, wall + 32.0) == 0.0  # i2 reports
    assert ages.age("Ingress", {}, wall + 32.0) == float("inf")
