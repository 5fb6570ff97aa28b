"""What the operator does when a DotsVLMDeployment is deleted: remove its Ray state from Redis.

Every child goes with the resource (ownerReferences). One thing outside Kubernetes does not: with
`spec.head.gcsFaultTolerance` the Ray head keeps its tables in an external Redis, and Ray never removes
them. As KubeRay does, the deletion first stops the head (its GCS would write them again), then runs a Job
(`dotsvlm cleanup-redis`, builders.redis_cleanup_job), deletes the Job once it finished and lets the resource go. A cleanup
that fails or takes too long never keeps the resource from being deleted: it is said in a Warning Event
with the command that removes the keys by hand.

`next_step` is the pure decision; the kopf handler (handlers.remove_redis_state) reads the objects, acts
and asks again.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from dotsvlm_operator import models

# From the first attempt: the head's stop (its drain may take the head's termination grace period) and the Job.
CLEANUP_TIMEOUT_S = 900.0

Action = Literal["stop_head", "wait", "run_job", "done", "give_up"]


@dataclass(frozen=True)
class Step:
    action: Action
    message: str


def storage_namespace(ft: models.GcsFaultTolerance, uid: str) -> str:
    return ft.storage_namespace or uid


def _where(ft: models.GcsFaultTolerance, uid: str) -> str:
    return f"the Ray state (storage namespace {storage_namespace(ft, uid)!r}) in Redis at {ft.redis_address}"


def manual_command(ft: models.GcsFaultTolerance, uid: str) -> str:
    host, _, port = ft.redis_address.rpartition(":")
    auth = " -a <password>" if ft.password_secret_ref is not None else ""
    cli = f"redis-cli -h {host} -p {port}{auth}"
    return f"{cli} --scan --pattern 'RAY{storage_namespace(ft, uid)}@*' | xargs {cli} del"


def _job_state(job: dict[str, Any]) -> Literal["succeeded", "failed", "running"]:
    st = job.get("status") or {}
    conds = {c.get("type") for c in st.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conds or int(st.get("succeeded") or 0) > 0:
        return "succeeded"
    if "Failed" in conds:
        return "failed"
    return "running"


def job_failure(job: dict[str, Any], pods: list[dict[str, Any]]) -> str:
    """Why the cleanup Job failed: the last pod's termination message (its last log line, e.g. Redis's
    WRONGPASS), else the Job's own condition."""
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "", reverse=True):
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            text = (((cs.get("state") or {}).get("terminated") or {}).get("message") or "").strip()
            if text:
                return text.splitlines()[-1][:500]
    for c in (job.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Failed" and c.get("status") == "True":
            return f"{c.get('reason') or 'Failed'}: {c.get('message') or 'no message'}"
    return "no reason given"


def next_step(ft: models.GcsFaultTolerance, uid: str, *, head_deployment: bool, head_pods: int,
              job: dict[str, Any] | None, job_pods: list[dict[str, Any]], elapsed_s: float) -> Step:
    where = _where(ft, uid)
    if job is not None:
        state = _job_state(job)
        if state == "succeeded":
            return Step("done", f"removed {where}")
        if state == "failed":
            return give_up(ft, uid, f"the cleanup Job failed: {job_failure(job, job_pods)}")
    if elapsed_s > CLEANUP_TIMEOUT_S:
        doing = ("the Ray head pod did not stop" if head_deployment or head_pods else
                 "the cleanup Job did not finish (kubectl describe job shows why: no node for its pod?)")
        return give_up(ft, uid, f"{doing} within {CLEANUP_TIMEOUT_S:.0f} s")
    if head_deployment:
        return Step("stop_head", f"stopping the Ray head before removing {where}")
    if head_pods:
        return Step("wait", f"waiting for the Ray head pod to stop before removing {where}")
    if job is None:
        return Step("run_job", f"removing {where} (Job `dotsvlm cleanup-redis`)")
    return Step("wait", f"waiting for the Job that removes {where}")


def give_up(ft: models.GcsFaultTolerance, uid: str, reason: str) -> Step:
    """Leave the keys (the Job failed, took too long, or cannot be created because its namespace is being
    deleted): never hold the deletion; say why and how to finish by hand."""
    return Step("give_up", f"{_where(ft, uid)} was not removed: {reason}. The resource is deleted anyway; remove "
                           f"the keys by hand: {manual_command(ft, uid)}")
