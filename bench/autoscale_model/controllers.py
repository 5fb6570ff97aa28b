"""Who sizes the pools: fixed sizes, Ray Serve's default request-count rule, or dotsvlm's policy.

Each controller is called once per simulated second with the cluster and returns nothing; it calls
`cluster.set_target(pool, n)` when it wants a pool resized.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from dotsvlm_serving.autoscaling.policy import LLMSignals, PolicySpec, PolicyState, Snapshot, VisionSignals, decide

from .cluster import Cluster


class Fixed:
    name = "fixed"

    def tick(self, cluster: Cluster) -> None:
        pass


@dataclass
class ServeDefaultConfig:
    """Ray Serve 2.60's `AutoscalingConfig` defaults (ray/serve/config.py)."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    downscale_to_zero_delay_s: float | None = None
    look_back_period_s: float = 30.0
    upscaling_factor: float = 1.0  # smoothing_factor default 1.0
    downscaling_factor: float = 1.0


@dataclass
class _ServePoolState:
    samples: deque = field(default_factory=deque)  # (t, total ongoing requests)
    decision_counter: int = 0
    decision_timestamp: float | None = None


class ServeDefault:
    """A faithful re-implementation of Ray Serve 2.60's default policy, per deployment:
    `replica_queue_length_autoscaling_policy` (ray/serve/autoscaling_policy.py) -> desired =
    total ongoing requests (running at replicas + queued at handles, mean over `look_back_period_s`) /
    `target_ongoing_requests`; `_apply_scaling_factors`; the cold-start path (0 running replicas and a
    request waiting: at once to max(1, target)); `_apply_delay_logic` (a scale-up only after
    `upscale_delay_s` of consecutive scale-up decisions, a scale-down after `downscale_delay_s`); then the
    min/max bounds (`apply_bounds` in autoscaling_state.py).

    What Serve can count: the VisionEncoder is called through a handle by the ingress, so its ongoing
    requests are the image requests in the vision stage. The LLMServer replicas are never called with a
    request: they pull work from the tensor queue, so Serve sees 0 ongoing requests there whatever the LLM
    load (issue 8), and the LLM pool only ever moves towards min_replicas."""

    name = "serve-default"

    def __init__(self, vision: ServeDefaultConfig, llm: ServeDefaultConfig) -> None:
        self.cfg = {"vision": vision, "llm": llm}
        self.state = {"vision": _ServePoolState(), "llm": _ServePoolState()}

    def ongoing(self, cluster: Cluster, pool: str) -> float:
        if pool == "vision":
            return float(cluster.vision_pending()[0])
        return 0.0  # LLMServer: no handle calls; its work arrives through the tensor queue

    def tick(self, cluster: Cluster) -> None:
        now = cluster.now
        for pool in ("vision", "llm"):
            if pool == "vision" and cluster.mode != "disaggregated":
                continue
            cfg, st = self.cfg[pool], self.state[pool]
            st.samples.append((now, self.ongoing(cluster, pool)))
            while st.samples and now - st.samples[0][0] > cfg.look_back_period_s:
                st.samples.popleft()
            total = sum(v for _, v in st.samples) / len(st.samples)
            current = cluster.running_replicas(pool)
            target = cluster.targets[pool]
            desired = self._decide(cfg, st, total, current, target, now)
            desired = max(cfg.min_replicas, min(cfg.max_replicas, math.ceil(desired)))
            if desired != target:
                cluster.set_target(pool, desired)

    @staticmethod
    def _decide(cfg: ServeDefaultConfig, st: _ServePoolState, total: float, current: int, target: int, now: float) -> float:
        # _get_cold_start_scale_up_replicas
        if current == 0 and total > 0:
            return max(math.ceil(1 * cfg.upscaling_factor), target)
        # _core_replica_queue_length_policy
        if current == 0:
            desired: float = target
        else:
            desired = current * (total / (cfg.target_ongoing_requests * current))
        # _apply_scaling_factors
        if current == 0:
            scaled = math.ceil(desired)
        else:
            delta = desired - current
            factor = cfg.upscaling_factor if delta > 0 else cfg.downscaling_factor
            scaled = math.ceil(current + factor * delta)
            if math.ceil(float(desired)) < current and scaled == current:
                scaled -= 1
        if current == 0 and scaled > 0:
            return scaled
        # _apply_delay_logic (against the current target)
        desired_n, decision = max(0, scaled), target
        if desired_n > target:
            if st.decision_counter < 0:
                st.decision_counter, st.decision_timestamp = 0, None
            st.decision_counter += 1
            if st.decision_timestamp is None:
                st.decision_timestamp = now
            if now - st.decision_timestamp + 1e-6 >= cfg.upscale_delay_s:
                st.decision_counter, st.decision_timestamp = 0, None
                decision = desired_n
        elif desired_n < target:
            if st.decision_counter > 0:
                st.decision_counter, st.decision_timestamp = 0, None
            st.decision_counter -= 1
            if target == 1:
                delay = cfg.downscale_to_zero_delay_s if cfg.downscale_to_zero_delay_s is not None else cfg.downscale_delay_s
            else:
                delay = cfg.downscale_delay_s
                desired_n = max(1, desired_n)
            if st.decision_timestamp is None:
                st.decision_timestamp = now
            if now - st.decision_timestamp + 1e-6 >= delay:
                st.decision_counter, st.decision_timestamp = 0, None
                decision = desired_n
        else:
            st.decision_counter, st.decision_timestamp = 0, None
        return decision


class DotsVLM:
    """dotsvlm's policy: `dotsvlm_serving.autoscaling.policy.decide`, imported, not copied. The cluster
    reports what the live replicas report (`serve_policy.snapshot_from_contexts`): ingress-side vision
    backlog, the encode rate a replica measures, p90s over the last 30 s, queue depth and oldest age,
    running/waiting requests, KV use."""

    name = "dotsvlm"

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self.state = PolicyState()
        self.reasons: dict[str, dict[str, int]] = {"vision": {}, "llm": {}}

    def snapshot(self, c: Cluster) -> Snapshot:
        now = c.now
        pend, imgs, px = c.vision_pending()
        v = VisionSignals(running_replicas=c.running_replicas("vision"), pending_requests=pend, pending_images=imgs,
                          pending_pixels=px, encode_pixels_per_s=c.encode_rate(),
                          encode_latency_s=c.encode_lat.p90(now),
                          admitted_pixels_total=float(c.vision_admitted_pixels))
        running = c.running_replicas("llm")
        ready = [r for r in c.llm if r.ready(now) and not r.draining]
        kv = sum(r.kv_reserved / c.c.kv_tokens for r in ready) / running if running else 0.0
        oldest = now - c.queue[0][1] if c.queue else 0.0
        if c.producers:
            oldest = max(oldest, now - c.producers[0][1])
        llm = LLMSignals(running_replicas=running, queue_depth=len(c.queue), queue_oldest_age_s=max(oldest, 0.0),
                         waiting_producers=len(c.producers), running=sum(len(r.running) for r in c.llm),
                         waiting=sum(len(r.waiting) for r in c.llm), kv_used_fraction=kv,
                         ttft_image_s=c.ttft["image"].p90(now), ttft_text_s=c.ttft["text"].p90(now),
                         inter_token_s=c.itl.p90(now), completed_total=float(c.completed))
        return Snapshot(vision=v, llm=llm)

    def tick(self, c: Cluster) -> None:
        decisions = decide(self.snapshot(c), self.spec, self.state, c.now, current=dict(c.targets))
        for pool, d in decisions.items():
            if d.desired != c.targets[pool]:
                self.reasons[pool][d.reason] = self.reasons[pool].get(d.reason, 0) + 1
                c.set_target(pool, d.desired)
