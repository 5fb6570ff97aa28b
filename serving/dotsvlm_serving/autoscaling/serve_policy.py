"""dotsvlm's policy as Ray Serve's application-level autoscaling policy (the fast loop).

Serve's controller calls `DotsVLMAutoscalingPolicy` every control-loop tick with one
`AutoscalingContext` per autoscaled deployment of the application. The replicas' own reports
(`record_autoscaling_stats`, names in `signals`) arrive in `ctx.raw_metrics`; this adapter reduces the
newest value of every running replica to the policy's `Snapshot`, calls `policy.decide` (the same code
the simulator runs), and returns the target replicas of VisionEncoder and LLMServer. Ingress and
TensorQueue are registered only so their reports reach the controller; their size is left alone.

Each decision is also published: `dotsvlm_autoscaler_*` metrics through `ray.util.metrics`, and the
latest decision per pool as JSON in Ray's internal KV (`DECISIONS_KV_KEY`), with the settings it was
made with, which the ingress serves to the operator for the resource's status.

The policy takes no kwargs (Ray would hash them into every deployment's version: a settings change
would restart every replica; see `ServeAppConfig.autoscaling_policy`). It reads its settings every call
instead: each pool's bounds and target from Serve's own AutoscalingConfig of the deployment
(`ctx.config`, updated in place on a deploy), the SLO and the other knobs from Ray's internal KV
(`SETTINGS_KV_KEY`), where the ingress writes them from its slice (`publish_settings`, in its
`reconfigure`). Until they are there, the policy holds every pool at its size.

How old the newest sample is (the signals' `age_s`, against `metricsStaleSeconds`) is not the controller's
wall clock less the sample's timestamp: Serve stamps a sample with its replica's wall clock, on another node
with `spec.apiPool` (ingress, queue), and a clock off by metricsStaleSeconds held every pool (MetricsStale)
as long as it was behind, or kept a replica's frozen figures that long when ahead. `SampleAges` times how long
each replica's newest sample has not changed on the controller's monotonic clock; only a replica's first
sighting goes by the wall clocks' difference.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from typing import Any

from ..serve_config import (INGRESS_DEPLOYMENT, LLM_DEPLOYMENT, QUEUE_DEPLOYMENT, VISION_DEPLOYMENT,
                            AutoscalingPolicyConfig, LLMAutoscaling, VisionAutoscaling)
from . import signals as sig
from .policy import (ACTIONS, WAKE_UP, Decision, LLMSignals, PolicySpec, PolicyState, PoolState, Snapshot, VisionSignals,
                     _note_outside_change, decide, follow_clock)

log = logging.getLogger("ray.serve")

DECISIONS_KV_KEY = b"dotsvlm/autoscaler/decisions"
SETTINGS_KV_KEY = b"dotsvlm/autoscaler/settings"
KV_NAMESPACE = "dotsvlm"
STATE_KEY = "dotsvlm"
PUBLISH_INTERVAL_S = 2.0
# How often the policy reads its settings from the KV (Serve calls it several times a second).
SETTINGS_REFRESH_S = 1.0


class SampleAges:
    """How long since each deployment's replicas' newest samples changed, on the controller's monotonic clock
    (module docstring). Kept by the policy between calls; a replica no longer reporting is forgotten (it
    comes back as a first sighting)."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._heard: dict[str, dict[Any, tuple[float, float]]] = {}  # deployment -> replica -> (stamp, since)

    def age(self, deployment: str, newest: dict[Any, float], wall_now: float) -> float:
        """The age of the deployment's newest sample: the least time any replica's newest sample (`newest`:
        replica -> its timestamp, the replica's wall clock) has gone unchanged. A first sighting counts from
        the wall clocks' difference (never below 0)."""
        now = self._clock()
        before = self._heard.get(deployment, {})
        heard = {}
        for replica, stamp in newest.items():
            old = before.get(replica)
            if old is not None and old[0] == stamp:
                heard[replica] = old
            elif old is not None:
                heard[replica] = (stamp, now)
            else:
                heard[replica] = (stamp, now - max(wall_now - stamp, 0.0))
        self._heard[deployment] = heard
        return min((now - since for _, since in heard.values()), default=float("inf"))


def _latest(ctx: Any, now: float, deployment: str = "", ages: SampleAges | None = None
            ) -> tuple[dict[str, float], float, int]:
    """Each stat's newest value per running replica, reduced over replicas: counts are summed, p90
    latencies take the worst replica, rates the mean. NO_DATA values ("no sample") are left out, and so are
    values that are not finite numbers (NaN, inf: `decide` cannot size a pool on them, and raised). Also the
    age of the newest sample (by `ages`, under the deployment's name, or by the wall clocks) and how many
    replicas reported."""
    values: dict[str, list[float]] = {}
    newest: dict[Any, float] = {}  # replica -> its newest sample's timestamp
    for name, per_replica in (ctx.raw_metrics or {}).items():
        for replica, series in per_replica.items():
            if not series:
                continue
            last = max(series, key=lambda s: s.timestamp)
            newest[replica] = max(newest.get(replica, last.timestamp), last.timestamp)
            if math.isfinite(last.value):
                values.setdefault(name, []).append(last.value)
    totals: dict[str, float] = {}
    for name, vals in values.items():
        if name.endswith("_p90_s") or name == sig.ENCODE_PIXELS_PER_S:
            known = [v for v in vals if v != sig.NO_DATA]
            if known:
                totals[name] = max(known) if name.endswith("_p90_s") else sum(known) / len(known)
        else:
            totals[name] = sum(vals)
    if ages is not None:
        age = ages.age(deployment, newest, now)
    else:
        age = now - max(newest.values()) if newest else float("inf")
    return totals, age, len(newest)


def snapshot_from_contexts(contexts: dict[str, Any], now: float, ages: SampleAges | None = None) -> Snapshot:
    """The policy's snapshot from Serve's contexts, keyed by deployment name. `ages`: the policy's own (the
    samples' ages on its monotonic clock); without, by the wall clocks."""
    ingress = contexts.get(INGRESS_DEPLOYMENT)
    queue = contexts.get(QUEUE_DEPLOYMENT)
    vision = contexts.get(VISION_DEPLOYMENT)
    llm = contexts.get(LLM_DEPLOYMENT)
    ing, ing_age, ing_n = (_latest(ingress, now, INGRESS_DEPLOYMENT, ages) if ingress
                           else ({}, float("inf"), 0))
    v_signals = None
    if vision is not None and ing_n:
        vis, _, _ = _latest(vision, now)
        v_signals = VisionSignals(
            running_replicas=len(vision.running_replicas),
            pending_requests=ing.get(sig.VISION_PENDING_REQUESTS, 0.0),
            pending_images=ing.get(sig.VISION_PENDING_IMAGES, 0.0),
            pending_pixels=ing.get(sig.VISION_PENDING_PIXELS, 0.0),
            encode_pixels_per_s=vis.get(sig.ENCODE_PIXELS_PER_S),
            encode_latency_s=ing.get(sig.ENCODE_LATENCY_P90),
            admitted_pixels_total=ing.get(sig.VISION_ADMITTED_PIXELS),
            age_s=ing_age)
    l_signals = None
    if llm is not None and queue is not None:
        q, q_age, q_n = _latest(queue, now, QUEUE_DEPLOYMENT, ages)
        if q_n:
            ll, _, _ = _latest(llm, now)
            running = len(llm.running_replicas)
            l_signals = LLMSignals(
                running_replicas=running,
                queue_depth=q.get(sig.QUEUE_DEPTH, 0.0), queue_oldest_age_s=q.get(sig.QUEUE_OLDEST_AGE, 0.0),
                waiting_producers=q.get(sig.QUEUE_WAITING_PRODUCERS, 0.0), completed_total=q.get(sig.QUEUE_COMPLETED),
                running=ll.get(sig.LLM_RUNNING, 0.0), waiting=ll.get(sig.LLM_WAITING, 0.0),
                kv_used_fraction=ll.get(sig.LLM_KV_USED_FRACTION, 0.0) / running if running else 0.0,
                ttft_image_s=ing.get(sig.TTFT_IMAGE_P90), ttft_text_s=ing.get(sig.TTFT_TEXT_P90),
                inter_token_s=ing.get(sig.ITL_P90), age_s=q_age, latency_age_s=ing_age if ing_n else 0.0)
    return Snapshot(vision=v_signals, llm=l_signals)


def serve_applies(ctx: Any, desired: int) -> tuple[int, bool]:
    """The target Ray Serve sets for a deployment when the policy returns `desired`, and whether that is
    Serve's cold start. Ray 2.60 (as installed) wraps an application-level policy
    (`ray/serve/autoscaling_policy.py`, `_apply_app_level_autoscaling_config`); its delays and scaling factors
    are neutral here (`serve_config.autoscaling`), but two of its rules still override the policy:
    - cold start (`_get_cold_start_scale_up_replicas`): while no replica of the deployment RUNS and requests
      wait at its handles, Serve sets max(ceil(upscaling factor), target) = max(1, target) and never looks
      at the policy's number: a pool woken from zero starts one replica first;
    - to zero only from one (`_apply_delay_logic`): a scale-down from more than 1 replica stops at 1."""
    target = ctx.target_num_replicas
    running = getattr(ctx, "current_num_replicas", None)
    running = len(ctx.running_replicas or []) if running is None else running
    if running == 0 and (getattr(ctx, "total_num_requests", 0) or 0) > 0:
        factor = ctx.config.get_upscaling_factor() if getattr(ctx, "config", None) is not None else 1.0
        return max(math.ceil(factor), target), True
    if desired < target and target != 1:
        return max(1, desired), False
    return desired, False


def _as_applied(d: Decision, applied: int, cold: bool, st: PoolState, before: PoolState, now: float,
                cfg: VisionAutoscaling | LLMAutoscaling | None = None) -> Decision:
    """`d` as Serve applies it (`serve_applies`): the state records the target Serve sets and the change it
    makes (the policy's next call compares Serve's target with the recorded one), not the number Serve
    ignored; the decision published and counted is that change."""
    # Undo what `decide` recorded for the change it asked for (it is not made), keeping what it noted of a
    # change made outside the policy before it decided.
    if before.target is not None and d.current != before.target:
        _note_outside_change(d.pool, before, d.current, now, cfg)
    st.last_reason, st.last_message, st.last_change_at = before.last_reason, before.last_message, before.last_change_at
    st.last_scale_up_at, st.last_scale_down_at = before.last_scale_up_at, before.last_scale_down_at
    st.target = applied
    if cold:
        reason = WAKE_UP
        message = (f"no {d.pool} replica runs yet and requests wait: Ray Serve starts {applied} replica(s) first "
                   f"(a cold start) until one runs; the autoscaler asks for {d.desired} ({d.signal}: {d.message})")
    else:
        reason = d.reason
        message = (f"{d.message}; Ray Serve takes a pool to zero only from 1 replica: {d.current} -> {applied} now, "
                   f"to zero next")
    if applied > d.current:
        st.last_scale_up_at = now
    elif applied < d.current:
        st.last_scale_down_at = now
    if applied != d.current:
        st.last_change_at = now
        st.last_reason, st.last_message = reason, message
    return replace(d, desired=applied, reason=reason, message=message)


class _Metrics:
    """`dotsvlm_autoscaler_*` through Ray's metrics export (created lazily: only inside Ray)."""

    def __init__(self) -> None:
        from ray.util import metrics

        from ..metrics.publish import resource_tags

        # The DotsVLMDeployment's labels, like every dotsvlm metric (the dashboards filter by them).
        resource = resource_tags()
        self.desired = metrics.Gauge("dotsvlm_autoscaler_desired_replicas",
                                     description="Replicas the autoscaling policy wants per pool",
                                     tag_keys=(*resource, "pool")).set_default_tags(resource)
        self.decisions = metrics.Counter("dotsvlm_autoscaler_decisions",
                                         description="Autoscaling decisions per pool, direction and reason",
                                         tag_keys=(*resource, "pool", "direction", "reason")).set_default_tags(resource)
        # Every action's series exists at 0 from the start: Prometheus's increase() needs a sample before the
        # first decision, or the dashboards miss each series' first action. Ray's public Counter.inc refuses 0,
        # so the zero goes through the method inc() itself records with.
        for pool, actions in ACTIONS.items():
            for direction, reason in actions:
                self.decisions._record(0, tags={"pool": pool, "direction": direction, "reason": reason})

    def record(self, d: Decision) -> None:
        self.desired.set(d.desired, tags={"pool": d.pool})
        if d.direction != "hold":  # Serve calls the policy many times a second: count actions, not ticks
            self.decisions.inc(tags={"pool": d.pool, "direction": d.direction, "reason": d.reason})


def publish(decisions: dict[str, Decision], state: PolicyState, now: float, spec: PolicySpec | None = None) -> None:
    """The latest decision per pool where the ingress can read it (Ray's internal KV), with the pool's
    settings and the SLO it was decided with."""
    from ray.experimental import internal_kv

    record = {pool: {"desired": d.desired, "current": d.current, "raw": d.raw, "reason": d.reason, "signal": d.signal,
                     "message": d.message, "direction": d.direction, "time": now,
                     "last_change": {"reason": state.pool(pool).last_reason,  # type: ignore[arg-type]
                                     "message": state.pool(pool).last_message,  # type: ignore[arg-type]
                                     "time": state.pool(pool).last_change_at},  # type: ignore[arg-type]
                     **({"settings": getattr(spec, pool).model_dump(mode="json"),
                         "slo": spec.slo.model_dump(mode="json")} if spec is not None else {})}
              for pool, d in decisions.items()}
    internal_kv._internal_kv_put(DECISIONS_KV_KEY, json.dumps(record).encode(), overwrite=True, namespace=KV_NAMESPACE)


def publish_settings(settings: AutoscalingPolicyConfig) -> None:
    """The policy's settings beyond Serve's fields, for the policy to read (the ingress's reconfigure)."""
    from ray.experimental import internal_kv

    internal_kv._internal_kv_put(SETTINGS_KV_KEY, settings.model_dump_json().encode(), overwrite=True,
                                 namespace=KV_NAMESPACE)


def read_settings() -> AutoscalingPolicyConfig | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(SETTINGS_KV_KEY, namespace=KV_NAMESPACE)
    return AutoscalingPolicyConfig.model_validate_json(raw) if raw else None


def policy_spec(settings: AutoscalingPolicyConfig, contexts: dict[str, Any]) -> PolicySpec:
    """The pure policy's spec from the settings and, per pool, the AutoscalingConfig Serve holds for its
    deployment now (`ctx.config`: bounds and target)."""
    def serve_config(name: str) -> Any:
        ctx = contexts.get(name)
        return getattr(ctx, "config", None) if ctx is not None else None
    return PolicySpec(slo=settings.slo,
                      vision=VisionAutoscaling.from_serve(settings.vision, serve_config(VISION_DEPLOYMENT)),  # type: ignore[arg-type]
                      llm=LLMAutoscaling.from_serve(settings.llm, serve_config(LLM_DEPLOYMENT)))  # type: ignore[arg-type]


def read_published() -> dict[str, Any] | None:
    from ray.experimental import internal_kv

    raw = internal_kv._internal_kv_get(DECISIONS_KV_KEY, namespace=KV_NAMESPACE)
    return json.loads(raw) if raw else None


class DotsVLMAutoscalingPolicy:
    """Instantiated once by Serve, without kwargs; its settings are read on every call (module docstring)."""

    def __init__(self, read: Any = None) -> None:
        self._read = read or read_settings  # tests pass their own
        self._settings: AutoscalingPolicyConfig | None = None
        self._settings_at = float("-inf")
        self._metrics: _Metrics | None = None
        self._last_logged: dict[str, tuple[int, str]] = {}
        self._published_at = 0.0
        self._said_waiting = False
        self._last_spec: PolicySpec | None = None  # what the last decision was made with
        self._ages = SampleAges()  # the samples' ages, on the controller's monotonic clock

    def settings(self, now: float) -> AutoscalingPolicyConfig | None:
        """The latest settings the ingress wrote, read at most every SETTINGS_REFRESH_S; the last ones
        read are kept when the KV cannot be read."""
        if now - self._settings_at >= SETTINGS_REFRESH_S:
            self._settings_at = now
            try:
                self._settings = self._read() or self._settings
            except Exception:  # the KV unreachable for a moment: keep deciding with what was read
                log.exception("dotsvlm autoscaler: could not read the policy's settings; keeping the last ones")
        return self._settings

    def __call__(self, contexts: dict[Any, Any]) -> tuple[dict[Any, int], dict[Any, dict]]:
        by_name = {dep_id.name: ctx for dep_id, ctx in contexts.items()}
        ids = {dep_id.name: dep_id for dep_id in contexts}
        now = time.time()
        settings = self.settings(now)
        spec = None
        if settings is not None:
            try:
                spec = policy_spec(settings, by_name)
            except ValueError as exc:  # settings another version wrote, say: hold until the ingress writes again
                if not self._said_waiting:
                    log.error("dotsvlm autoscaler: the policy's settings do not fit this version (%s); every pool "
                              "keeps its size until the ingress hands over new ones", exc)
                    self._said_waiting = True
        if spec is None:  # the ingress has not written them yet: hold, keep the state
            if not self._said_waiting:
                log.info("dotsvlm autoscaler: waiting for the ingress to hand over the policy's settings; "
                         "every pool keeps its size")
                self._said_waiting = True
            return {}, {dep_id: dict(ctx.policy_state or {}) for dep_id, ctx in contexts.items()}
        self._said_waiting = False
        self._last_spec = spec
        state = PolicyState(
            vision=PoolState.from_json((by_name[VISION_DEPLOYMENT].policy_state or {}).get(STATE_KEY))
            if VISION_DEPLOYMENT in by_name else PoolState(),
            llm=PoolState.from_json((by_name[LLM_DEPLOYMENT].policy_state or {}).get(STATE_KEY))
            if LLM_DEPLOYMENT in by_name else PoolState())
        current = {pool: by_name[name].target_num_replicas
                   for pool, name in (("vision", VISION_DEPLOYMENT), ("llm", LLM_DEPLOYMENT)) if name in by_name}
        follow_clock(state, now, spec)  # before `before`: what `_as_applied` restores must be on the same clock
        before = {pool: state.pool(pool).to_json() for pool in ("vision", "llm")}  # type: ignore[arg-type]
        decisions = decide(snapshot_from_contexts(by_name, now, self._ages), spec, state, now, current=current)  # type: ignore[arg-type]
        out: dict[Any, int] = {}
        new_state: dict[Any, dict] = {}
        for pool, name in (("vision", VISION_DEPLOYMENT), ("llm", LLM_DEPLOYMENT)):
            if name in ids:
                d = decisions[pool]  # type: ignore[index]
                applied, cold = serve_applies(by_name[name], d.desired)
                # Serve bounds what it applies (its cold start keeps a target the new bounds no longer allow)
                bounds = spec.vision if pool == "vision" else spec.llm
                applied = max(bounds.min_replicas, min(bounds.max_replicas, applied))
                if applied != d.desired:  # Serve overrides the policy here: record and publish what it applies
                    d = decisions[pool] = _as_applied(  # type: ignore[index]
                        d, applied, cold, state.pool(pool), PoolState.from_json(before[pool]), now,  # type: ignore[arg-type]
                        bounds)
                out[ids[name]] = d.desired
                new_state[ids[name]] = {STATE_KEY: state.pool(pool).to_json()}  # type: ignore[arg-type]
        # A pool whose deployment Serve did not pass (being created or deleted) was decided on nothing: its
        # decision (held at a size and bounds from defaults) is neither published nor counted.
        self._report({pool: d for pool, d in decisions.items()
                      if (VISION_DEPLOYMENT if pool == "vision" else LLM_DEPLOYMENT) in ids},
                     state, now, spec)  # type: ignore[arg-type]
        return out, new_state

    def _report(self, decisions: dict[str, Decision], state: PolicyState, now: float, spec: PolicySpec) -> None:
        try:
            if self._metrics is None:
                self._metrics = _Metrics()
            changed = False
            for d in decisions.values():
                self._metrics.record(d)
                key = (d.desired, d.reason)
                if self._last_logged.get(d.pool) != key:
                    changed = True
                    if d.direction != "hold":
                        log.info("dotsvlm autoscaler: %s %s -> %s (%s): %s", d.pool, d.current, d.desired, d.reason,
                                 d.message)
                self._last_logged[d.pool] = key
            if changed or now - self._published_at >= PUBLISH_INTERVAL_S:
                publish(decisions, state, now, spec)
                self._published_at = now
        except Exception:  # reporting must never stop scaling
            log.exception("dotsvlm autoscaler: could not publish the decision")
