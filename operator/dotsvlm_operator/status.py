"""Pure status computation: what the pods and the Ray head say -> conditions a person can act on.

`compute_status` takes plain observations (pods reduced to `PodView`, the Serve application as a
`ServeObservation`) and returns the new status plus the condition transitions worth an Event. The
kopf handlers only gather the observations and write the result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from dotsvlm_operator import models
from dotsvlm_operator.naming import COMPONENT_HEAD, COMPONENT_LLM, COMPONENT_VISION, LABEL_COMPONENT

# Container waiting reasons that will not fix themselves: the deployment is Degraded until someone acts.
BAD_WAITING_REASONS = {"CrashLoopBackOff", "ImagePullBackOff", "ErrImagePull", "InvalidImageName",
                       "CreateContainerConfigError", "CreateContainerError", "RunContainerError"}
SERVE_FAILED = {"DEPLOY_FAILED", "UNHEALTHY"}


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
            problem = f"{waiting['reason']}: {waiting.get('message') or 'see kubectl describe pod'}"
            break
    return PodView(
        name=meta.get("name", "?"),
        component=(meta.get("labels") or {}).get(LABEL_COMPONENT, ""),
        ready=ready,
        scheduled=sched.get("status") == "True" or bool((pod.get("spec") or {}).get("nodeName")),
        unschedulable=unschedulable,
        problem=problem,
        deleting=bool(meta.get("deletionTimestamp")),
    )


@dataclass(frozen=True)
class ServeObservation:
    """What the Ray head said about the Serve application (or why it could not be asked)."""

    url: str
    reachable: bool
    status: str = "Unknown"  # RUNNING, DEPLOYING, DEPLOY_FAILED, UNHEALTHY, NOT_STARTED, or Unknown
    message: str = ""
    config_hash: str | None = None


@dataclass(frozen=True)
class Transition:
    """A condition that changed status or reason: worth a Kubernetes Event."""

    type: str
    status: str
    reason: str
    message: str
    warning: bool


@dataclass
class _Findings:
    waiting: list[tuple[str, str]] = field(default_factory=list)  # (reason, message)
    degraded: list[tuple[str, str]] = field(default_factory=list)


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


def _pool_status(pool: str, pods: list[PodView], desired: int, per_replica: int) -> models.PoolStatus:
    live = [p for p in pods if p.component == pool and not p.deleting]
    ready_pods = sum(p.ready for p in live)
    ready = ready_pods // per_replica
    return models.PoolStatus(replicas=len(live) // per_replica, ready_replicas=min(ready, desired), desired_replicas=desired,
                             pods=len(live), ready_pods=ready_pods, ready_of_desired=f"{min(ready, desired)}/{desired}")


def _pool_findings(pool: str, pods: list[PodView], desired: int, spec: models.DotsVLMDeploymentSpec,
                   f: _Findings) -> None:
    live = [p for p in pods if p.component == pool and not p.deleting]
    per = spec.llm.nodes_per_replica if pool == COMPONENT_LLM else 1
    want_pods = desired * per
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
    if ready < want_pods or len(live) != want_pods:
        unit = f" ({ready} of {want_pods} pods)" if per > 1 else ""
        f.waiting.append(("PodsNotReady", f"{label} pool: {ready // per} of {desired} replicas ready{unit}"))


def _condition(type_: str, status: bool, reason: str, message: str, generation: int | None,
               old: dict[str, models.Condition], now: str) -> models.Condition:
    s = "True" if status else "False"
    prev = old.get(type_)
    since = prev.last_transition_time if prev is not None and prev.status == s and prev.last_transition_time else now
    return models.Condition(type=type_, status=s, reason=reason, message=message, last_transition_time=since,
                            observed_generation=generation)


def compute_status(*, spec: models.DotsVLMDeploymentSpec, generation: int | None, pods: list[PodView],
                   desired: dict[str, int], serve: ServeObservation | None, endpoint: str,
                   old: models.DotsVLMDeploymentStatus | None, now: str) -> tuple[models.DotsVLMDeploymentStatus, list[Transition]]:
    """The status for the observed world, and the condition changes since `old`.

    `serve` is None when the head was not asked (its pod is not ready yet)."""
    f = _Findings()
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
    _pool_findings(COMPONENT_VISION, pods, desired[COMPONENT_VISION], spec, f)
    _pool_findings(COMPONENT_LLM, pods, desired[COMPONENT_LLM], spec, f)

    serve_status = models.ServeAppStatus()
    if serve is not None:
        serve_status = models.ServeAppStatus(status=serve.status, message=serve.message[:1000], config_hash=serve.config_hash)
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

    olds = {c.type: c for c in (old.conditions if old else [])}
    if f.waiting:
        progressing = _condition("Progressing", True, f.waiting[0][0], "; ".join(w for _, w in f.waiting) + ".",
                                 generation, olds, now)
        ready = _condition("Ready", False, f.waiting[0][0], "waiting for: " + "; ".join(w for _, w in f.waiting) + ".",
                           generation, olds, now)
    else:
        progressing = _condition("Progressing", False, "UpToDate",
                                 "every pool is at its desired size and the Serve application is RUNNING.", generation, olds, now)
        ready = _condition("Ready", True, "Available", f"the API answers at {endpoint}.", generation, olds, now)
    if f.degraded:
        degraded = _condition("Degraded", True, f.degraded[0][0], " ".join(d for _, d in f.degraded), generation, olds, now)
    else:
        degraded = _condition("Degraded", False, "AsExpected", "no problem found.", generation, olds, now)
    conditions = [ready, progressing, degraded]

    transitions = []
    for c in conditions:
        prev = olds.get(c.type)
        if prev is None or prev.status != c.status or prev.reason != c.reason:
            warning = (c.type == "Degraded" and c.status == "True") or (c.type == "Ready" and prev is not None
                                                                        and prev.status == "True" and c.status == "False")
            transitions.append(Transition(c.type, c.status, c.reason, c.message, warning))

    status = models.DotsVLMDeploymentStatus(
        observed_generation=generation,
        conditions=conditions,
        vision=_pool_status(COMPONENT_VISION, pods, desired[COMPONENT_VISION], 1),
        llm=_pool_status(COMPONENT_LLM, pods, desired[COMPONENT_LLM], spec.llm.nodes_per_replica),
        serve_app=serve_status,
        endpoint=endpoint,
    )
    return status, transitions
