"""Pure: a new `spec.image` rolls the Ray pods one group at a time (vision pool, then LLM pool, then head).

Changing the image changes every Ray pod template at once, so Kubernetes would replace the vision and
LLM pools (and the head) together: both pools short of a pod at the same time, the head's restart on
top. Instead the operator gives each group the new image only when the group before it has finished
its rollout (every pod updated and available): the vision pool first (it is cheap to restart and
requests with images only wait), then the LLM pool, then the head. Each pool's pods drain as they stop
(`dotsvlm drain-node`), one at a time (the Deployments' maxUnavailable 1, maxSurge 0).

The head goes last because its restart restarts Ray itself (the GCS): every Serve replica and request
of the deployment goes with it, and the pools' Ray processes rejoin the new head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dotsvlm_operator import naming

# The groups in the order they take a new image.
ORDER = (naming.COMPONENT_VISION, naming.COMPONENT_LLM, naming.COMPONENT_HEAD)
_LABEL = {naming.COMPONENT_VISION: "vision pool", naming.COMPONENT_LLM: "LLM pool", naming.COMPONENT_HEAD: "Ray head"}


def deployment_image(dep: dict[str, Any] | None) -> str | None:
    """The image a live Deployment's pod template runs (its `ray` container)."""
    if not dep:
        return None
    containers = (((dep.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    return next((c.get("image") for c in containers if c.get("name") == "ray"), None)


def rollout_progress(dep: dict[str, Any]) -> tuple[bool, str]:
    """Whether a Deployment's rollout is complete (as `kubectl rollout status` decides it: the controller
    saw the latest template, every pod is updated and available, no old pod is left), and how far it is."""
    meta, spec, st = dep.get("metadata") or {}, dep.get("spec") or {}, dep.get("status") or {}
    want = int(spec.get("replicas", 1))
    updated, total, available = (int(st.get(k) or 0) for k in ("updatedReplicas", "replicas", "availableReplicas"))
    seen = int(st.get("observedGeneration") or 0) >= int(meta.get("generation") or 0)
    done = seen and updated == want and total == want and available == want
    return done, f"{updated} of {want} pods updated, {available} available" + ("" if total <= want else f", {total - want} old left")


@dataclass(frozen=True)
class ImagePlan:
    """The image each group's pod template gets now, and what a person should know while it rolls."""

    images: dict[str, str]
    message: str | None = None  # None: no rollout in progress

    @property
    def rolling(self) -> bool:
        return self.message is not None


def plan_images(image: str, live: dict[str, dict[str, Any] | None]) -> ImagePlan:
    """`image` (spec.image) for every group that already runs it or whose turn it is; the image it runs
    for a group that waits for the one before it to finish. `live`: the groups' Deployments as the API
    server has them (None: not created yet; it starts with `image`)."""
    images: dict[str, str] = {}
    rolling: list[str] = []
    waiting: list[str] = []
    before_done = True  # every group before this one has finished its rollout
    for group in ORDER:
        dep = live.get(group)
        current = deployment_image(dep)
        if dep is None or current is None:
            images[group] = image
            continue
        if current != image and not before_done:
            images[group] = current
            waiting.append(f"the {_LABEL[group]}")
            before_done = False
            continue
        images[group] = image
        done, progress = rollout_progress(dep) if current == image else (False, "starting")
        st = dep.get("status") or {}
        old_pods_left = int(st.get("replicas") or 0) > int(st.get("updatedReplicas") or 0)
        if current != image or (not done and old_pods_left):
            rolling.append(f"the {_LABEL[group]} ({progress})")
        before_done = before_done and done
    if not rolling and not waiting:
        return ImagePlan(images)
    parts = (["rolling " + " and ".join(rolling)] if rolling else []) + (
        ["then " + ", then ".join(waiting)] if waiting else [])
    return ImagePlan(images, f"new image {image}: " + "; ".join(parts)
                     + " (one group at a time; pool pods drain as they stop)")
