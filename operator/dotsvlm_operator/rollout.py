"""Pure: a change to the Ray pod templates rolls one group at a time (vision pool, then LLM pool, then head).

A new `spec.image` (or pull secrets, scrape annotations, an operator upgrade that builds the pods another
way) changes every Ray pod template at once, so Kubernetes would replace the vision and LLM pools (and
the head) together: both pools short of a pod at the same time, the head's restart on top. Instead the
operator gives each group its new template only when the group before it has finished its rollout
(every pod updated and available): the vision pool first (it is cheap to restart and requests with
images only wait), then the LLM pool, then the API pool (spec.apiPool, if any), then the head. Each pool's pods drain as they stop
(`dotsvlm drain-node`), one at a time (the Deployments' maxUnavailable 1, maxSurge 0).

A change that comes while a group before it is short of a pod, or a group after it still replaces old pods for
the change before, waits for it, in the same order: the vision pool took a new image at once while the LLM pool
still replaced pods for the previous one, two pools short of a pod together. The exceptions are groups whose
rollout has stalled (Kubernetes' `ProgressDeadlineExceeded`: a broken image, or a pod that never schedules):
one whose template changed again takes the new one at once, since it could never finish the old one and is
short of a pod anyway (the groups before it wait for it); one whose template stays holds no group before it
(waiting would never end). Nor does a later group with no old pod left (a scale-up's pod, or a fresh
deployment's pods loading their weights or failing: Kubernetes never marks a scale-up stalled).

A group that waits keeps the template it runs: each Ray Deployment carries the template the operator last
applied (`naming.ANNOTATION_POD_TEMPLATE`), so the plan survives an operator restart. A new Ray token is
the exception: Ray pods with another token cannot join the head, so every group takes it at once. So does
every change under `spec.rolloutStrategy: AllAtOnce`, the way to a new Ray version (Ray refuses nodes of
another version: one group at a time, the first new vision pod could not join the old head).

The head goes last because its restart restarts Ray itself (the GCS): every Serve replica and request
of the deployment goes with it, and the pools' Ray processes rejoin the new head.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

from dotsvlm_operator import naming

# The groups in the order they take a new template (the API pool only where the spec has one).
ORDER = (naming.COMPONENT_VISION, naming.COMPONENT_LLM, naming.COMPONENT_API_POOL, naming.COMPONENT_HEAD)
_LABEL = {naming.COMPONENT_VISION: "vision pool", naming.COMPONENT_LLM: "LLM pool",
          naming.COMPONENT_API_POOL: "API pool", naming.COMPONENT_HEAD: "Ray head"}


def _template_json(template: dict[str, Any]) -> str:
    return json.dumps(template, sort_keys=True, separators=(",", ":"))


def with_template(dep: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """A built Deployment that runs `template`, recording it in the annotation the next plan reads."""
    out = copy.deepcopy(dep)
    out["spec"]["template"] = copy.deepcopy(template)
    out["metadata"].setdefault("annotations", {})[naming.ANNOTATION_POD_TEMPLATE] = _template_json(template)
    return out


def applied_template(dep: dict[str, Any] | None) -> dict[str, Any] | None:
    """The pod template the operator last applied to a live Deployment (None: unknown, e.g. made by an
    operator version before this annotation, or edited by hand into something that is not JSON)."""
    raw = (((dep or {}).get("metadata") or {}).get("annotations") or {}).get(naming.ANNOTATION_POD_TEMPLATE)
    try:
        got = json.loads(raw) if raw else None
    except ValueError:
        return None
    return got if isinstance(got, dict) else None


def template_image(template: dict[str, Any] | None) -> str | None:
    """The image of a pod template's `ray` container."""
    containers = ((template or {}).get("spec") or {}).get("containers") or []
    return next((c.get("image") for c in containers if c.get("name") == "ray"), None)


def _token(template: dict[str, Any] | None) -> str | None:
    return (((template or {}).get("metadata") or {}).get("annotations") or {}).get(naming.ANNOTATION_TOKEN_HASH)


def rollout_progress(dep: dict[str, Any]) -> tuple[bool, str]:
    """Whether a Deployment's rollout is complete (as `kubectl rollout status` decides it: the controller
    saw the latest template, every pod is updated and available, no old pod is left), and how far it is."""
    meta, spec, st = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
    want = int(spec.get("replicas", 1))
    updated, total, available = (int(st.get(k) or 0) for k in ("updatedReplicas", "replicas", "availableReplicas"))
    seen = int(st.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    done = seen and updated == want and total == want and available == want
    return done, f"{updated} of {want} pods updated, {available} available" + ("" if total <= want else f", {total - want} old left")


def _stalled(dep: dict[str, Any]) -> bool:
    """Whether Kubernetes gave up on the Deployment's rollout (condition Progressing=False with reason
    ProgressDeadlineExceeded: no progress for spec.progressDeadlineSeconds, 10 minutes by default; a pod
    that crashes or never schedules). Such a rollout does not finish by waiting."""
    conditions = (dep.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Progressing" and c.get("status") == "False"
               and c.get("reason") == "ProgressDeadlineExceeded" for c in conditions)


def _old_pods_left(dep: dict[str, Any]) -> bool:
    st = dep.get("status") or {}
    return int(st.get("replicas") or 0) > int(st.get("updatedReplicas") or 0)


def _only_scaling(dep: dict[str, Any]) -> bool:
    """Whether Kubernetes finished the Deployment's last rollout (it saw its latest spec, no old pod is left, and
    its condition Progressing=True has the reason NewReplicaSetAvailable): the pods it is short of now come from
    a scale-up (the autoscaler asked for a pod no node can take yet) or were lost since. Kubernetes never marks
    those stalled (it estimates progress only during a rollout: kubernetes/kubernetes#106054), so waiting for
    them may never end."""
    meta, st = dep.get("metadata") or {}, dep.get("status") or {}
    seen = int(st.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    complete = any(c.get("type") == "Progressing" and c.get("status") == "True"
                   and c.get("reason") == "NewReplicaSetAvailable" for c in st.get("conditions") or [])
    return seen and complete and not _old_pods_left(dep)


@dataclass(frozen=True)
class TemplatePlan:
    """The pod template each group gets now, and what a person should know while it rolls."""

    templates: dict[str, dict[str, Any]]
    message: str | None = None  # None: no rollout in progress

    @property
    def rolling(self) -> bool:
        return self.message is not None

    @property
    def images(self) -> dict[str, str | None]:
        return {group: template_image(t) for group, t in self.templates.items()}


def plan_templates(desired: dict[str, dict[str, Any]], live: dict[str, dict[str, Any] | None], *,
                   all_at_once: bool = False) -> TemplatePlan:
    """`desired[group]` (the template the spec builds) for every group that already runs it or whose turn
    it is; the template it runs for a group that waits. A changed group waits while a group before it has
    not finished its rollout, or while a group after it has not (a change during a rollout: it would be a
    second group short of a pod); a group whose own stalled rollout the change supersedes does not wait.
    `live`: the groups' Deployments as the API server has them (None: not created yet; it starts with its
    desired template; one without the annotation, made by an older operator, takes its desired one at
    once). `all_at_once` (spec.rolloutStrategy AllAtOnce, for a new Ray version): no group waits."""
    order = [group for group in ORDER if group in desired]
    currents = {group: applied_template(live.get(group)) for group in order}
    token_changed = any(_token(currents[g]) not in (None, _token(desired[g])) for g in order if currents[g])
    # The groups' Deployments whose rollout the plan follows (live, template known), and how far each is.
    known = {g: dep for g in order if (dep := live.get(g)) is not None and currents[g] is not None}
    progress = {g: rollout_progress(dep) for g, dep in known.items()}

    def holds_earlier(g: str) -> bool:
        """Whether group `g`, not finished, holds a change of a group before it. Not when its rollout stalled
        (a pod that never schedules) unless it takes the change now (it rolls then), nor when Kubernetes
        finished its rollout and only a scale-up's pods are missing (the autoscaler asked for more GPUs than the
        cluster has, say): waiting would not end."""
        # Only a group still replacing old pods (a rollout before this change) holds: one whose new pods are
        # merely not available yet (a fresh deployment loading its weights, a pod that keeps failing) would
        # hold an earlier group's change for as long as that lasts (the operator failover test: forever).
        return g in progress and not progress[g][0] and _old_pods_left(known[g]) and not _only_scaling(known[g]) and (
            not _stalled(known[g]) or currents[g] != desired[g])

    templates: dict[str, dict[str, Any]] = {}
    rolling: dict[str, str] = {}  # group -> how far it is, for the groups that replace pods now
    waiting: list[str] = []
    holders: list[str] = []  # groups not finished that the first waiting group waits for, with how far they are
    new_image = any_changed = False
    before_done = True  # every group before this one has finished its rollout (and none waits)
    for i, group in enumerate(order):
        dep, current, want = live.get(group), currents[group], desired[group]
        if dep is None or current is None or token_changed:
            templates[group] = want
            continue
        changed = current != want
        any_changed = any_changed or changed
        new_image = new_image or (changed and template_image(current) != template_image(want))
        done, how_far = progress[group]
        later_busy = any(holds_earlier(g) for g in order[i + 1:])
        superseded_stall = changed and not done and _stalled(dep)
        if changed and (not before_done or later_busy) and not superseded_stall and not all_at_once:
            templates[group] = current
            waiting.append(f"the {_LABEL[group]}")
            before_done = False
            continue
        templates[group] = want
        if changed:
            done, how_far = False, "starting"
        if changed or (not done and _old_pods_left(dep) and not waiting):
            rolling[group] = how_far
        before_done = before_done and done
    if not rolling and not waiting:
        return TemplatePlan(templates)
    if waiting:
        # What the first waiting group waits for: every group before it short of a pod but the ones named as
        # rolling (a pod not available, a scale-up whose pod waits for a node say, holds the groups after it as a
        # rolling one does), and the groups after it that hold it (its own pods do not: it would roll).
        first = next(g for g in order if templates[g] != desired[g] and g in known)
        for g, (done, how_far) in progress.items():
            if done or g in rolling or g == first or (order.index(g) > order.index(first) and not holds_earlier(g)):
                continue
            stalled = (" (stalled: no progress within its Deployment's progress deadline; the Degraded condition "
                       "and its pods' events say why)") if _stalled(known[g]) else ""
            holders.append(f"the {_LABEL[g]} ({how_far}) has finished replacing its pods{stalled}"
                           if _old_pods_left(known[g]) else f"every pod of the {_LABEL[g]} ({how_far}) is available{stalled}")
    parts = (["rolling " + " and ".join(f"the {_LABEL[g]} ({how_far})" for g, how_far in rolling.items())]
             if rolling else []) + (
        ["waiting until " + " and ".join(holders)] if holders else []) + (
        ["then " + ", then ".join(waiting)] if waiting else [])
    image = template_image(desired[order[0]])
    # Once every group has its template, the old one is gone from the plan's view: name the image only.
    what = f"new image {image}" if new_image else "new pod settings" if any_changed else f"pods of image {image}"
    how = ("all at once (rolloutStrategy AllAtOnce): new requests get 503 until the new head and pools serve"
           if all_at_once else "one group at a time; pool pods drain as they stop")
    return TemplatePlan(templates, f"{what}: " + "; ".join(parts) + f" ({how})")
