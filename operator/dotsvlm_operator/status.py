"""Pure status computation: what the pods and the Ray head say -> conditions a person can act on.

`compute_status` takes plain observations (pods reduced to `PodView`, the Serve application as a
`ServeObservation`, the pod plan per pool from `pod_sizing`, the autoscaler's report from the ingress)
and returns the new status plus the condition transitions worth an Event; `scaling_events` says which
scaling decisions are worth one. The kopf handlers only gather the observations and write the result.
Everything the status shows is computed here (the operator's own metrics read the same status).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from dotsvlm_operator import models
from dotsvlm_operator.naming import (ANNOTATION_POD_DELETION_COST, COMPONENT_API_POOL, COMPONENT_HEAD, COMPONENT_LLM,
                                     COMPONENT_VISION, LABEL_COMPONENT)

if TYPE_CHECKING:
    from dotsvlm_operator.ingress_client import AutoscalerReport, PoolDecision
    from dotsvlm_operator.pod_sizing import PoolPlan
    from dotsvlm_operator.ray_head import DeploymentView, ServeApp

# The queue and SLO figures change all the time under load: write them at most this often.
QUEUE_REFRESH_S = 10.0
# A decision older than this is not a wish to act on (the policy publishes every 2 s while it runs).
DECISION_FRESH_S = 30.0
# A decision the operator has not read before goes by the wall clocks' difference, at most this much.
DECISION_FIRST_SIGHTING_CAP_S = 2 * DECISION_FRESH_S

# Container waiting reasons that will not fix themselves: the deployment is Degraded until someone acts.
BAD_WAITING_REASONS = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                       "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
SERVE_FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}
# Ready=False reason: the LLM pool (every request needs it) is at zero replicas.
NO_LLM_REPLICA = "NoLLMReplica"
LLM_REPLICA_STARTING = "LLMReplicaStarting"
# Progressing reason: a pod-template change (a new image, say) rolls one group at a time.
ROLLING_OUT = "RollingOut"


# Ray refuses a node whose Ray or Python version differs from the head's (`ray start` exits 1 with this).
_VERSION_MISMATCH = re.compile(r"Version mismatch:.*?Ray: (\S+)\s+Python: (\S+).*?Ray: (\S+)\s+Python: (\S+)", re.S)
RAY_VERSION_HINT = ("a new image with another Ray or Python version cannot join the running Ray head, so it cannot "
                    "roll pool by pool: set spec.rolloutStrategy to AllAtOnce, and the head and both pools take the "
                    "image together (new requests get 503 until they serve again); or set spec.image back to the "
                    "running image to restore the pool, and create a new DotsVLMDeployment beside this one for the "
                    "upgrade and move traffic to it (docs/operator.md, \"A new spec.image\"). Under AllAtOnce this "
                    "passes by itself once the new head runs.")


def crash_summary(terminated: dict[str, Any]) -> str:
    """What the last run of a crashing container said: its exit code and, from its termination message
    (the pods set `terminationMessagePolicy: FallbackToLogsOnError`, so the last log lines when it wrote
    none), Ray's version mismatch spelled out or the last line, the one that usually names the error."""
    code = terminated.get("exitCode")
    text = (terminated.get("message") or "").strip()
    head = f"the container exited with code {code}" if code is not None else "the container keeps exiting"
    m = _VERSION_MISMATCH.search(text)
    if m:
        return (f"{head}: Ray version mismatch: the Ray head runs Ray {m[1]} (Python {m[2]}), this image has Ray "
                f"{m[3]} (Python {m[4]}). To fix: {RAY_VERSION_HINT}")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"{head} (kubectl logs --previous shows why)."
    last = lines[-1] if len(lines[-1]) <= 500 else lines[-1][:497] + "..."
    return f"{head}: {last} (kubectl logs --previous has the rest)."


@dataclass(frozen=True)
class PodView:
    """The few facts about a pod that status needs."""

    name: str
    component: str
    ready: bool = False
    scheduled: bool = False
    unschedulable: str | None = None  # the scheduler's message when it could not place the pod
    problem: str | None = None  # "ImagePullBackOff: ..." when a container is stuck
    deleting: bool = False
    ip: str | None = None  # status.podIP: a Ray worker pod is one Ray node, so a replica's node_ip is this
    deletion_cost: str | None = None  # the controller.kubernetes.io/pod-deletion-cost annotation


def pod_view(pod: dict[str, Any]) -> PodView:
    """Reduce a pod (as the API returns it) to a PodView."""
    meta = pod.get("metadata") or {}
    st = pod.get("status") or {}
    conds = {c.get("type"): c for c in st.get("conditions") or []}
    sched = conds.get("PodScheduled") or {}
    ready = (conds.get("Ready") or {}).get("status") == "True"
    unschedulable = None
    if sched.get("status") == "False" and sched.get("reason") == "Unschedulable":
        unschedulable = sched.get("message") or "no node fits the pod"
    problem = None
    for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in BAD_WAITING_REASONS:
            crash = ((cs.get("lastState") or {}).get("terminated") or {}) if waiting["reason"] == "CrashLoopBackOff" else {}
            problem = (f"CrashLoopBackOff: {crash_summary(crash)}" if crash else
                       f"{waiting['reason']}: {waiting.get('message') or 'see kubectl describe pod'}")
            break
    return PodView(
        name=meta.get("name", "?"),
        component=(meta.get("labels") or {}).get(LABEL_COMPONENT, ""),
        ready=ready,
        scheduled=sched.get("status") == "True" or bool((pod.get("spec") or {}).get("nodeName")),
        unschedulable=unschedulable,
        problem=problem,
        deleting=bool(meta.get("deletionTimestamp")),
        ip=st.get("podIP") or None,
        deletion_cost=(meta.get("annotations") or {}).get(ANNOTATION_POD_DELETION_COST),
    )


@dataclass(frozen=True)
class ServeObservation:
    """What the Ray head said about the Serve application (or why it could not be asked)."""

    url: str
    reachable: bool
    status: str = "Unknown"  # RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY, NOT_STARTED, or Unknown
    message: str = ""
    config_hash: str | None = None
    app: ServeApp | None = None  # the application's deployments (targets, replicas) when it was read
    drift: str | None = None  # the head ran another config (what differed); the spec's was deployed again


@dataclass(frozen=True)
class Transition:
    """A condition that changed status or reason: worth a Kubernetes Event (not a first Degraded=False, nor a
    Progressing change that the Ready change beside it already tells with the same reason)."""

    type: str
    status: str
    reason: str
    message: str
    warning: bool


@dataclass
class _Findings:
    waiting: list[tuple[str, str]] = field(default_factory=list)  # (reason, message): not Ready
    progressing: list[tuple[str, str]] = field(default_factory=list)  # still moving, but Ready
    degraded: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # Ready, with a limit the user should know about


def _first_sentence(msg: str) -> str:
    """The scheduler's first sentence ("0/6 nodes are available: ..."), without the preemption tail."""
    first = re.split(r"\.(?:\s|$)", msg.strip(), maxsplit=1)[0]
    return first.rstrip(". ,") + "."


def _volume_problem(msg: str) -> bool:
    return "persistentvolumeclaim" in msg.lower()


VOLUME_HINT = ("check model.volume: the PersistentVolumeClaim must exist in this namespace and be bound "
               "(kubectl get pvc)")


def _placement_hint(pool: str, spec: models.DotsVLMDeploymentSpec) -> str:
    if pool == COMPONENT_VISION:
        gpus, selector, field_ = spec.vision.gpus_per_replica, spec.vision.node_selector, "vision"
    else:
        gpus, selector, field_ = spec.llm.gpus_per_pod, spec.llm.node_selector, "llm"
    where = "a node"
    if selector:
        where += " labelled " + ", ".join(f"{k}={v}" for k, v in sorted(selector.items()))
    need = f"{gpus} free nvidia.com/gpu" if gpus else "room for the pod"
    extra = ""
    if pool == COMPONENT_LLM and spec.llm.nodes_per_replica > 1:
        extra = f" ({spec.llm.nodes_per_replica} such nodes per LLM replica)"
    return (f"each {pool} pod needs {need} on {where}{extra}; add such nodes, free GPUs on them, "
            f"or lower {field_}.minReplicas")


def _iso(unix: float | None) -> str | None:
    if unix is None:
        return None
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _decision_status(d: PoolDecision) -> models.ScalingDecisionStatus:
    return models.ScalingDecisionStatus(reason=d.reason, message=d.message[:1000], direction=d.direction,
                                        desired=d.desired, raw=d.raw, signal=d.signal, time=_iso(d.time))


def _last_scale(d: PoolDecision) -> models.ScalingDecisionStatus | None:
    lc = d.last_change
    if lc is None or not lc.reason or lc.time is None:
        return None
    return models.ScalingDecisionStatus(reason=lc.reason, message=(lc.message or "")[:1000], time=_iso(lc.time))


def serve_deployment(serve: ServeObservation | None, pool: str) -> DeploymentView | None:
    """Serve's deployment behind a pool, when the head answered."""
    from dotsvlm_serving.serve_config import LLM_DEPLOYMENT, VISION_DEPLOYMENT

    if serve is None or serve.app is None:
        return None
    return serve.app.deployments.get(VISION_DEPLOYMENT if pool == COMPONENT_VISION else LLM_DEPLOYMENT)


def pool_decision(report: AutoscalerReport | None, pool: str) -> PoolDecision | None:
    if report is None or report.error or not report.decisions:
        return None
    return report.decisions.get(pool)


def decision_ages(report: AutoscalerReport | None, heard: dict[str, tuple[float, float, float]], now_unix: float,
                  now: float) -> tuple[dict[str, tuple[float, float, float]], dict[str, float]]:
    """How long each pool's decision has not changed, without comparing clocks: its `time` is the wall clock of
    Serve's controller on the Ray head, another node than the operator's, and a clock off by DECISION_FRESH_S
    (NTP stepped, a node never synced) made every decision look stale (no pods ever started ahead of demand) or
    a stopped policy's last one look fresh. `heard`: pool -> (the decision's `time` last read, when on the
    operator's monotonic clock `now` it was first read, when it was last read). A decision's age is the wall
    clocks' difference within bounds: [0, DECISION_FIRST_SIGHTING_CAP_S] at a first sighting, [0, the time since
    the last read] when it changed since (it was made after that read: with synced clocks, one read after the
    report was unreadable for minutes is as old as it is, not new). Returns the new `heard` and pool -> seconds
    unchanged; without a report, `heard` stays as it was."""
    if report is None or report.error or not report.decisions:
        return heard, {}
    new, silent = {}, {}
    for pool, d in report.decisions.items():
        if d.time is None:
            continue
        before = heard.get(pool)
        if before is not None and before[0] == d.time:
            new[pool] = (d.time, before[1], now)
        else:
            bound = DECISION_FIRST_SIGHTING_CAP_S if before is None else max(now - before[2], 0.0)
            new[pool] = (d.time, now - min(max(now_unix - d.time, 0.0), bound), now)
        silent[pool] = now - new[pool][1]
    return new, silent


def raw_wish(report: AutoscalerReport | None, pool: str, silent_s: dict[str, float]) -> int | None:
    """The policy's raw wish for the pool, when its decision is fresh enough to act on (`decision_ages`)."""
    d = pool_decision(report, pool)
    if d is None or silent_s.get(pool, float("inf")) > DECISION_FRESH_S:
        return None
    return d.raw


def _pool_status(pool: str, pods: list[PodView], desired: int, per_replica: int, dep: DeploymentView | None,
                 plan: PoolPlan | None, decision: PoolDecision | None,
                 old: models.PoolStatus | None) -> models.PoolStatus:
    live = [p for p in pods if p.component == pool and not p.deleting]
    ready_pods = sum(p.ready for p in live)
    ready = min(ready_pods // per_replica, desired)
    last_decision = old.last_decision if old else None
    last_scale = old.last_scale if old else None
    if decision is not None:
        new = _decision_status(decision)
        # Keep the old record (and its time) while the outcome and the reason stay the same: the policy
        # publishes every 2 s, the status need not change with it.
        if last_decision is None or (new.reason, new.signal, new.desired, new.raw, new.direction) != (
                last_decision.reason, last_decision.signal, last_decision.desired, last_decision.raw,
                last_decision.direction):
            last_decision = new
        last_scale = _last_scale(decision) or last_scale
    return models.PoolStatus(
        replicas=len(live) // per_replica, ready_replicas=ready, desired_replicas=desired,
        current_replicas=dep.running if dep is not None else None,
        pods=len(live), ready_pods=ready_pods, pending_pods=sum(not p.scheduled for p in live),
        desired_pods=plan.pods if plan is not None else desired * per_replica,
        pods_reason=plan.reason if plan is not None else None,
        pods_message=plan.message[:1000] if plan is not None else None,
        ready_of_desired=f"{ready}/{desired}", last_decision=last_decision, last_scale=last_scale)


def _pool_findings(pool: str, pods: list[PodView], desired: int, spec: models.DotsVLMDeploymentSpec,
                   plan: PoolPlan | None, f: _Findings, dep: DeploymentView | None = None) -> None:
    live = [p for p in pods if p.component == pool and not p.deleting]
    per = spec.llm.nodes_per_replica if pool == COMPONENT_LLM else 1
    minimum = spec.llm.min_replicas if pool == COMPONENT_LLM else spec.vision.min_replicas
    want_pods = plan.pods if plan is not None else desired * per
    label = "LLM" if pool == COMPONENT_LLM else "vision"
    pending = [p for p in live if p.unschedulable]
    if pending:
        why = pending[0].unschedulable or ""
        hint = VOLUME_HINT if _volume_problem(why) else _placement_hint(pool, spec)
        f.degraded.append(("Unschedulable",
                           f"{len(pending)} of {len(live)} {label} pods pending: {_first_sentence(why)} To fix: {hint}."))
    broken = [p for p in live if p.problem]
    if broken:
        f.degraded.append(("PodFailing", f"{label} pod {broken[0].name} cannot start: {broken[0].problem}"
                           + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else "")))
    if per > 1:
        scheduled = sum(p.scheduled for p in live)
        if scheduled % per:
            f.degraded.append(("PartialPlacement",
                               f"LLM replica placement is partial: {scheduled} of {len(live)} LLM pods are scheduled, "
                               f"so {-(-(len(live) - scheduled) // per)} LLM replica(s) cannot start; each replica needs "
                               f"{per} pods on different nodes with {spec.llm.gpus_per_pod} free nvidia.com/gpu each."))
    ready = sum(p.ready for p in live)
    unit = f" ({ready} of {desired * per} pods)" if per > 1 else ""
    # Ready needs each pool at its minimum (at least one replica when it has any): a pool that grows on
    # demand is Progressing while its new replicas start, not un-Ready.
    serving_floor = min(desired, max(minimum, 1))
    if desired == 0 and ready // per == 0:
        # A pool at zero: every request needs the LLM pool, so nothing can be answered; only requests
        # with images need the vision pool, and they wait for a replica to wake up.
        if pool == COMPONENT_LLM:
            f.waiting.append((NO_LLM_REPLICA, (
                "the LLM pool has no replica (llm.minReplicas is 0 and the autoscaler wants none), so no request "
                "can be answered: requests wait in the queue until a replica has started and loaded the model, "
                "or time out. To fix: set llm.minReplicas to 1 or more")))
        else:
            f.notes.append(
                "the vision pool is at zero replicas (vision.minReplicas is 0): text requests are answered at once, "
                "a request with images waits until a vision replica has woken up and started (within "
                "api.requestTimeoutSeconds); set vision.minReplicas to 1 to keep one warm")
    elif ready // per < serving_floor:
        f.waiting.append(("PodsNotReady", f"{label} pool: {ready // per} of {desired} replicas ready{unit}"))
    elif dep is not None and serving_floor >= 1 and dep.running == 0:
        # Ready pods are Ray nodes; the replica on them may still load the model (minutes for a large
        # checkpoint), e.g. when the pool wakes from zero while the application stays RUNNING.
        counts = sorted(Counter(r.state for r in dep.replicas).items())
        states = ", ".join(f"{n} {st}" for st, n in counts) or "none yet"
        if pool == COMPONENT_LLM:
            f.waiting.append((LLM_REPLICA_STARTING, (
                f"the LLM pool's pods are ready but no LLM replica is running in Ray Serve yet (replicas: {states}); "
                "a starting replica loads the model first, which can take minutes for a large checkpoint. Requests "
                "wait in the queue until one runs, or time out")))
        else:
            f.progressing.append(("VisionReplicaStarting", (
                f"the vision pool's pods are ready but no vision replica is running in Ray Serve yet (replicas: "
                f"{states}); text requests are answered, requests with images wait until one runs")))
    elif ready < desired * per:
        f.progressing.append(("Scaling", f"{label} pool: {ready // per} of {desired} replicas ready{unit}"))
    elif len(live) != want_pods or ready < want_pods:
        f.progressing.append(("Scaling", f"{label} pool: {len(live)} of {want_pods} pods, {ready} ready"
                              + (f" ({plan.reason}: {plan.message})" if plan is not None else "")))


def _api_pool_findings(pods: list[PodView], spec: models.DotsVLMDeploymentSpec, f: _Findings) -> models.ApiPoolStatus | None:
    """spec.apiPool: its pods carry the API (the Service sends requests only to them) and the tensor queue."""
    if spec.api_pool is None:
        return None
    want = spec.api_pool.replicas
    live = [p for p in pods if p.component == COMPONENT_API_POOL and not p.deleting]
    pending = [p for p in live if p.unschedulable]
    if pending:
        why = pending[0].unschedulable or ""
        hint = VOLUME_HINT if _volume_problem(why) else (
            "each API pod needs room for its CPU and memory (apiPool.resources) on a node that matches "
            "apiPool.nodeSelector and apiPool.tolerations; add such nodes or lower apiPool.resources")
        f.degraded.append(("Unschedulable", f"{len(pending)} of {len(live)} API pods pending: {_first_sentence(why)} "
                                            f"To fix: {hint}."))
    broken = [p for p in live if p.problem]
    if broken:
        f.degraded.append(("PodFailing", f"API pod {broken[0].name} cannot start: {broken[0].problem}"
                           + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else "")))
    ready = sum(p.ready for p in live)
    if ready == 0:
        f.waiting.append(("APIPodsNotReady", f"API pool: 0 of {want} pods ready (the API Service has no pod to send "
                                             f"requests to)"))
    elif ready < want:
        f.progressing.append(("Scaling", f"API pool: {ready} of {want} pods ready"))
    return models.ApiPoolStatus(pods=len(live), ready_pods=ready)


def _target(target: float, observed: float | None) -> models.SLOTargetStatus:
    return models.SLOTargetStatus(target_seconds=target,
                                  observed_p90_seconds=None if observed is None else round(observed, 4),
                                  met=None if observed is None else observed <= target)


def _last_rejection(total: int, old: models.QueueStatus | models.BackpressureStatus | None,
                    now_unix: float) -> str | None:
    """When the refusals were last seen to grow: `rejectedTotal` counts since the replicas started, so on its own
    it cannot say whether a refusal is a minute or a day old. A count that went back (the replicas restarted)
    and is not zero has refused since: that is now too."""
    before = old.rejected_total if old is not None else 0
    if total > before or (total and total < before):
        return _iso(now_unix)
    return old.last_rejection_time if old is not None else None


def _backpressure(report: AutoscalerReport, old: models.BackpressureStatus | None,
                  now_unix: float) -> models.BackpressureStatus | None:
    if report.admission is None:
        return old
    a = report.admission
    new = models.BackpressureStatus(
        vision_pending_pixels=a.pending_pixels, vision_pending_pixels_limit=a.pending_pixels_limit,
        image_bytes=a.image_bytes, image_bytes_limit=a.image_bytes_limit, rejected_total=a.rejected_total,
        rejected=dict(sorted(a.rejected.items())) or None,
        last_rejection_time=_last_rejection(a.rejected_total, old, now_unix), observed_time=_iso(now_unix))
    if old is not None and old.model_copy(update={"observed_time": None}) == new.model_copy(update={"observed_time": None}):
        return old  # same figures: no status write just for the time
    return new


def _retarget(slo: models.SLOStatus | None, spec: models.DotsVLMDeploymentSpec) -> models.SLOStatus | None:
    """Last observed latencies against the spec's targets now: a new spec.slo shows (and `met` follows it) at
    once, not only with the next report (none comes while the head is down)."""
    if slo is None:
        return None

    def again(t: models.SLOTargetStatus | None, target: float) -> models.SLOTargetStatus | None:
        if t is None or t.target_seconds == target:
            return t
        return _target(target, t.observed_p90_seconds)
    return slo.model_copy(update={"image_ttft": again(slo.image_ttft, spec.slo.image_ttft_seconds),
                                  "text_ttft": again(slo.text_ttft, spec.slo.text_ttft_seconds),
                                  "inter_token": again(slo.inter_token, spec.slo.inter_token_seconds)})


def _queue_and_slo(spec: models.DotsVLMDeploymentSpec, report: AutoscalerReport | None,
                   old: models.DotsVLMDeploymentStatus | None,
                   now_unix: float) -> tuple[models.QueueStatus | None, models.SLOStatus | None,
                                             models.BackpressureStatus | None]:
    """The queue and the observed latencies from the report; the old ones when the report is missing, or
    when they were written less than QUEUE_REFRESH_S ago (they change all the time under load)."""
    old_q, old_slo, old_bp = (old.queue, old.slo, old.backpressure) if old else (None, None, None)
    old_slo = _retarget(old_slo, spec)
    if report is None or report.error:
        return old_q, old_slo, old_bp
    if old_q is not None and old_q.observed_time:
        written = datetime.strptime(old_q.observed_time, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
        # A time ahead of now was written on another clock (an operator pod on another node before this one, or
        # before NTP stepped this clock back): it held the figures for as long as that clock was ahead.
        if 0.0 <= now_unix - written < QUEUE_REFRESH_S:
            return old_q, old_slo, old_bp
    queue = old_q
    if report.queue is not None:
        q = report.queue
        queue = models.QueueStatus(depth=q.depth, bytes=q.bytes, oldest_age_seconds=round(q.oldest_age_s, 2),
                                   waiting_producers=q.waiting_producers, max_items=q.max_items, leased=q.leased,
                                   rejected_total=q.rejected_total, redelivered_total=q.redelivered_total,
                                   last_rejection_time=_last_rejection(q.rejected_total, old_q, now_unix),
                                   observed_time=_iso(now_unix))
        if old_q is not None and old_q.model_copy(update={"observed_time": None}) == queue.model_copy(
                update={"observed_time": None}):
            queue = old_q  # same figures: no status write just for the time
    slo = old_slo
    if report.slo is not None:
        o = report.slo
        slo = models.SLOStatus(image_ttft=_target(spec.slo.image_ttft_seconds, o.ttft_image_p90_s),
                               text_ttft=_target(spec.slo.text_ttft_seconds, o.ttft_text_p90_s),
                               inter_token=_target(spec.slo.inter_token_seconds, o.inter_token_p90_s),
                               encode_latency_p90_seconds=None if o.encode_latency_p90_s is None
                               else round(o.encode_latency_p90_s, 4))
    return queue, slo, _backpressure(report, old_bp, now_unix)


def _autoscaler_status(report: AutoscalerReport | None) -> models.AutoscalerStatus | None:
    if report is None:
        return None
    if report.error:
        return models.AutoscalerStatus(reachable=False, url=report.url or None, message=(
            f"{report.error}; the pool sizes, queue and latencies below may be out of date (the operator keeps "
            f"the pools at Serve's target and retries)")[:1000])
    pools = sorted((report.decisions or {}).keys())
    return models.AutoscalerStatus(reachable=True, url=report.url or None, message=(
        f"decisions for {', '.join(pools)}" if pools else "no decision yet (the policy decides within a few seconds of the application starting)"))


RECONCILE_FAILED = "ReconcileFailed"


def monitoring_notes(spec: models.DotsVLMDeploymentSpec, installed: dict[str, bool]) -> list[str]:
    """What spec.monitoring asks for that the operator cannot make: monitoring.prometheusRule without the
    PrometheusRule CRD did nothing and said nothing (no alerts loaded, and no one told). A PodMonitor has its
    documented stand-in (scrape annotations on the pods)."""
    if spec.monitoring.enabled and spec.monitoring.prometheus_rule and not installed.get("PrometheusRule"):
        return ["monitoring.prometheusRule is true but the PrometheusRule CRD (Prometheus Operator) is not installed, "
                "or the operator may not read CRDs: no alert rules were created for this deployment; install the "
                "CRD (it is found within 5 minutes) or load the alerts another way (the Helm chart's prometheusRule)"]
    return []


def refused_message(refused: list[str]) -> str:
    """Degraded=ReconcileFailed's message for children the API server refused (each 'Kind name: its words')."""
    return f"the operator could not reconcile this resource and will retry: {'; '.join(refused)}"[:2000]


def _autoscaler_not_asked(old: models.AutoscalerStatus | None,
                          serve: ServeObservation | None) -> models.AutoscalerStatus | None:
    """The ingress is asked only while the Serve application runs: otherwise say so, rather than keep an old
    `reachable: true` (the figures below are the last ones read, while the head is down or redeploying)."""
    if old is None or not old.reachable:
        return old
    why = ("the Ray head pod is not ready" if serve is None else "the Ray head does not answer" if not serve.reachable
           else f"the Serve application is {serve.status}")
    return models.AutoscalerStatus(reachable=False, url=old.url, message=(
        f"not read while {why}; the pool sizes, queue and latencies below are the last ones read"))


def _condition(type_: str, status: bool, reason: str, message: str, generation: int | None,
               old: dict[str, models.Condition], now: str) -> models.Condition:
    s = "True" if status else "False"
    prev = old.get(type_)
    since = prev.last_transition_time if prev is not None and prev.status == s and prev.last_transition_time else now
    return models.Condition(type=type_, status=s, reason=reason, message=message, last_transition_time=since,
                            observed_generation=generation)


def compute_status(*, spec: models.DotsVLMDeploymentSpec, generation: int | None, pods: list[PodView],
                   desired: dict[str, int], serve: ServeObservation | None, endpoint: str,
                   old: models.DotsVLMDeploymentStatus | None, now: str,
                   plans: dict[str, PoolPlan] | None = None, report: AutoscalerReport | None = None,
                   now_unix: float | None = None, rollout: str | None = None,
                   redis_state: models.RedisStateStatus | None = None,
                   refused: list[str] | None = None, notes: list[str] | None = None,
                   ) -> tuple[models.DotsVLMDeploymentStatus, list[Transition]]:
    """The status for the observed world, and the condition changes since `old`.

    `serve` is None when the head was not asked (its pod is not ready yet). `desired`: replicas per pool
    (Serve's target, or the spec's minimum until Serve answers); `plans`: the pods per pool
    (pod_sizing); `report`: the autoscaler's report from the ingress (None: not asked); `rollout`: how a
    new image is rolling (None: it is not); `redis_state`: where the head keeps the Ray state in Redis
    (handlers._redis_state); `refused`: the children the API server refused in this pass, each with its words
    (the others were applied, and the pass went on); `notes`: more for Ready's message (`monitoring_notes`)."""
    plans = plans or {}
    now_unix = now_unix if now_unix is not None else datetime.strptime(now, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    f = _Findings(notes=list(notes or []))
    if refused:
        f.degraded.append((RECONCILE_FAILED, refused_message(refused)))
    head_pods = [p for p in pods if p.component == COMPONENT_HEAD and not p.deleting]
    if any(p.unschedulable for p in head_pods):
        p = next(p for p in head_pods if p.unschedulable)
        why = p.unschedulable or ""
        hint = VOLUME_HINT if _volume_problem(why) else "check head.nodeSelector, head.tolerations and head.resources"
        f.degraded.append(("Unschedulable", f"the Ray head pod is pending: {_first_sentence(why)} To fix: {hint}."))
    if any(p.problem for p in head_pods):
        p = next(p for p in head_pods if p.problem)
        f.degraded.append(("PodFailing", f"the Ray head pod {p.name} cannot start: {p.problem}"))
    if not any(p.ready for p in head_pods):
        f.waiting.append(("HeadNotReady", "the Ray head pod is not ready yet"))
    _pool_findings(COMPONENT_VISION, pods, desired[COMPONENT_VISION], spec, plans.get(COMPONENT_VISION), f,
                   serve_deployment(serve, COMPONENT_VISION))
    _pool_findings(COMPONENT_LLM, pods, desired[COMPONENT_LLM], spec, plans.get(COMPONENT_LLM), f,
                   serve_deployment(serve, COMPONENT_LLM))
    api_pool = _api_pool_findings(pods, spec, f)

    serve_status = models.ServeAppStatus()
    if serve is not None:
        serve_status = models.ServeAppStatus(status=serve.status, message=serve.message[:1000], config_hash=serve.config_hash)
        if serve.drift:
            serve_status.last_drift = (f"the head ran a Serve config that differs from the spec ({serve.drift}); "
                                       f"the operator deployed the spec's config again")[:1000]
            serve_status.last_drift_time = now

        if not serve.reachable:
            f.waiting.append(("RayHeadUnreachable", f"cannot reach the Ray head's dashboard at {serve.url}: {serve.message}"))
        elif serve.status in SERVE_FAILED:
            f.degraded.append(("ServeAppFailed", f"Ray Serve application is {serve.status}: {serve.message[:500]}"))
            f.waiting.append(("ServeAppNotRunning", f"Ray Serve application is {serve.status}"))
        elif serve.status != "RUNNING":
            f.waiting.append(("ServeAppNotRunning", f"Ray Serve application is {serve.status}"
                                                    + (f": {serve.message[:300]}" if serve.message else "")))
    elif head_pods and any(p.ready for p in head_pods):
        f.waiting.append(("ServeAppNotDeployed", "the Serve application has not been deployed yet"))
    if serve_status.last_drift is None and old is not None:
        serve_status.last_drift, serve_status.last_drift_time = old.serve_app.last_drift, old.serve_app.last_drift_time
    olds = {c.type: c for c in (old.conditions if old else [])}
    # A pool held at zero by its spec is not moving: it is Progressing only when something else is.
    moving = ([(ROLLING_OUT, rollout)] if rollout else []) + [w for w in f.waiting if w[0] != NO_LLM_REPLICA] + f.progressing
    if moving:
        progressing = _condition("Progressing", True, moving[0][0], "; ".join(w for _, w in moving) + ".",
                                 generation, olds, now)
    else:
        progressing = _condition("Progressing", False, "UpToDate",
                                 "every pool is at its desired size and the Serve application is RUNNING.", generation, olds, now)
    if f.waiting:
        ready = _condition("Ready", False, f.waiting[0][0], "waiting for: " + "; ".join(w for _, w in f.waiting) + ".",
                           generation, olds, now)
    else:
        ready = _condition("Ready", True, "Available", f"the API answers at {endpoint}."
                           + "".join(f" Note: {n}." for n in f.notes), generation, olds, now)
    if f.degraded:
        degraded = _condition("Degraded", True, f.degraded[0][0], " ".join(d for _, d in f.degraded), generation, olds, now)
    else:
        degraded = _condition("Degraded", False, "AsExpected", "no problem found.", generation, olds, now)
    conditions = [ready, progressing, degraded]

    transitions: list[Transition] = []
    for c in conditions:
        prev = olds.get(c.type)
        if prev is not None and prev.status == c.status and prev.reason == c.reason:
            continue
        warning = (c.type == "Degraded" and c.status == "True") or (c.type == "Ready" and prev is not None
                                                                    and prev.status == "True" and c.status == "False")
        if prev is None and c.type == "Degraded" and not warning:
            continue  # a new resource with no problem: nothing to tell
        if c.type == "Progressing" and any(t.type == "Ready" and t.reason == c.reason for t in transitions):
            continue  # the Ready Event just said it, with the same reason and words
        transitions.append(Transition(c.type, c.status, c.reason, c.message, warning))

    queue, slo, backpressure = _queue_and_slo(spec, report, old, now_unix)
    status = models.DotsVLMDeploymentStatus(
        observed_generation=generation,
        conditions=conditions,
        vision=_pool_status(COMPONENT_VISION, pods, desired[COMPONENT_VISION], 1, serve_deployment(serve, COMPONENT_VISION),
                            plans.get(COMPONENT_VISION), pool_decision(report, COMPONENT_VISION), old.vision if old else None),
        llm=_pool_status(COMPONENT_LLM, pods, desired[COMPONENT_LLM], spec.llm.nodes_per_replica,
                         serve_deployment(serve, COMPONENT_LLM), plans.get(COMPONENT_LLM),
                         pool_decision(report, COMPONENT_LLM), old.llm if old else None),
        api_pool=api_pool,
        serve_app=serve_status,
        queue=queue,
        backpressure=backpressure,
        slo=slo,
        autoscaler=_autoscaler_status(report) if report is not None else _autoscaler_not_asked(
            old.autoscaler if old else None, serve),
        endpoint=endpoint,
        redis_state=redis_state,
    )
    return status, transitions


@dataclass(frozen=True)
class ScalingEvent:
    """A change of a pool's desired replicas, worth a Kubernetes Event (reason = the policy's reason)."""

    pool: str
    reason: str
    message: str


def scaling_events(old: models.DotsVLMDeploymentStatus | None, new: models.DotsVLMDeploymentStatus,
                   report: AutoscalerReport | None, serve_known: dict[str, bool]) -> list[ScalingEvent]:
    """One event per pool whose desired replicas (Serve's target) changed since `old`; only when Serve's
    target is known now (a fallback to the spec's minimum is no decision)."""
    out = []
    for pool in (COMPONENT_VISION, COMPONENT_LLM):
        before = getattr(old, pool).desired_replicas if old is not None else None
        after = getattr(new, pool).desired_replicas
        if before is None or before == after or not serve_known.get(pool):
            continue
        label = "LLM" if pool == COMPONENT_LLM else "vision"
        d = pool_decision(report, pool)
        reason, why = "ServeTargetChanged", "Ray Serve changed the target (the autoscaler's report was not available)"
        if d is not None:
            lc = d.last_change
            if d.desired == after and lc is not None and lc.reason and lc.reason not in ("Stable", "Stabilizing"):
                reason, why = lc.reason, lc.message or ""
            else:
                reason, why = d.reason, d.message
        out.append(ScalingEvent(pool, reason, f"{label} pool: {before} -> {after} replicas: {why}"[:1000]))
    return out
