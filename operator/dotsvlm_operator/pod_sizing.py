"""Pure: how many pods each pool runs, and which pod goes first when it shrinks.

Ray Serve decides the replicas (dotsvlm's policy runs inside Serve's controller); the operator only makes
room for them. A vision replica needs one pod, an LLM replica `nodesPerReplica` pods (one Ray node each).

`plan_pool` sizes a pool from:
- Serve's target for the deployment (`target_num_replicas`): the pods the replicas need now;
- the policy's raw wish, when it asks for more than the target (the windows have not passed yet): pods
  are added *ahead* of demand, so a GPU node is warm when Serve scales up; never while pods of the pool
  are pending (no node has room: more pods would only queue up as well);
- the spec's minReplicas / maxReplicas;
- the pods that still host a replica (starting, running or stopping): a pod is removed only after its
  replicas drained and left it, so the pool never shrinks below them.

`deletion_costs` ranks the pods for the ReplicaSet controller through the
`controller.kubernetes.io/pod-deletion-cost` annotation: pods hosting replicas are expensive, empty pods
cheap, so lowering the Deployment's replicas removes empty pods first, never a random one. The controller reads
that cost only after its own criteria (unassigned, then pending, then not-ready pods go first), so a pod hosting a
replica that is not ready (its readiness probe has not passed yet) would go before an empty ready pod: the pool
keeps every pod until those that Kubernetes removes first are empty (`kubernetes_removes_first`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace

from dotsvlm_operator import models
from dotsvlm_operator.builders import desired_replicas
from dotsvlm_operator.ray_head import OCCUPYING_STATES, DeploymentView
from dotsvlm_operator.status import PodView

COST_PER_REPLICA = 1000  # deletion cost of a pod per replica that occupies it; empty pods cost 0

# Why a pool has the pods it has (PoolStatus.podsReason).
SERVE_TARGET = "ServeTarget"
AHEAD_OF_DEMAND = "AheadOfDemand"
PENDING_PODS = "PendingPods"
DRAINING = "Draining"
SERVE_UNKNOWN = "ServeUnknown"


@dataclass(frozen=True)
class PoolPlan:
    """Pods for one pool, and why."""

    replicas: int  # replicas the pods are sized for (Serve's target, or ahead of it)
    pods: int  # the pool Deployment's replicas
    hosting_pods: int  # pods that still host a replica
    reason: str
    message: str
    costs: dict[str, int] = field(default_factory=dict)  # pod name -> deletion cost


def replicas_per_pod(deployment: DeploymentView | None) -> Counter[str]:
    """Occupying replicas per node IP."""
    if deployment is None:
        return Counter()
    return Counter(ip for r in deployment.replicas if r.state in OCCUPYING_STATES for ip in r.ips)


def deletion_costs(pods: list[PodView], deployment: DeploymentView | None) -> dict[str, int]:
    """Deletion cost per live pod of the pool: COST_PER_REPLICA per replica on it (matched by IP: a Ray
    worker pod is one Ray node, so a replica's node_ip is its pod's IP), 0 for an empty pod."""
    per_ip = replicas_per_pod(deployment)
    return {p.name: COST_PER_REPLICA * per_ip.get(p.ip or "", 0) for p in pods if not p.deleting}


def _deletion_rank(pod: PodView, cost: int) -> tuple[bool, bool, int]:
    """The ReplicaSet controller's order for removing pods, as far as it is known here (the lowest goes first):
    unassigned before assigned, not ready before ready (a pod still pending is not ready either), then the
    pod-deletion-cost (kubernetes `controller.ActivePodsWithRanks.Less`, steps 1-4)."""
    return pod.scheduled, pod.ready, cost


def kubernetes_removes_first(live: list[PodView], costs: dict[str, int]) -> int:
    """How many pods the ReplicaSet controller can remove before it reaches one that hosts a replica: the empty
    pods that rank below every hosting pod. An empty ready pod ranks above a not-ready pod with a replica."""
    hosting = [_deletion_rank(p, costs.get(p.name, 0)) for p in live if costs.get(p.name, 0) > 0]
    if not hosting:
        return len(live)
    first = min(hosting)
    return sum(1 for p in live if costs.get(p.name, 0) == 0 and _deletion_rank(p, 0) < first)


def plan_pool(pool: models.VisionPool | models.LLMPool, *, deployment: DeploymentView | None, raw_wish: int | None,
              pods: list[PodView], previous_replicas: int | None) -> PoolPlan:
    """The pool's pod count (see the module docstring). `deployment` None: Serve could not be asked (head
    not ready or unreachable): keep the previous size, within the bounds. `pods`: this pool's pods.
    For an LLM pool the count is always a multiple of nodesPerReplica."""
    nodes_per_replica = getattr(pool, "nodes_per_replica", 1)
    live = [p for p in pods if not p.deleting]
    pending = [p for p in live if not p.scheduled]
    costs = deletion_costs(live, deployment)
    hosting = sum(1 for c in costs.values() if c > 0)
    # A replica that spans several nodes: its pods are known when Ray's state API told us every node it
    # holds; otherwise only its first node is, and nodesPerReplica pods are kept for each such replica.
    occupying = [r for r in (deployment.replicas if deployment else ()) if r.state in OCCUPYING_STATES and r.ips]
    unspanned = sum(1 for r in occupying if not r.node_ips) if nodes_per_replica > 1 else 0
    # A replica whose other nodes are not known makes every pod of the pool possibly one of them (their deletion
    # cost is 0 like an empty pod's): none goes until the spans are known again.
    # Kubernetes removes not-ready pods before it reads the deletion cost: an empty ready pod cannot go while a
    # pod with a replica that is not ready (yet) would go first.
    shielded = len(live) - kubernetes_removes_first(live, costs)
    floor_pods = max(hosting, shielded, len(live) if unspanned else 0)

    if deployment is None or deployment.target is None:
        # Nothing is known about the replicas on the pods: the pool keeps the size it was last given (not even
        # lowered to a lowered maxReplicas), and the pods' deletion costs stay as they were.
        replicas = kept_replicas(pool, previous_replicas)
        reason, message = SERVE_UNKNOWN, (f"Serve's target is not known (the Ray head was not asked or did not answer): "
                                          f"keeping {replicas} replica(s)")
        return PoolPlan(replicas=replicas, pods=replicas * nodes_per_replica, hosting_pods=hosting,
                        reason=reason, message=message, costs={})
    else:
        target = desired_replicas(pool, deployment.target)
        replicas, reason, message = target, SERVE_TARGET, f"Serve wants {deployment.target} replica(s)"
        if raw_wish is not None and raw_wish > target:
            if pending:
                reason, message = PENDING_PODS, (f"the autoscaler would like {raw_wish} replica(s) but {len(pending)} pod(s) "
                                                 f"of the pool are pending: adding none ahead of Serve's {target}")
            else:
                replicas = desired_replicas(pool, raw_wish)
                if replicas > target:
                    reason, message = AHEAD_OF_DEMAND, (f"Serve wants {deployment.target} replica(s); the autoscaler's "
                                                        f"signals ask for {raw_wish}: pods for {replicas} start ahead of demand")
    want_pods = replicas * nodes_per_replica
    if floor_pods > want_pods:
        not_ready = sum(1 for p in live if costs.get(p.name, 0) > 0 and not p.ready)
        why = (f"the nodes of {unspanned} replica(s) spanning several pods are not known (Ray's state API did not "
               f"say): no pod goes until they are" if unspanned else
               f"{not_ready} pod(s) hosting replicas are not ready, and Kubernetes removes a not-ready pod before an "
               f"empty ready one (it reads the deletion cost only after readiness): no ready pod goes until they are "
               f"ready or empty" if shielded > hosting else
               f"{floor_pods} pod(s) still host replicas, and a pod goes only after its replicas drained and left it")
        reason, message = DRAINING, f"{message}; {why}"
    pods_needed = max(want_pods, floor_pods)
    return PoolPlan(replicas=replicas, pods=-(-pods_needed // nodes_per_replica) * nodes_per_replica,
                    hosting_pods=hosting, reason=reason, message=message, costs=costs)


def kept_replicas(pool: models.VisionPool | models.LLMPool, previous_replicas: int | None) -> int:
    """The replicas a full pass (a spec change, the resync) sizes a pool for: the size the pod loop last gave it,
    raised to minReplicas. Never lowered there, not even to a lowered maxReplicas: a pod goes only when the pod
    loop has seen its replicas drain and leave it (`plan_pool`)."""
    return max(pool.min_replicas, pool.min_replicas if previous_replicas is None else previous_replicas)


def cost_patches(pods: list[PodView], costs: dict[str, int]) -> dict[str, str]:
    """Pods whose deletion-cost annotation must change (name -> new value)."""
    return {p.name: str(costs[p.name]) for p in pods if p.name in costs and p.deletion_cost != str(costs[p.name])}


def rank_before_shrinking(plan: PoolPlan, live: list[PodView],
                          deployment_pods: int | None = None) -> tuple[PoolPlan, dict[str, str]]:
    """A shrinking pool's deletion-cost patches, and the plan to apply with them: while any pod's cost must
    still change, the pool keeps its pods this pass and shrinks on the next, once the watch shows the new costs.
    Lowering the Deployment in the same step as the patches races them: the ReplicaSet controller ranks the pods
    from its own cache, which may not have the new costs yet, and would then remove a pod hosting a replica.
    `deployment_pods`: the pool Deployment's present replicas. The pool is kept at that size, never raised to the
    live pods (a rolling update's surge pods are among them); a plan that does not go below it lowers nothing,
    so its patches need no pass of their own."""
    if plan.pods >= len(live):
        return plan, {}
    patches = cost_patches(live, plan.costs)
    if not patches:
        return plan, {}
    keep = len(live) if deployment_pods is None else min(len(live), deployment_pods)
    if plan.pods >= keep:
        return plan, patches
    return replace(plan, pods=keep, message=f"{plan.message}; ranking the pods for removal first (empty pods "
                                            f"go first): {keep - plan.pods} pod(s) go on the next pass"), patches
