"""Pods follow replicas: the operator against a fake Ray head and ingress (tests/support/fake_ray_head.py).

The fake head plays Ray Serve: it reports each deployment's target and where its replicas run (by pod
IP, as Ray reports node_ip); the fake ingress reports the autoscaler's decisions and the queue. The
operator must size the pool Deployments from them, remove the emptiest pod first, never remove a pod
that still hosts a draining replica, show pending pods and not run away when GPUs run out, and record
an Event per scaling decision.
"""

from __future__ import annotations

import json

import pytest
import yaml
from dvlm_support import get_json, load_example, poll

from support.fake_ray_head import LLM, VISION, FakeRayHead

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


NAMESPACE_PREFIX = "scale"  # the `ns` fixture (conftest.py) names test namespaces after it


@pytest.fixture
def fake_head():
    head = FakeRayHead()
    url = head.start()
    yield head, url
    head.stop()


def vision_pods(kube, ns: str, name: str) -> list[dict]:
    items = get_json(kube, "pods", "-n", ns, "-l", f"dotsvlm.io/deployment={name},app.kubernetes.io/component=vision")
    return [p for p in (items or {}).get("items", []) if not p["metadata"].get("deletionTimestamp")]


def test_pods_follow_serves_target_emptiest_first_pending_shown_and_events(kube, ns, fake_head, operator_factory) -> None:
    head, url = fake_head
    op = operator_factory([ns], head_url=url, extra=["--api-url-override", url, "--pod-loop-seconds", "1"])
    cr = load_example("dotsvlm-small.yaml")
    cr["spec"]["model"]["volume"] = {"hostPath": {"path": "/mnt/weights"}}
    cr["spec"]["vision"].update(minReplicas=1, maxReplicas=40, nodeSelector={"nvidia.com/gpu.product": "NVIDIA-L40S"})
    name = cr["metadata"]["name"]
    kube.apply(yaml.safe_dump(cr), namespace=ns)

    def status():
        return (get_json(kube, "dvlm", name, "-n", ns) or {}).get("status") or {}

    def replicas() -> int:
        return get_json(kube, "deployment", f"{name}-vision", "-n", ns)["spec"]["replicas"]

    poll(lambda: head.deployed, 60, "the Serve config deployed to the fake head", op.log_tail)
    poll(lambda: status().get("vision", {}).get("currentReplicas") is not None, 60, "a status from Serve's answer",
         op.log_tail)

    # 1. Serve's target goes up: the pool's pods follow, the status and an Event say why.
    head.set_decision("vision", 3, 1, 3, "VisionBacklog", "12 Mpx queued, 1 replica encodes 2 Mpx/s")
    head.set_deployment(VISION, 3)
    pods = poll(lambda: len(p := vision_pods(kube, ns, name)) == 3 and all(x["status"].get("podIP") for x in p) and p,
                60, "3 vision pods with IPs", op.log_tail)
    st = poll(lambda: (s := status()).get("vision", {}).get("desiredReplicas") == 3 and s, 30, "desired 3 in status")
    assert st["vision"]["lastDecision"]["reason"] == "VisionBacklog"
    assert st["vision"]["desiredPods"] == 3 and st["autoscaler"]["reachable"] is True
    events = poll(lambda: [e for e in get_json(kube, "events", "-n", ns)["items"]
                           if e["involvedObject"].get("name") == name and e["reason"] == "VisionBacklog"],
                  30, "an Event for the scale-up")
    assert "vision pool: 1 -> 3 replicas: 12 Mpx queued" in events[0]["message"]

    # 2. Replicas run on the first and third pod; Serve wants 2: the empty pod goes, not a random one.
    ips = {p["metadata"]["name"]: p["status"]["podIP"] for p in pods}
    names = sorted(ips)
    keep, empty = [names[0], names[2]], names[1]
    head.set_deployment(VISION, 3, [("RUNNING", ips[keep[0]]), ("RUNNING", ips[keep[1]])])
    head.set_decision("vision", 2, 3, 2, "LowLoad", "signals asked for 2 or fewer replicas for the last 300 s")
    head.set_deployment(VISION, 2, [("RUNNING", ips[keep[0]]), ("RUNNING", ips[keep[1]])])
    poll(lambda: sorted(p["metadata"]["name"] for p in vision_pods(kube, ns, name)) == keep, 60,
         "the empty vision pod removed, the two hosting replicas kept", op.log_tail)
    annotated = {p["metadata"]["name"]: p["metadata"].get("annotations", {}).get("controller.kubernetes.io/pod-deletion-cost")
                 for p in vision_pods(kube, ns, name)}
    assert annotated == {keep[0]: "1000", keep[1]: "1000"}

    # 3. Serve wants 1 while the replica on keep[1] drains (STOPPING): its pod stays until it has left.
    head.set_decision("vision", 1, 2, 1, "LowLoad", "signals asked for 1 or fewer replicas for the last 300 s")
    head.set_deployment(VISION, 1, [("RUNNING", ips[keep[0]]), ("STOPPING", ips[keep[1]])])
    poll(lambda: status().get("vision", {}).get("podsReason") == "Draining", 30, "podsReason Draining", op.log_tail)
    assert replicas() == 2 and len(vision_pods(kube, ns, name)) == 2
    head.set_deployment(VISION, 1, [("RUNNING", ips[keep[0]])])
    poll(lambda: [p["metadata"]["name"] for p in vision_pods(kube, ns, name)] == [keep[0]], 60,
         "the drained pod removed, the one with the running replica kept", op.log_tail)

    # 4. More than the GPUs: 2 L40S nodes x 8 GPUs fit 16 vision pods. Serve asks 20 while the policy's
    #    signals ask for 40: the pool holds Serve's 20, shows the pending pods with the scheduler's reason.
    head.set_decision("vision", 20, 1, 40, "VisionBacklog", "huge backlog")
    head.set_deployment(VISION, 20, [("RUNNING", ips[keep[0]])])
    def degraded_of(s: dict) -> dict:
        return next((c for c in s.get("conditions", []) if c["type"] == "Degraded"), {})

    # (a pod is pending at once; the scheduler's reason follows when it has tried)
    st = poll(lambda: (s := status()).get("vision", {}).get("pendingPods") == 4
              and degraded_of(s).get("reason") == "Unschedulable" and s, 90,
              "4 pending vision pods and the scheduler's reason in the status", op.log_tail)
    degraded = degraded_of(st)
    assert degraded["reason"] == "Unschedulable" and "Insufficient nvidia.com/gpu" in degraded["message"]
    assert "add such nodes" in degraded["message"]
    assert st["vision"]["podsReason"] == "PendingPods" and st["vision"]["desiredPods"] == 20
    for _ in range(3):  # several loops later the count has not run away
        poll(lambda: status().get("vision", {}).get("pendingPods") == 4, 10, "still 4 pending")
        assert replicas() == 20

    # 5. The ingress stops answering: the reconcile carries on and the status says so.
    head.autoscaler_up = False
    st = poll(lambda: (s := status()).get("autoscaler", {}).get("reachable") is False and s, 30,
              "autoscaler unreachable in the status", op.log_tail)
    assert "HTTP 503" in st["autoscaler"]["message"]
    head.set_deployment(VISION, 2, [("RUNNING", ips[keep[0]])])
    poll(lambda: replicas() == 2, 30, "pods still follow Serve's target", op.log_tail)
    assert "reconcile failed" not in op.log_path.read_text()

    # kubectl get shows desired and ready per pool.
    out = kube.kubectl("get", "dvlm", name, "-n", ns, "-o", "wide").stdout
    assert "VISION" in out and "QUEUE" in out and "VISION-SCALING" in out, out
    assert head.deployments[LLM]["target"] == 1 and get_json(kube, "deployment", f"{name}-llm", "-n", ns)["spec"]["replicas"] == 1


def test_gpu_node_lost_under_load_pods_replaced_degraded_then_ready(kube, ns, fake_head, operator_factory) -> None:
    from support.cluster import DEFAULT_NODES

    head, url = fake_head
    op = operator_factory([ns], head_url=url, extra=["--api-url-override", url, "--pod-loop-seconds", "1"])
    cr = load_example("dotsvlm-small.yaml")
    cr["spec"]["model"]["volume"] = {"hostPath": {"path": "/mnt/weights"}}
    cr["spec"]["vision"].update(minReplicas=1, maxReplicas=16, nodeSelector={"nvidia.com/gpu.product": "NVIDIA-L40S"})
    cr["spec"]["head"] = {"nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}}
    name = cr["metadata"]["name"]
    kube.apply(yaml.safe_dump(cr), namespace=ns)
    poll(lambda: head.deployed, 60, "the Serve config deployed", op.log_tail)

    def status():
        return (get_json(kube, "dvlm", name, "-n", ns) or {}).get("status") or {}

    def placed(n: int):
        pods = vision_pods(kube, ns, name)
        return len(pods) == n and all(p["spec"].get("nodeName") and p["status"].get("podIP") for p in pods) and pods

    # Under load: 10 vision replicas, one per pod, spread over the two 8-GPU L40S nodes.
    head.set_decision("vision", 10, 1, 10, "VisionBacklog", "40 Mpx queued")
    head.set_deployment(VISION, 10)
    pods = poll(lambda: placed(10), 90, "10 vision pods placed", op.log_tail)
    head.set_deployment(VISION, 10, [("RUNNING", p["status"]["podIP"]) for p in pods])
    poll(lambda: (c := next((c for c in status().get("conditions", []) if c["type"] == "Ready"), None))
         and c["status"] == "True", 60, "Ready with 10 vision replicas", op.log_tail)
    by_node: dict[str, int] = {}
    for p in pods:
        by_node[p["spec"]["nodeName"]] = by_node.get(p["spec"]["nodeName"], 0) + 1
    lost = max(by_node, key=by_node.get)
    spare = 8 - by_node.get(next(n for n in by_node if n != lost), 0) if len(by_node) > 1 else 8
    node = next(n for n in DEFAULT_NODES if n.name == lost)
    try:
        kube.kubectl("delete", "node", lost, "--wait=false")
        # Ray loses the replicas of that node: Serve's replicas are those on the surviving pods.
        survivors = [p for p in pods if p["spec"]["nodeName"] != lost]
        head.set_deployment(VISION, 10, [("RUNNING", p["status"]["podIP"]) for p in survivors])
        missing = 10 - len(survivors) - spare  # replacements that find no GPU
        st = poll(lambda: (s := status()).get("vision", {}).get("pendingPods") == missing and s, 150,
                  f"{missing} replacement pod(s) pending after the node is gone", op.log_tail)
        degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
        assert degraded["status"] == "True" and degraded["reason"] == "Unschedulable"
        assert "Insufficient nvidia.com/gpu" in degraded["message"] and "To fix:" in degraded["message"]
        assert "nvidia.com/gpu.product=NVIDIA-L40S" in degraded["message"]
        assert get_json(kube, "deployment", f"{name}-vision", "-n", ns)["spec"]["replicas"] == 10
    finally:
        kube.apply(json.dumps(node.manifest()))
    # The node is back: the pending pods are placed, the pool is whole, Degraded clears and Ready holds.
    pods = poll(lambda: placed(10), 120, "10 vision pods placed again", op.log_tail)
    head.set_deployment(VISION, 10, [("RUNNING", p["status"]["podIP"]) for p in pods])
    st = poll(lambda: (s := status()) and next(c for c in s["conditions"] if c["type"] == "Degraded")["status"] == "False"
              and s["vision"]["readyReplicas"] == 10 and s, 60, "Degraded=False and 10 ready replicas again", op.log_tail)
    assert next(c for c in st["conditions"] if c["type"] == "Ready")["status"] == "True"
    assert st["vision"]["pendingPods"] == 0
    reasons = {e["reason"] for e in get_json(kube, "events", "-n", ns)["items"] if e["involvedObject"].get("name") == name}
    assert "Unschedulable" in reasons, reasons
