"""Status is a pure function of pods + the Ray head's answer; messages tell a person what to do."""

from __future__ import annotations

from dotsvlm_operator import models
from dotsvlm_operator.status import PodView, ServeObservation, compute_status, pod_view

SCHED = ("0/6 nodes are available: 2 node(s) didn't match Pod's node affinity/selector, 4 Insufficient nvidia.com/gpu. "
         "no new claims to deallocate, preemption: 0/6 nodes are available: 6 Preemption is not helpful for scheduling.")
URL = "http://dots-ray-head.ml.svc:8265"


def spec(**llm) -> models.DotsVLMDeploymentSpec:
    return models.DotsVLMDeploymentSpec.model_validate({
        "image": "img", "model": {"path": "/models/x", "volume": {"persistentVolumeClaim": {"claimName": "w"}}},
        "vision": {"gpusPerReplica": 2, "minReplicas": 4, "maxReplicas": 4,
                   "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-L40S"}},
        "llm": {"gpusPerReplica": 16, "tensorParallel": 16, "nodesPerReplica": 2, **llm},
    })


def ready(name, comp):
    return PodView(name, comp, ready=True, scheduled=True)


def run(pods, serve=None, old=None, s=None, desired=None):
    s = s or spec()
    return compute_status(spec=s, generation=3, pods=pods, desired=desired or {"vision": 4, "llm": 1}, serve=serve,
                          endpoint="http://dots-api.ml.svc:8000/v1", old=old, now="2026-01-01T00:00:00Z")


def cond(status, t):
    return next(c for c in status.conditions if c.type == t)


def healthy_pods():
    return [ready("h", "ray-head")] + [ready(f"v{i}", "vision") for i in range(4)] + [ready(f"l{i}", "llm") for i in range(2)]


def test_all_ready_and_serve_running_is_ready() -> None:
    st, tr = run(healthy_pods(), ServeObservation(URL, True, "RUNNING"))
    assert cond(st, "Ready").status == "True" and cond(st, "Ready").reason == "Available"
    assert cond(st, "Progressing").status == "False" and cond(st, "Degraded").status == "False"
    assert st.vision.ready_of_desired == "4/4" and st.llm.ready_of_desired == "1/1" and st.llm.ready_pods == 2
    assert st.observed_generation == 3 and st.endpoint.endswith("/v1")
    assert {t.type for t in tr} == {"Ready", "Progressing", "Degraded"}  # first status: every condition is new


def test_pending_vision_pods_give_the_schedulers_reason_and_a_fix() -> None:
    pods = healthy_pods()[:3] + [PodView("v2", "vision", unschedulable=SCHED), PodView("v3", "vision", unschedulable=SCHED)] + healthy_pods()[5:]
    st, tr = run(pods, ServeObservation(URL, True, "RUNNING"))
    d = cond(st, "Degraded")
    assert d.status == "True" and d.reason == "Unschedulable"
    assert d.message.startswith("2 of 4 vision pods pending: 0/6 nodes are available: 2 node(s) didn't match "
                                "Pod's node affinity/selector, 4 Insufficient nvidia.com/gpu. To fix: each vision pod "
                                "needs 2 free nvidia.com/gpu on a node labelled nvidia.com/gpu.product=NVIDIA-L40S")
    assert "preemption" not in d.message and "claims" not in d.message
    assert cond(st, "Ready").status == "False" and "vision pool: 2 of 4 replicas ready" in cond(st, "Ready").message
    assert any(t.type == "Degraded" and t.warning for t in tr)


def test_partial_llm_placement_is_reported() -> None:
    pods = [ready("h", "ray-head")] + [ready(f"v{i}", "vision") for i in range(4)] + [
        ready("l0", "llm"), PodView("l1", "llm", unschedulable=SCHED)]
    st, _ = run(pods, ServeObservation(URL, True, "RUNNING"))
    d = cond(st, "Degraded")
    assert "LLM replica placement is partial: 1 of 2 LLM pods are scheduled" in d.message
    assert "each replica needs 2 pods on different nodes with 8 free nvidia.com/gpu each" in d.message
    assert st.llm.ready_replicas == 0 and st.llm.ready_pods == 1 and st.llm.ready_of_desired == "0/1"


def test_unreachable_head_is_progressing_with_the_url() -> None:
    st, _ = run(healthy_pods(), ServeObservation(URL, False, message="ConnectError: connection refused"))
    p = cond(st, "Progressing")
    assert p.status == "True" and p.reason == "RayHeadUnreachable"
    assert URL in p.message and "connection refused" in p.message
    assert cond(st, "Degraded").status == "False"


def test_failed_serve_app_is_degraded() -> None:
    st, _ = run(healthy_pods(), ServeObservation(URL, True, "DEPLOY_FAILED", "LLM: replica died: CUDA OOM"))
    assert cond(st, "Degraded").reason == "ServeAppFailed" and "CUDA OOM" in cond(st, "Degraded").message
    assert cond(st, "Ready").status == "False"


def test_crashing_pod_is_degraded() -> None:
    raw = {"metadata": {"name": "dots-llm-x", "labels": {"app.kubernetes.io/component": "llm"}},
           "spec": {"nodeName": "n1"},
           "status": {"conditions": [{"type": "PodScheduled", "status": "True"}, {"type": "Ready", "status": "False"}],
                      "containerStatuses": [{"state": {"waiting": {"reason": "ImagePullBackOff",
                                                                   "message": "pull access denied"}}}]}}
    pv = pod_view(raw)
    assert pv.component == "llm" and pv.scheduled and not pv.ready and pv.problem.startswith("ImagePullBackOff")
    st, _ = run([ready("h", "ray-head")] + [ready(f"v{i}", "vision") for i in range(4)] + [pv, ready("l1", "llm")],
                ServeObservation(URL, True, "RUNNING"))
    assert cond(st, "Degraded").reason == "PodFailing" and "pull access denied" in cond(st, "Degraded").message


def test_pod_view_reads_unschedulable() -> None:
    raw = {"metadata": {"name": "p", "labels": {"app.kubernetes.io/component": "vision"}}, "spec": {},
           "status": {"conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": SCHED}]}}
    pv = pod_view(raw)
    assert pv.unschedulable == SCHED and not pv.scheduled


def test_transition_times_kept_and_only_changes_reported() -> None:
    first, _ = run(healthy_pods(), ServeObservation(URL, True, "RUNNING"))
    again, tr = compute_status(spec=spec(), generation=3, pods=healthy_pods(), desired={"vision": 4, "llm": 1},
                               serve=ServeObservation(URL, True, "RUNNING"), endpoint="x", old=first,
                               now="2026-01-02T00:00:00Z")
    assert tr == []
    assert cond(again, "Ready").last_transition_time == "2026-01-01T00:00:00Z"
    broken, tr = compute_status(spec=spec(), generation=3, pods=healthy_pods()[:-1], desired={"vision": 4, "llm": 1},
                                serve=ServeObservation(URL, True, "RUNNING"), endpoint="x", old=again,
                                now="2026-01-03T00:00:00Z")
    ready = [t for t in tr if t.type == "Ready"][0]
    assert ready.status == "False" and ready.warning
    assert cond(broken, "Ready").last_transition_time == "2026-01-03T00:00:00Z"


def test_deleting_pods_do_not_count() -> None:
    pods = healthy_pods() + [PodView("old", "vision", ready=True, scheduled=True, deleting=True)]
    st, _ = run(pods, ServeObservation(URL, True, "RUNNING"))
    assert st.vision.pods == 4


def test_missing_weights_claim_points_at_model_volume() -> None:
    msg = '0/6 nodes are available: persistentvolumeclaim "dots-weights" not found. preemption: ...'
    pods = [PodView("h", "ray-head", unschedulable=msg)] + healthy_pods()[1:]
    st, _ = run(pods, None)
    d = cond(st, "Degraded")
    assert d.reason == "Unschedulable"
    assert d.message == ('the Ray head pod is pending: 0/6 nodes are available: persistentvolumeclaim "dots-weights" '
                         "not found. To fix: check model.volume: the PersistentVolumeClaim must exist in this namespace "
                         "and be bound (kubectl get pvc).")
