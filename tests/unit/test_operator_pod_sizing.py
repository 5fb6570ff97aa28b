"""Pods follow replicas: the pool's pod count and which pod goes first (pure functions)."""

from __future__ import annotations

import pytest
from dotsvlm_operator import models, pod_sizing
from dotsvlm_operator.ray_head import DeploymentView, ReplicaView, parse_application
from dotsvlm_operator.status import PodView


def vision(min_=1, max_=8) -> models.VisionPool:
    return models.VisionPool(min_replicas=min_, max_replicas=max_)


def llm(nodes=2, min_=1, max_=4) -> models.LLMPool:
    return models.LLMPool(gpus_per_replica=16, tensor_parallel=16, nodes_per_replica=nodes, min_replicas=min_, max_replicas=max_)


def pod(i: int, *, ready=True, scheduled=True, cost=None, comp="vision") -> PodView:
    return PodView(f"p{i}", comp, ready=ready, scheduled=scheduled, ip=f"10.0.0.{i}" if scheduled else None,
                   deletion_cost=cost)


def dep(target: int | None, *states_on: tuple[str, int]) -> DeploymentView:
    return DeploymentView(target=target, replicas=tuple(ReplicaView(state=s, node_ip=f"10.0.0.{i}") for s, i in states_on))


def test_vision_pods_follow_serves_target() -> None:
    plan = pod_sizing.plan_pool(vision(), deployment=dep(3, ("RUNNING", 0)), raw_wish=3, pods=[pod(0)], previous_replicas=1)
    assert (plan.pods, plan.replicas, plan.reason) == (3, 3, pod_sizing.SERVE_TARGET)


def test_llm_pods_are_replicas_times_nodes_per_replica() -> None:
    plan = pod_sizing.plan_pool(llm(nodes=2), deployment=dep(3), raw_wish=None, pods=[], previous_replicas=None)
    assert plan.pods == 6 and plan.replicas == 3


def test_pods_start_ahead_of_demand_within_bounds() -> None:
    plan = pod_sizing.plan_pool(vision(max_=4), deployment=dep(2, ("RUNNING", 0), ("RUNNING", 1)), raw_wish=9,
                                pods=[pod(0), pod(1)], previous_replicas=2)
    assert plan.pods == 4 and plan.reason == pod_sizing.AHEAD_OF_DEMAND and "ask for 9" in plan.message


def test_no_pods_ahead_of_demand_while_pods_are_pending() -> None:
    pods = [pod(0), pod(1), pod(2, scheduled=False, ready=False)]
    plan = pod_sizing.plan_pool(vision(), deployment=dep(3, ("RUNNING", 0), ("RUNNING", 1)), raw_wish=6, pods=pods,
                                previous_replicas=3)
    assert plan.pods == 3 and plan.reason == pod_sizing.PENDING_PODS and "1 pod(s) of the pool are pending" in plan.message


def test_never_below_pods_that_still_host_replicas() -> None:
    # Serve wants 1; the replica on p2 is draining (STOPPING): p2 must stay until it has left.
    pods = [pod(0), pod(1), pod(2)]
    plan = pod_sizing.plan_pool(vision(), deployment=dep(1, ("RUNNING", 0), ("STOPPING", 2)), raw_wish=1, pods=pods,
                                previous_replicas=3)
    assert plan.pods == 2 and plan.reason == pod_sizing.DRAINING
    # Once it has left, the pool shrinks to Serve's target.
    plan = pod_sizing.plan_pool(vision(), deployment=dep(1, ("RUNNING", 0)), raw_wish=1, pods=pods, previous_replicas=2)
    assert plan.pods == 1 and plan.reason == pod_sizing.SERVE_TARGET


def test_llm_floor_keeps_every_pod_of_a_multi_node_replica() -> None:
    pods = [pod(i, comp="llm") for i in range(4)]
    plan = pod_sizing.plan_pool(llm(nodes=2), deployment=dep(1, ("RUNNING", 0), ("STOPPING", 2)), raw_wish=1, pods=pods,
                                previous_replicas=2)
    assert plan.pods == 4 and plan.pods % 2 == 0


def test_unknown_target_keeps_the_previous_size_at_least_the_minimum() -> None:
    plan = pod_sizing.plan_pool(vision(min_=2), deployment=None, raw_wish=None, pods=[], previous_replicas=None)
    assert plan.pods == 2 and plan.reason == pod_sizing.SERVE_UNKNOWN
    plan = pod_sizing.plan_pool(vision(min_=3), deployment=None, raw_wish=None, pods=[], previous_replicas=1)
    assert plan.pods == 3


def test_unknown_target_removes_no_pod_and_leaves_their_costs() -> None:
    # maxReplicas was lowered to 3 while 5 replicas run, and the Ray head does not answer this pass: nothing says
    # which pods still host replicas, so none goes and no deletion cost is reset to 0.
    pods = [pod(i, cost="1000") for i in range(5)]
    plan = pod_sizing.plan_pool(vision(max_=3), deployment=None, raw_wish=None, pods=pods, previous_replicas=5)
    assert plan.pods == 5 and plan.reason == pod_sizing.SERVE_UNKNOWN and "keeping 5 replica(s)" in plan.message
    assert plan.costs == {} and pod_sizing.cost_patches(pods, plan.costs) == {}


def test_a_full_pass_never_lowers_a_pool_only_the_pod_loop_does() -> None:
    # The spec's maxReplicas drops 5 -> 3 while 5 replicas run: the full pass keeps the 5 pods the pod loop gave
    # the pool (it lowers them once the replicas drained); a raised minReplicas grows the pool at once.
    assert pod_sizing.kept_replicas(vision(max_=3), 5) == 5
    assert pod_sizing.kept_replicas(vision(min_=4, max_=8), 2) == 4
    assert pod_sizing.kept_replicas(vision(min_=2), None) == 2


def test_scale_to_zero() -> None:
    plan = pod_sizing.plan_pool(vision(min_=0), deployment=dep(0), raw_wish=0, pods=[pod(0)], previous_replicas=1)
    assert plan.pods == 0


def test_emptiest_pod_costs_least() -> None:
    pods = [pod(0), pod(1), pod(2), PodView("gone", "vision", deleting=True, ip="10.0.0.9")]
    costs = pod_sizing.deletion_costs(pods, dep(2, ("RUNNING", 0), ("RUNNING", 0), ("STOPPING", 2), ("STOPPED", 1)))
    assert costs == {"p0": 2000, "p1": 0, "p2": 1000}  # STOPPED has left; a deleting pod is not ranked
    # Only annotations that change are patched.
    pods[0] = pod(0, cost="2000")
    assert pod_sizing.cost_patches(pods, costs) == {"p1": "0", "p2": "1000"}


def test_parse_application_reads_targets_and_replica_nodes() -> None:
    data = {"applications": {"dotsvlm": {"status": "RUNNING", "message": "", "deployments": {
        "VisionEncoder": {"status": "UPSCALING", "message": "", "target_num_replicas": 3, "replicas": [
            {"replica_id": "a", "state": "RUNNING", "node_ip": "10.0.0.1", "node_id": "n1", "start_time_s": 1.0},
            {"replica_id": "b", "state": "STARTING", "node_ip": None, "start_time_s": 2.0}]},
        "LLMServer": {"status": "HEALTHY", "target_num_replicas": 1, "replicas": []}}}}}
    app = parse_application(data)
    v = app.deployments["VisionEncoder"]
    assert app.status == "RUNNING" and v.target == 3 and v.running == 1 and v.replicas[0].node_ip == "10.0.0.1"
    assert "VisionEncoder: UPSCALING" in app.message
    assert parse_application({"applications": {}}).status == "NOT_DEPLOYED"


def test_parse_application_reads_what_the_installed_ray_serializes() -> None:
    """The dashboard's JSON is ray.serve.schema's models dumped: build it with them (not by hand)."""
    import pytest

    schema = pytest.importorskip("ray.serve.schema")
    replicas = [schema.ReplicaDetails(replica_id=f"r{i}", state=state, node_ip=f"10.0.0.{i}", node_id=f"n{i}",
                                      start_time_s=1.0).model_dump(mode="json")
                for i, state in enumerate(["RUNNING", "STOPPING", "STARTING"])]
    dep = {name: {"name": name, "status": "HEALTHY", "message": "", "target_num_replicas": 2, "replicas": replicas}
           for name in ("VisionEncoder", "LLMServer")}
    assert {"target_num_replicas", "replicas"} <= set(schema.DeploymentDetails.model_fields)
    assert {"node_ip", "state"} <= set(schema.ReplicaDetails.model_fields)
    app = parse_application({"applications": {"dotsvlm": {"status": "RUNNING", "message": "", "deployments": dep}}})
    v = app.deployments["VisionEncoder"]
    assert v.target == 2 and v.running == 1 and [r.state for r in v.replicas] == ["RUNNING", "STOPPING", "STARTING"]
    plan = pod_sizing.plan_pool(vision(), deployment=v, raw_wish=None, previous_replicas=3,
                                pods=[pod(0), pod(1), pod(2), pod(3)])
    assert plan.pods == 3 and plan.reason == pod_sizing.DRAINING  # three pods host a replica (one draining)


def _state_api(rows: list[dict]) -> dict:
    return {"result": True, "msg": "", "data": {"result": {"total": len(rows), "result": rows}}}


def test_an_llm_replica_over_two_nodes_protects_both_of_its_pods() -> None:
    """TP16 over two 8-GPU nodes: Serve names the replica's placement group after its actor, and Ray's
    state API says which nodes its bundles hold. Scaling 2 -> 1 replica must remove the leaving replica's
    two pods, never the second pod of the replica that stays."""
    from dotsvlm_operator.ray_head import parse_replica_spans

    pods = [pod(i, comp="llm") for i in range(4)]
    pgs = _state_api([
        {"name": "SERVE_REPLICA::dotsvlm#LLMServer#a", "state": "CREATED",
         "bundles": [{"node_id": "n0"}, {"node_id": "n2"}]},
        {"name": "SERVE_REPLICA::dotsvlm#LLMServer#b", "state": "REMOVED", "bundles": [{"node_id": "n1"}, {"node_id": "n3"}]},
    ])
    nodes = _state_api([{"node_id": f"n{i}", "node_ip": f"10.0.0.{i}"} for i in range(4)])
    spans = parse_replica_spans(pgs, nodes)
    assert spans == {"SERVE_REPLICA::dotsvlm#LLMServer#a": ("10.0.0.0", "10.0.0.2")}
    # Replica a (first node p0, second node p2) stays; replica b has left (its group was removed).
    staying = DeploymentView(target=1, replicas=(ReplicaView(state="RUNNING", node_ip="10.0.0.0",
                                                             actor_name="SERVE_REPLICA::dotsvlm#LLMServer#a"),))
    plan = pod_sizing.plan_pool(llm(nodes=2), deployment=staying.with_spans(spans), raw_wish=1, pods=pods,
                                previous_replicas=2)
    assert plan.pods == 2 and plan.reason == pod_sizing.SERVE_TARGET
    assert plan.costs == {"p0": 1000, "p1": 0, "p2": 1000, "p3": 0}, "the staying replica's second pod would go"
    # Without the state API's answer only the first node is known: the second pod's cost cannot be told (0, like
    # the leaving replica's pods), so lowering the Deployment could take it: no pod goes until the spans are known.
    plan = pod_sizing.plan_pool(llm(nodes=2), deployment=staying, raw_wish=1, pods=pods, previous_replicas=2)
    assert plan.pods == 4 and plan.reason == pod_sizing.DRAINING and "are not known" in plan.message
    assert plan.costs["p0"] == 1000 and plan.costs["p2"] == 0
    # An odd number of pods (one more is starting) is kept as whole replicas' worth: rounded up, never down.
    plan = pod_sizing.plan_pool(llm(nodes=2), deployment=staying, raw_wish=1, pods=pods + [pod(4, comp="llm")],
                                previous_replicas=2)
    assert plan.pods == 6


def test_a_pod_hosting_a_replica_that_is_not_ready_is_not_ranked_below_an_empty_ready_pod() -> None:
    """Kubernetes' ReplicaSet removes not-ready pods before it reads the deletion cost (unassigned < pending <
    not ready < lower pod-deletion-cost): with a replica starting on a pod whose readiness probe has not passed
    yet and an empty ready pod beside it, lowering the Deployment by one removed the pod with the replica. The
    pool keeps its pods until every pod that Kubernetes would remove first is empty."""
    # p0 is ready and empty, p1 not ready with a replica starting on it, p2 ready with a running replica.
    pods = [pod(0), pod(1, ready=False), pod(2)]
    plan = pod_sizing.plan_pool(vision(), deployment=dep(2, ("STARTING", 1), ("RUNNING", 2)), raw_wish=2, pods=pods,
                                previous_replicas=3)
    assert plan.pods == 3 and plan.reason == pod_sizing.DRAINING and "not ready" in plan.message, plan
    assert plan.costs == {"p0": 0, "p1": 1000, "p2": 1000}
    # Once p1 is ready the empty pod ranks first again and goes.
    pods = [pod(0), pod(1), pod(2)]
    plan = pod_sizing.plan_pool(vision(), deployment=dep(2, ("RUNNING", 1), ("RUNNING", 2)), raw_wish=2, pods=pods,
                                previous_replicas=3)
    assert plan.pods == 2 and plan.reason == pod_sizing.SERVE_TARGET
    # An empty pod that is not ready itself still goes before the not-ready pod with a replica (lower cost).
    pods = [pod(0, ready=False), pod(1, ready=False), pod(2)]
    plan = pod_sizing.plan_pool(vision(), deployment=dep(2, ("STARTING", 1), ("RUNNING", 2)), raw_wish=2, pods=pods,
                                previous_replicas=3)
    assert plan.pods == 2 and plan.reason == pod_sizing.SERVE_TARGET


def test_a_shrinking_pool_ranks_its_pods_first_and_lowers_the_deployment_once_the_ranks_are_seen() -> None:
    """Before, the cost patches and the smaller Deployment went out in one step: the ReplicaSet controller ranks
    pods from its own cache, which may not have the new costs yet, and could remove the pod hosting the replica."""
    d = dep(1, ("RUNNING", 2))
    unranked = [pod(0), pod(1), pod(2)]  # no costs yet: to the ReplicaSet controller all three are alike
    plan = pod_sizing.plan_pool(vision(), deployment=d, raw_wish=None, pods=unranked, previous_replicas=3)
    assert plan.pods == 1
    held, patches = pod_sizing.rank_before_shrinking(plan, unranked)
    assert patches == {"p0": "0", "p1": "0", "p2": "1000"}
    assert held.pods == 3 and "2 pod(s) go on the next pass" in held.message  # this pass: only the ranks
    ranked = [pod(0, cost="0"), pod(1, cost="0"), pod(2, cost="1000")]  # the watch shows the new costs
    plan = pod_sizing.plan_pool(vision(), deployment=d, raw_wish=None, pods=ranked, previous_replicas=3)
    assert pod_sizing.rank_before_shrinking(plan, ranked) == (plan, {}) and plan.pods == 1
    grow = pod_sizing.plan_pool(vision(), deployment=dep(4, ("RUNNING", 2)), raw_wish=None, pods=unranked,
                                previous_replicas=3)
    assert pod_sizing.rank_before_shrinking(grow, unranked) == (grow, {})  # growing needs no ranks


def test_ranking_before_a_shrink_never_raises_the_deployment_above_its_size() -> None:
    """While the ranks go out, the pool keeps the Deployment's present size, not the number of live pods: during a
    rolling update those include the surge pod (here p2, new, without a cost yet), and a Deployment raised to
    them made the ReplicaSet controller start one more pod (a GPU node) for a pass, each time a new pod came."""
    d = dep(2, ("RUNNING", 0), ("RUNNING", 1))
    live = [pod(0, cost="1000"), pod(1, cost="1000"), pod(2, ready=False)]
    plan = pod_sizing.plan_pool(vision(), deployment=d, raw_wish=None, pods=live, previous_replicas=2)
    assert plan.pods == 2
    held, patches = pod_sizing.rank_before_shrinking(plan, live, deployment_pods=2)
    assert patches == {"p2": "0"} and held.pods == 2  # the Deployment stays at 2: nothing races the ranks
    # A real shrink (the Deployment at 3) still waits a pass for its ranks, at the Deployment's size.
    held, patches = pod_sizing.rank_before_shrinking(plan, live, deployment_pods=3)
    assert patches == {"p2": "0"} and held.pods == 3 and "1 pod(s) go on the next pass" in held.message


@pytest.mark.parametrize("offset", [-120.0, 120.0])
def test_the_policys_wish_is_acted_on_while_it_keeps_deciding_whatever_the_heads_clock_says(offset: float) -> None:
    """The decision's time is the wall clock of Serve's controller on the Ray head, another node than the
    operator's, and was compared with the operator's: a head clock 30 s behind made every wish stale, so no pod
    ever started ahead of demand (each GPU node started only once Serve's target rose); one ahead kept a stopped
    policy's last wish for that long. Now a wish counts while its decision keeps changing, on the operator's
    monotonic clock; only a decision not read before goes by the wall clocks."""
    from dotsvlm_operator.ingress_client import AutoscalerReport, PoolDecision
    from dotsvlm_operator.status import DECISION_FRESH_S, decision_ages, raw_wish

    heard: dict = {}
    wishes = []
    for n in range(30):  # the operator reads the report every 5 s; the policy decides every 2 s until 70 s
        now = 1000.0 + 5 * n
        decided = min(now, 1070.0) - 1.0
        report = AutoscalerReport(decisions={"vision": PoolDecision(desired=2, current=2, raw=4, reason="up",
                                                                    time=decided + offset)})
        heard, silent = decision_ages(report, heard, now_unix=now, now=now + 5e5)  # (the monotonic clock: any)
        wishes.append(raw_wish(report, "vision", silent))
    assert wishes[1:15] == [4] * 14, wishes  # from the second read on
    stopped = 14 + int(DECISION_FRESH_S / 5) + 1  # its last decision (read at 70 s) unchanged for over 30 s
    # (one read earlier on the clock behind: a changed decision is never taken as younger than its wall age)
    assert wishes[stopped - 2] == 4 and set(wishes[stopped:]) == {None}, wishes
    # No report (the API did not answer): nothing to act on, and what was read before is kept.
    assert decision_ages(None, heard, now_unix=0.0, now=0.0) == (heard, {})


def test_a_decision_read_after_a_gap_is_no_wish_when_it_was_made_long_before() -> None:
    """With the report unreadable for a while (the Ray head restarting, say, with GCS fault tolerance keeping the
    KV), the policy's last decision before it stopped differs from the one read before the gap, and counted as
    made just now: pods were started ahead of demand for 30 s on a wish minutes old, though every clock agreed.
    A changed decision's age is its wall age, never more than the time since the last read."""
    from dotsvlm_operator.ingress_client import AutoscalerReport, PoolDecision
    from dotsvlm_operator.status import decision_ages, raw_wish

    def report(decided: float) -> AutoscalerReport:
        return AutoscalerReport(decisions={"vision": PoolDecision(desired=2, current=2, raw=4, reason="up",
                                                                  time=decided)})

    heard, silent = decision_ages(report(999.0), {}, now_unix=1000.0, now=50.0)
    assert raw_wish(report(999.0), "vision", silent) == 4
    # The next answer 300 s later: the policy decided once more at 1001 s, then stopped.
    heard, silent = decision_ages(report(1001.0), heard, now_unix=1300.0, now=350.0)
    assert raw_wish(report(1001.0), "vision", silent) is None, silent
    # A policy deciding still, on a head clock 120 s behind: its wish counts.
    heard, silent = decision_ages(report(1304.0 - 120.0), heard, now_unix=1305.0, now=355.0)
    assert raw_wish(report(1304.0 - 120.0), "vision", silent) == 4, silent
