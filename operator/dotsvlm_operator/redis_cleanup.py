"""Removing a deployment's Ray state from Redis (spec.head.gcsFaultTolerance), which Ray never does.

Two moments leave keys behind in the external Redis, and the operator removes them with a Job
(`dotsvlm cleanup-redis`, builders.redis_cleanup_job) in both:
- **The resource is deleted.** Every child goes with the resource (ownerReferences); the keys do not. As
  KubeRay does, the deletion first stops the head (its GCS would write them again), then runs the Job
  `<name>-redis-cleanup`, deletes it once it finished and lets the resource go (`next_step`).
- **The state moved**: a new `redisAddress` or `storageNamespace`, or fault tolerance turned off. The new head
  starts elsewhere; the old location is emptied once no head pod uses it any more, by the Job
  `<name>-redis-cleanup-prev` (`previous_step`). `status.redisState` remembers where the head keeps
  the state, so the operator knows the old location after the spec changed.
A cleanup that fails or takes too long never blocks anything: it is said in a Warning Event with the command
that removes the keys by hand.

`next_step` and `previous_step` are the pure decisions; the handlers (handlers.remove_redis_state,
handlers._redis_state) read the objects, act and ask again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from dotsvlm_operator import models
from dotsvlm_operator.naming import REDIS_PASSWORD_ENV

# From the first attempt: the head's stop (its drain may take the head's termination grace period) and the Job.
CLEANUP_TIMEOUT_S = 900.0

# "record" (after a move): nothing to remove, status.redisState takes the spec's place.
Action = Literal["stop_head", "wait", "run_job", "done", "give_up", "record"]


@dataclass(frozen=True)
class Step:
    action: Action
    message: str


def storage_namespace(ft: models.GcsFaultTolerance, uid: str) -> str:
    return ft.storage_namespace or uid


def location(ft: models.GcsFaultTolerance | None, uid: str) -> models.RedisStateStatus | None:
    """Where a head with these settings keeps the Ray state (None: no fault tolerance, nothing in Redis)."""
    if ft is None:
        return None
    return models.RedisStateStatus(redis_address=ft.redis_address, storage_namespace=storage_namespace(ft, uid),
                                   password_secret_ref=ft.password_secret_ref)


def settings(loc: models.RedisPlace) -> models.GcsFaultTolerance:
    """The fault-tolerance settings that reach `loc` (a Job's Redis environment is built from these)."""
    return models.GcsFaultTolerance(redis_address=loc.redis_address, storage_namespace=loc.storage_namespace,
                                    password_secret_ref=loc.password_secret_ref)


def same_place(a: models.RedisPlace | None, b: models.RedisPlace | None) -> bool:
    """The same keys: one Redis, one namespace (a new password Secret for the same Redis moves nothing)."""
    return a is not None and b is not None and (a.redis_address, a.storage_namespace) == (b.redis_address, b.storage_namespace)


def moved(recorded: models.RedisStateStatus | None, wanted: models.RedisStateStatus | None) -> bool:
    """Whether the keys at `recorded` (status.redisState) are left to remove: the spec's place is another one."""
    return recorded is not None and not same_place(recorded, wanted)


def place_label(loc: models.RedisStateStatus) -> str:
    """`loc` as one annotation value: the Job that cleans it says which place it cleans."""
    return f"{loc.redis_address}/{loc.storage_namespace}"


def _where(ft: models.GcsFaultTolerance, uid: str) -> str:
    return f"the Ray state (storage namespace {storage_namespace(ft, uid)!r}) in Redis at {ft.redis_address}"


def manual_command(ft: models.GcsFaultTolerance, uid: str) -> str:
    host, _, port = ft.redis_address.rpartition(":")
    auth = " -a <password>" if ft.password_secret_ref is not None else ""
    cli = f"redis-cli -h {host} -p {port}{auth}"
    return f"{cli} --scan --pattern 'RAY{storage_namespace(ft, uid)}@*' | xargs {cli} del"


def place_of(pod: dict[str, Any]) -> models.RedisStateStatus | None:
    """Where this head pod's Ray keeps (or may still write) its state: its env says so (builders._redis_env)."""
    for c in (pod.get("spec") or {}).get("containers") or []:
        env = {e.get("name"): e for e in c.get("env") or []}
        address = (env.get("RAY_REDIS_ADDRESS") or {}).get("value")
        namespace = (env.get("RAY_external_storage_namespace") or {}).get("value")
        if address and namespace:
            ref = ((env.get(REDIS_PASSWORD_ENV) or {}).get("valueFrom") or {}).get("secretKeyRef")
            return models.RedisStateStatus(redis_address=address, storage_namespace=namespace,
                                           password_secret_ref=ref)
    return None


def head_uses(pod: dict[str, Any], loc: models.RedisStateStatus) -> bool:
    return same_place(place_of(pod), loc)


def with_pending(recorded: models.RedisStateStatus, wanted: models.RedisPlace | None,
                 head_pods: list[dict[str, Any]]) -> models.RedisStateStatus:
    """`recorded` (a previous place being emptied), with every third place a head pod uses now added to its
    `pending` list: the spec moved again meanwhile (L1 -> L2 -> L3), and L2's keys must be emptied too, even
    if its head pod is gone by the time L1's cleanup ends."""
    pending = list(recorded.pending or [])
    for pod in head_pods:
        loc = place_of(pod)
        if loc is None or same_place(loc, wanted) or same_place(loc, recorded) or any(same_place(loc, p) for p in pending):
            continue
        pending.append(models.RedisPlace.model_validate(loc.model_dump(include={"redis_address", "storage_namespace",
                                                                                 "password_secret_ref"})))
    return recorded.model_copy(update={"pending": pending or None})


def after_cleanup(recorded: models.RedisStateStatus, wanted: models.RedisStateStatus | None) -> models.RedisStateStatus | None:
    """What status.redisState records once `recorded` was emptied (or given up): the next pending place that is
    not the spec's, keeping the rest pending, or else the spec's place."""
    rest = [p for p in recorded.pending or [] if not same_place(p, wanted)]
    if not rest:
        return wanted
    return models.RedisStateStatus.model_validate({**rest[0].model_dump(), "pending": rest[1:] or None})


def _job_state(job: dict[str, Any]) -> Literal["succeeded", "failed", "running"]:
    st = job.get("status") or {}
    conds = {c.get("type") for c in st.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in conds or int(st.get("succeeded") or 0) > 0:
        return "succeeded"
    if "Failed" in conds:
        return "failed"
    return "running"


def job_age_s(job: dict[str, Any], now_unix: float) -> float:
    created = (job.get("metadata") or {}).get("creationTimestamp")
    if not created:
        return 0.0
    return now_unix - datetime.fromisoformat(created.replace("Z", "+00:00")).timestamp()


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


def _ended(job: dict[str, Any], job_pods: list[dict[str, Any]], done: str,
           give_up_with: Callable[[str], Step]) -> Step | None:
    """A finished cleanup Job's step ("done", or "give_up" quoting why it failed); None while it runs."""
    state = _job_state(job)
    if state == "succeeded":
        return Step("done", done)
    if state == "failed":
        return give_up_with(f"the cleanup Job failed: {job_failure(job, job_pods)}")
    return None


def next_step(ft: models.GcsFaultTolerance, uid: str, *, head_deployment: bool, head_pods: int,
              job: dict[str, Any] | None, job_pods: list[dict[str, Any]], elapsed_s: float) -> Step:
    where = _where(ft, uid)
    if job is not None and (end := _ended(job, job_pods, f"removed {where}", lambda why: give_up(ft, uid, why))):
        return end
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


def previous_step(recorded: models.RedisStateStatus | None, wanted: models.RedisStateStatus | None, uid: str, *,
                  head_uses_recorded: bool, job: dict[str, Any] | None, job_pods: list[dict[str, Any]],
                  job_age_s: float) -> Step:
    """After the spec moved the Ray state (a new address or storage namespace, or fault tolerance off): remove
    the keys at the place the head used before (`recorded`, from status.redisState) once no head pod uses it.
    "record": nothing to remove, status.redisState becomes `wanted`; "done" / "give_up" likewise, after the Job."""
    if not moved(recorded, wanted):
        return Step("record", "")
    assert recorded is not None
    old = settings(recorded)
    where = _where(old, uid)
    now = ("fault tolerance is off now" if wanted is None else
           f"the head keeps it in storage namespace {wanted.storage_namespace!r} at {wanted.redis_address} now")
    if job is not None:
        if end := _ended(job, job_pods, f"removed {where}: {now}", lambda why: give_up_previous(recorded, uid, why)):
            return end
        if job_age_s > CLEANUP_TIMEOUT_S:
            return give_up_previous(recorded, uid, f"the cleanup Job did not finish within {CLEANUP_TIMEOUT_S:.0f} s "
                                                   "(kubectl describe job shows why: no node for its pod?)")
        return Step("wait", f"waiting for the Job that removes {where} ({now})")
    if head_uses_recorded:
        return Step("wait", f"{now}; {where} will be removed once no Ray head pod uses it")
    return Step("run_job", f"removing {where}, {now} (Job `dotsvlm cleanup-redis`)")


def give_up_previous(recorded: models.RedisPlace, uid: str, reason: str) -> Step:
    old = settings(recorded)
    return Step("give_up", f"{_where(old, uid)} was not removed: {reason}. Remove the keys by hand: "
                           f"{manual_command(old, uid)}")
