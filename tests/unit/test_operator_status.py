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


def run(pods, serve=None, old=None, s=None, desired=None, rollout=None):
    s = s or spec()
    return compute_status(spec=s, generation=3, pods=pods, desired=desired or {"vision": 4, "llm": 1}, serve=serve,
                          endpoint="http://dots-api.ml.svc:8000/v1", old=old, now="2026-01-01T00:00:00Z",
                          rollout=rollout)


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
    # First status: one Event per condition that tells something (a new resource with no problem gets no
    # "Degraded=False" Event).
    assert {t.type for t in tr} == {"Ready", "Progressing"}


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


RAY_MISMATCH_LOG = """Traceback (most recent call last):
  File "/usr/local/bin/ray", line 8, in <module>
RuntimeError: Version mismatch: The cluster was started with:
    Ray: 2.60.0
    Python: 3.11.7
This process on node 10.0.3.7 was started with:
    Ray: 2.61.1
    Python: 3.11.9
"""


def _crashing(name: str, comp: str, terminated: dict | None) -> dict:
    cs = {"name": "ray", "restartCount": 4,
          "state": {"waiting": {"reason": "CrashLoopBackOff",
                                "message": f"back-off 1m20s restarting failed container=ray pod={name}"}}}
    if terminated is not None:
        cs["lastState"] = {"terminated": terminated}
    return {"metadata": {"name": name, "labels": {"app.kubernetes.io/component": comp}}, "spec": {"nodeName": "n1"},
            "status": {"conditions": [{"type": "PodScheduled", "status": "True"}], "containerStatuses": [cs]}}


def test_a_new_image_with_another_ray_version_says_so_and_what_to_do() -> None:
    """The first pool pod of an image with another Ray version cannot join the running head: the status
    names both versions and the way out, not the kubelet's back-off."""
    pv = pod_view(_crashing("dots-vision-new", "vision",
                            {"exitCode": 1, "reason": "Error", "message": RAY_MISMATCH_LOG}))
    st, _ = run([ready("h", "ray-head")] + [ready(f"v{i}", "vision") for i in range(3)] + [pv, ready("l1", "llm")],
                ServeObservation(URL, True, "RUNNING"))
    msg = cond(st, "Degraded").message
    assert cond(st, "Degraded").reason == "PodFailing"
    assert "dots-vision-new" in msg and "exited with code 1" in msg
    assert "head runs Ray 2.60.0 (Python 3.11.7), this image has Ray 2.61.1 (Python 3.11.9)" in msg
    assert "set spec.image back" in msg and "back-off" not in msg


def test_a_crash_loop_quotes_the_last_line_the_container_wrote() -> None:
    pv = pod_view(_crashing("dots-llm-x", "llm", {"exitCode": 137, "message": "loading shard 3\nOSError: no space left\n"}))
    assert pv.problem == ("CrashLoopBackOff: the container exited with code 137: OSError: no space left "
                          "(kubectl logs --previous has the rest).")
    # Before the first restart is recorded, the kubelet's own message is all there is.
    assert pod_view(_crashing("dots-llm-y", "llm", None)).problem.startswith("CrashLoopBackOff: back-off")


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


def test_a_new_resource_gets_one_event_while_it_starts_not_one_per_condition() -> None:
    pods = [PodView("h", "ray-head", scheduled=True)]
    st, tr = run(pods, ServeObservation(URL, False, "Unknown", "no head yet"))
    assert cond(st, "Ready").status == "False" and cond(st, "Progressing").status == "True"
    assert cond(st, "Ready").reason == cond(st, "Progressing").reason
    assert [(t.type, t.status) for t in tr] == [("Ready", "False")]
    # A problem on a new resource is told at once.
    st, tr = run([PodView("h", "ray-head", unschedulable=SCHED)], ServeObservation(URL, False, "Unknown", "no head yet"))
    assert any(t.type == "Degraded" and t.status == "True" and t.warning for t in tr)


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


# --- autoscaling: Serve's targets, the policy's decisions, the queue and the SLOs ------------------------

from dotsvlm_operator import pod_sizing  # noqa: E402
from dotsvlm_operator.ingress_client import parse_report  # noqa: E402
from dotsvlm_operator.ray_head import DeploymentView, ReplicaView, ServeApp  # noqa: E402
from dotsvlm_operator.status import scaling_events  # noqa: E402

T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def autoscaled_spec() -> models.DotsVLMDeploymentSpec:
    return models.DotsVLMDeploymentSpec.model_validate({
        "image": "img", "model": {"path": "/models/x", "volume": {"persistentVolumeClaim": {"claimName": "w"}}},
        "vision": {"gpusPerReplica": 1, "minReplicas": 1, "maxReplicas": 8},
        "llm": {"gpusPerReplica": 8, "minReplicas": 1, "maxReplicas": 4},
        "slo": {"imageTTFTSeconds": 2.0, "textTTFTSeconds": 1.0, "interTokenSeconds": 0.1},
    })


def report(vision_desired=3, reason="VisionBacklog", t=T0, **slo):
    return parse_report({
        "decisions": {
            "vision": {"desired": vision_desired, "current": 2, "raw": 4, "reason": reason, "signal": reason,
                       "message": "backlog 9 Mpx",
                       "direction": "up", "time": t, "last_change": {"reason": reason, "message": "backlog 9 Mpx", "time": t}},
            "llm": {"desired": 1, "current": 1, "raw": 1, "reason": "MetricsStale", "message": "signals are 40 s old",
                    "direction": "hold", "time": t, "last_change": {"reason": None, "message": None, "time": None}}},
        "queue": {"depth": 7, "bytes": 1000, "oldest_age_s": 1.234, "waiting_producers": 1, "max_items": 64, "leased": 3,
                  "rejected_total": 2, "redelivered_total": 0},
        "slo": {"ttft_image_p90_s": 2.5, "ttft_text_p90_s": 0.4, "inter_token_p90_s": None, "encode_latency_p90_s": 0.3,
                **slo},
        "admission": {"ingress_replicas": 2, "vision_replicas": 2, "pending_pixels": 9_000_000,
                      "pending_pixels_limit": 268_435_456, "image_bytes": 5_000_000, "image_bytes_limit": 4 * 2**30,
                      "rejected": {"vision_backlog_full": 3, "queue_full": 2}, "rejected_total": 5}},
        url="http://dots-api.ml.svc:8000/-/autoscaler")


def serve_obs(vision_target=3, running=2):
    reps = tuple(ReplicaView("RUNNING", f"10.0.0.{i}") for i in range(running))
    app = ServeApp("RUNNING", "", {"VisionEncoder": DeploymentView(vision_target, reps),
                                   "LLMServer": DeploymentView(1, (ReplicaView("RUNNING", "10.0.1.0"),))})
    return ServeObservation(URL, True, "RUNNING", app=app)


def autoscaled_pods(vision=2):
    return ([ready("h", "ray-head")] + [PodView(f"v{i}", "vision", True, True, ip=f"10.0.0.{i}") for i in range(vision)]
            + [PodView("l0", "llm", True, True, ip="10.0.1.0")])


def run_autoscaled(pods, serve, rep, old=None, now_unix=T0 + 1):
    s = autoscaled_spec()
    plans = {pool: pod_sizing.plan_pool(getattr(s, pool), deployment=serve.app.deployments[name], raw_wish=None,
                                        pods=[p for p in pods if p.component == pool], previous_replicas=None)
             for pool, name in (("vision", "VisionEncoder"), ("llm", "LLMServer"))}
    desired = {"vision": serve.app.deployments["VisionEncoder"].target, "llm": 1}
    return compute_status(spec=s, generation=1, pods=pods, desired=desired, serve=serve, endpoint="e", old=old,
                          now="2026-01-01T00:00:01Z", plans=plans, report=rep, now_unix=now_unix)


def test_pool_status_shows_serves_target_current_pods_and_the_decision() -> None:
    st, _ = run_autoscaled(autoscaled_pods(2), serve_obs(3, 2), report())
    v = st.vision
    assert (v.desired_replicas, v.current_replicas, v.ready_replicas, v.desired_pods, v.pods) == (3, 2, 2, 3, 2)
    assert v.ready_of_desired == "2/3" and v.pods_reason == pod_sizing.SERVE_TARGET
    assert v.last_decision.reason == "VisionBacklog" and v.last_decision.direction == "up"
    assert v.last_decision.signal == "VisionBacklog" and st.llm.last_decision.signal is None  # an older serving: unset
    assert v.last_decision.time == "2026-01-01T00:00:00Z" and v.last_scale.reason == "VisionBacklog"
    # Missing or stale metrics: the decision says so, in the status.
    assert st.llm.last_decision.reason == "MetricsStale" and "40 s old" in st.llm.last_decision.message
    assert st.llm.last_scale is None
    # Growing on demand is Progressing, not un-Ready.
    assert cond(st, "Ready").status == "True" and cond(st, "Progressing").reason == "Scaling"


def test_queue_and_slo_against_the_targets() -> None:
    st, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report())
    assert st.queue.depth == 7 and st.queue.oldest_age_seconds == 1.23 and st.queue.rejected_total == 2
    assert st.queue.leased == 3 and st.to_api()["queue"]["leased"] == 3
    assert st.slo.image_ttft.met is False and st.slo.image_ttft.target_seconds == 2.0
    assert st.slo.text_ttft.met is True and st.slo.inter_token.met is None  # no data: neither met nor missed
    api = st.to_api()
    assert api["slo"]["imageTTFT"]["observedP90Seconds"] == 2.5 and api["queue"]["oldestAgeSeconds"] == 1.23
    assert st.autoscaler.reachable


def test_backpressure_refusals_are_in_the_status_by_reason() -> None:
    st, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report())
    bp = st.to_api()["backpressure"]
    assert bp["rejectedTotal"] == 5 and bp["rejected"] == {"queue_full": 2, "vision_backlog_full": 3}
    assert bp["visionPendingPixels"] == 9_000_000 and bp["visionPendingPixelsLimit"] == 268_435_456
    assert bp["imageBytes"] == 5_000_000 and bp["observedTime"] == "2026-01-01T00:00:01Z"
    # An ingress from before this report (no admission section): nothing made up.
    older = report()
    older.admission = None
    st, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), older)
    assert st.backpressure is None


def test_unreachable_ingress_keeps_the_last_figures_and_says_so() -> None:
    first, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report())
    down = parse_report(None, url="http://dots-api.ml.svc:8000/-/autoscaler")
    down = down.model_copy(update={"error": "cannot reach the API at http://dots-api.ml.svc:8000/-/autoscaler (ConnectError)"})
    st, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), down, old=first)
    assert not st.autoscaler.reachable and "cannot reach the API" in st.autoscaler.message
    assert st.queue == first.queue and st.vision.last_decision == first.vision.last_decision
    assert cond(st, "Degraded").status == "False"


def test_queue_figures_are_written_at_most_every_few_seconds() -> None:
    first, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report())
    busy = report()
    busy.queue.depth = 9
    soon, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), busy, old=first, now_unix=T0 + 3)
    assert soon.queue.depth == 7
    later, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), busy, old=first, now_unix=T0 + 30)
    assert later.queue.depth == 9


def test_the_status_says_when_refusals_were_last_seen_to_grow() -> None:
    """rejectedTotal counts since the replicas started: the time it last grew says whether they are recent."""
    first, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report())
    assert first.queue.last_rejection_time == "2026-01-01T00:00:01Z"
    assert first.backpressure.last_rejection_time == "2026-01-01T00:00:01Z"
    # Nothing new refused a minute later: the time stays (the queue's depth moved, so it was written).
    calm = report()
    calm.queue.depth = 3
    later, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), calm, old=first, now_unix=T0 + 61)
    assert later.queue.depth == 3 and later.queue.last_rejection_time == "2026-01-01T00:00:01Z"
    assert later.backpressure.last_rejection_time == "2026-01-01T00:00:01Z"
    # More refusals (the vision stage's only): only the backpressure's time moves.
    more = report()
    more.admission.rejected_total = 9
    again, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), more, old=later, now_unix=T0 + 121)
    assert again.backpressure.last_rejection_time == "2026-01-01T00:02:01Z"
    assert again.queue.last_rejection_time == "2026-01-01T00:00:01Z"
    assert again.to_api()["backpressure"]["lastRejectionTime"] == "2026-01-01T00:02:01Z"
    # A queue that never refused has no time.
    none = report()
    none.queue.rejected_total = 0
    quiet, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), none)
    assert quiet.queue.last_rejection_time is None


def test_an_event_per_change_of_the_desired_replicas() -> None:
    first, _ = run_autoscaled(autoscaled_pods(2), serve_obs(2, 2), report(vision_desired=2))
    known = {"vision": True, "llm": True}
    assert scaling_events(first, first, report(), known) == []
    second, _ = run_autoscaled(autoscaled_pods(2), serve_obs(3, 2), report(), old=first)
    evs = scaling_events(first, second, report(), known)
    assert [(e.pool, e.reason) for e in evs] == [("vision", "VisionBacklog")]
    assert evs[0].message == "vision pool: 2 -> 3 replicas: backlog 9 Mpx"
    # The same decision again (the policy publishes every 2 s): no second Event.
    third, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report(), old=second)
    assert scaling_events(second, third, report(), known) == []
    # Serve's target unknown (head unreachable): no decision, no Event.
    assert scaling_events(first, second, report(), {"vision": False, "llm": True}) == []


def test_pod_view_reads_ip_and_deletion_cost() -> None:
    raw = {"metadata": {"name": "p", "labels": {"app.kubernetes.io/component": "vision"},
                        "annotations": {"controller.kubernetes.io/pod-deletion-cost": "1000"}},
           "spec": {"nodeName": "n"}, "status": {"podIP": "10.1.2.3"}}
    pv = pod_view(raw)
    assert pv.ip == "10.1.2.3" and pv.deletion_cost == "1000"


def test_latencies_refresh_even_when_the_queue_stays_the_same() -> None:
    first, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report())
    faster = report(ttft_image_p90_s=1.5)
    later, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), faster, old=first, now_unix=T0 + 30)
    assert later.queue == first.queue and later.slo.image_ttft.met is True


def test_llm_pool_at_zero_is_not_ready_and_says_what_to_do() -> None:
    s = spec(minReplicas=0, maxReplicas=2)
    pods = [ready("h", "ray-head")] + [ready(f"v{i}", "vision") for i in range(4)]
    st, tr = run(pods, ServeObservation(URL, True, "RUNNING"), s=s, desired={"vision": 4, "llm": 0})
    r = cond(st, "Ready")
    assert r.status == "False" and r.reason == "NoLLMReplica"
    assert "no request can be answered" in r.message and "set llm.minReplicas to 1 or more" in r.message
    # Nothing is on its way: the spec holds the pool at zero.
    assert cond(st, "Progressing").status == "False"
    # One LLM replica (two pods of a two-node replica) ready: Ready again.
    st, _ = run(pods + [ready("l0", "llm"), ready("l1", "llm")], ServeObservation(URL, True, "RUNNING"), s=s,
                old=st, desired={"vision": 4, "llm": 1})
    assert cond(st, "Ready").status == "True"


def test_vision_pool_at_zero_is_ready_for_text_and_says_images_wait() -> None:
    s = models.DotsVLMDeploymentSpec.model_validate({**spec().model_dump(by_alias=True, exclude_none=True),
                                                     "vision": {"gpusPerReplica": 1, "minReplicas": 0, "maxReplicas": 2}})
    pods = [ready("h", "ray-head"), ready("l0", "llm"), ready("l1", "llm")]
    st, _ = run(pods, ServeObservation(URL, True, "RUNNING"), s=s, desired={"vision": 0, "llm": 1})
    r = cond(st, "Ready")
    assert r.status == "True" and r.reason == "Available"
    assert "vision pool is at zero replicas" in r.message and "images waits until a vision replica has woken up" in r.message


def test_a_corrected_drift_is_kept_in_the_status_until_the_next_one() -> None:
    st, _ = run(healthy_pods(), ServeObservation(URL, True, "RUNNING", drift="args.x: the head runs 1, the spec wants 2"))
    assert "args.x: the head runs 1" in st.serve_app.last_drift and "deployed the spec's config again" in st.serve_app.last_drift
    assert st.serve_app.last_drift_time == "2026-01-01T00:00:00Z"
    again, _ = run(healthy_pods(), ServeObservation(URL, True, "RUNNING"), old=st)
    assert again.serve_app.last_drift == st.serve_app.last_drift and again.serve_app.last_drift_time == st.serve_app.last_drift_time


def test_a_rolling_image_is_progressing_and_says_which_group_is_next() -> None:
    msg = "new image img:2: rolling the vision pool (1 of 4 pods updated, 3 available); then the LLM pool, then the Ray head"
    st, _ = run(healthy_pods(), ServeObservation(URL, True, "RUNNING"), rollout=msg)
    p = cond(st, "Progressing")
    assert p.status == "True" and p.reason == "RollingOut" and p.message.startswith(msg)
    assert cond(st, "Ready").status == "True"


def test_a_head_that_cannot_use_redis_says_what_to_fix() -> None:
    """With gcsFaultTolerance, the head's init container (`dotsvlm check-redis`) ends its log with the reason."""
    line = ("dotsvlm check-redis: error: the Ray head cannot use Redis at redis.redis.svc.cluster.local:6379: "
            "RedisError: Could not establish connection to Redis redis.redis.svc.cluster.local:6379 (context.err = 1) "
            "(check spec.head.gcsFaultTolerance.redisAddress, and that Redis is up and reachable from this namespace)")
    raw = _crashing("dots-ray-head-x", "ray-head", {"exitCode": 1, "message": line + "\n"})
    raw["status"]["initContainerStatuses"] = raw["status"].pop("containerStatuses")
    pv = pod_view(raw)
    st, _ = run([pv] + [ready(f"v{i}", "vision") for i in range(4)] + [ready("l1", "llm")],
                ServeObservation(URL, False, "Unknown", "no head"))
    msg = cond(st, "Degraded").message
    assert "dots-ray-head-x" in msg and "gcsFaultTolerance.redisAddress" in msg and "..." not in msg, msg


def test_an_api_pool_without_a_ready_pod_is_not_ready_and_says_why() -> None:
    s = models.DotsVLMDeploymentSpec.model_validate({**spec().model_dump(by_alias=True, exclude_none=True),
                                                     "apiPool": {"replicas": 2}})
    serve = ServeObservation(URL, True, "RUNNING")
    st, _ = run(healthy_pods() + [PodView("a0", "api-pool", scheduled=True), PodView("a1", "api-pool", scheduled=True)],
                serve, s=s)
    assert cond(st, "Ready").status == "False" and cond(st, "Ready").reason == "APIPodsNotReady"
    assert "0 of 2" in cond(st, "Ready").message and st.api_pool.pods == 2 and st.api_pool.ready_pods == 0
    st, _ = run(healthy_pods() + [ready("a0", "api-pool"), PodView("a1", "api-pool", unschedulable=SCHED)], serve, s=s)
    assert cond(st, "Ready").status == "True" and cond(st, "Progressing").reason == "Scaling"
    assert cond(st, "Degraded").reason == "Unschedulable" and "apiPool.resources" in cond(st, "Degraded").message
    st, _ = run(healthy_pods() + [ready("a0", "api-pool"), ready("a1", "api-pool")], serve, s=s)
    assert cond(st, "Ready").status == "True" and st.api_pool.ready_pods == 2
    assert run(healthy_pods(), serve)[0].api_pool is None


def test_ready_pods_whose_llm_replica_still_starts_are_not_ready_and_say_why() -> None:
    """The LLM pool woke from zero: its pods are ready Ray nodes, the application stays RUNNING, but the
    replica still loads the model, so nothing can be answered yet: not Ready until Serve runs it."""
    s = spec(minReplicas=0, maxReplicas=2)
    pods = healthy_pods()

    def obs(llm_state: str | None, vision_state: str = "RUNNING") -> ServeObservation:
        vision = tuple(ReplicaView(vision_state, f"10.0.0.{i}") for i in range(4))
        llm = (ReplicaView(llm_state, "10.0.1.0"),) if llm_state else ()
        app = ServeApp("RUNNING", "", {"VisionEncoder": DeploymentView(4, vision), "LLMServer": DeploymentView(1, llm)})
        return ServeObservation(URL, True, "RUNNING", app=app)

    st, _ = run(pods, obs("STARTING"), s=s)
    r = cond(st, "Ready")
    assert r.status == "False" and r.reason == "LLMReplicaStarting"
    assert "1 STARTING" in r.message and "loads the model" in r.message
    assert cond(st, "Progressing").status == "True"
    st, _ = run(pods, obs(None), s=s, old=st)
    assert cond(st, "Ready").reason == "LLMReplicaStarting" and "none yet" in cond(st, "Ready").message
    st, _ = run(pods, obs("RUNNING"), s=s, old=st)
    assert cond(st, "Ready").status == "True"
    # A vision replica starting: text is answered (Ready), the status says images wait.
    st, _ = run(pods, obs("RUNNING", vision_state="STARTING"), s=s, old=st)
    assert cond(st, "Ready").status == "True" and cond(st, "Progressing").reason == "VisionReplicaStarting"


def test_refused_children_show_as_degraded_reconcile_failed_beside_the_pools_findings() -> None:
    """A child the API server refuses no longer ends the pass: the status is still computed from the pods, with
    Degraded=ReconcileFailed quoting the refusal first, and it clears once nothing is refused."""
    words = "Service dots-api: LoadBalancer Services are not allowed in this namespace"
    pods = healthy_pods()[:-1] + [PodView("l1", "llm", ready=False, scheduled=False, unschedulable=SCHED)]
    st, tr = compute_status(spec=spec(), generation=3, pods=pods, desired={"vision": 4, "llm": 1}, serve=None,
                            endpoint="e", old=None, now="2026-01-01T00:00:00Z", refused=[words])
    degraded = cond(st, "Degraded")
    assert (degraded.status, degraded.reason) == ("True", "ReconcileFailed")
    assert degraded.message.startswith(f"the operator could not reconcile this resource and will retry: {words}")
    assert "1 of 2 LLM pods pending" in degraded.message  # the pods' own findings are still there
    assert st.vision.ready_replicas == 4
    assert [t.reason for t in tr if t.type == "Degraded"] == ["ReconcileFailed"]
    fixed, tr = compute_status(spec=spec(), generation=3, pods=healthy_pods(), desired={"vision": 4, "llm": 1},
                               serve=None, endpoint="e", old=st, now="2026-01-01T00:00:10Z")
    assert cond(fixed, "Degraded").reason == "AsExpected"
    assert [t.reason for t in tr if t.type == "Degraded"] == ["AsExpected"]


def test_the_autoscaler_status_does_not_stay_reachable_while_the_head_is_down() -> None:
    """The ingress is asked only while Serve runs; with the head pod not ready (or Serve redeploying), status.autoscaler
    kept its last `reachable: true`, as if the figures below were current."""
    first, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report())
    assert first.autoscaler.reachable
    pods = [PodView("h", "ray-head", ready=False, scheduled=True)] + autoscaled_pods(3)[1:]
    st, _ = compute_status(spec=autoscaled_spec(), generation=1, pods=pods, desired={"vision": 3, "llm": 1},
                           serve=None, endpoint="e", old=first, now="2026-01-01T00:00:05Z", report=None)
    assert not st.autoscaler.reachable and "the Ray head pod is not ready" in st.autoscaler.message
    assert st.autoscaler.url == first.autoscaler.url and st.queue == first.queue  # the last figures stay
    again, _ = compute_status(spec=autoscaled_spec(), generation=1, pods=pods, desired={"vision": 3, "llm": 1},
                              serve=None, endpoint="e", old=st, now="2026-01-01T00:00:10Z", report=None)
    assert again.autoscaler == st.autoscaler  # no status write on every pass
    back, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report(), old=again)
    assert back.autoscaler.reachable


def test_a_new_slo_target_shows_at_once_against_the_last_observed_latencies() -> None:
    """status.slo kept the old targets (and met) until the next report, none while the head is down; a user who
    raised slo.imageTTFTSeconds from 2 to 3 s still read met: false against 2 s."""
    first, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report())
    assert (first.slo.image_ttft.target_seconds, first.slo.image_ttft.met) == (2.0, False)
    raw = autoscaled_spec().model_dump(by_alias=True, exclude_none=True)
    raw["slo"]["imageTTFTSeconds"] = 3.0
    pods = [PodView("h", "ray-head", ready=False, scheduled=True)] + autoscaled_pods(3)[1:]
    st, _ = compute_status(spec=models.DotsVLMDeploymentSpec.model_validate(raw), generation=2, pods=pods,
                           desired={"vision": 3, "llm": 1}, serve=None, endpoint="e", old=first,
                           now="2026-01-01T00:00:05Z", report=None)
    assert (st.slo.image_ttft.target_seconds, st.slo.image_ttft.met) == (3.0, True)
    assert st.slo.image_ttft.observed_p90_seconds == first.slo.image_ttft.observed_p90_seconds
    assert st.slo.text_ttft == first.slo.text_ttft


def test_a_prometheus_rule_the_operator_cannot_create_is_noted_in_ready() -> None:
    """monitoring.prometheusRule: true without the PrometheusRule CRD created nothing and said nothing: the user
    believed the deployment's alerts were loaded. Ready's message now says so (and what to do)."""
    from dotsvlm_operator.status import monitoring_notes

    raw = spec().model_dump(by_alias=True, exclude_none=True)
    raw["monitoring"] = {"prometheusRule": True}
    wants_rule = models.DotsVLMDeploymentSpec.model_validate(raw)
    notes = monitoring_notes(wants_rule, {"PodMonitor": False, "PrometheusRule": False})
    assert len(notes) == 1 and "PrometheusRule CRD" in notes[0]
    assert monitoring_notes(wants_rule, {"PodMonitor": False, "PrometheusRule": True}) == []
    assert monitoring_notes(spec(), {"PodMonitor": False, "PrometheusRule": False}) == []  # not asked for
    raw["monitoring"]["enabled"] = False
    assert monitoring_notes(models.DotsVLMDeploymentSpec.model_validate(raw), {}) == []
    st, _ = compute_status(spec=wants_rule, generation=3, pods=healthy_pods(), desired={"vision": 4, "llm": 1},
                           serve=ServeObservation(URL, True, "RUNNING"), endpoint="e", old=None,
                           now="2026-01-01T00:00:00Z", notes=notes)
    ready = cond(st, "Ready")
    assert ready.status == "True" and "no alert rules were created" in ready.message


def test_queue_figures_written_on_a_clock_ahead_do_not_freeze_the_status() -> None:
    """The queue, SLO and backpressure figures are refreshed at most every 10 s, judged by their observedTime.
    Written by an operator pod on a node whose clock ran 10 minutes ahead (or before NTP stepped this one
    back), they were held for those 10 minutes: `kubectl get` showed a queue long gone. A time ahead of now
    is refreshed at once."""
    first, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report(), now_unix=T0 + 600)
    assert first.queue.depth == 7 and first.queue.observed_time == "2026-01-01T00:10:00Z"
    emptied = report()
    emptied.queue.depth = 0
    st, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), emptied, old=first, now_unix=T0 + 5)
    assert st.queue.depth == 0 and st.queue.observed_time == "2026-01-01T00:00:05Z"
    held, _ = run_autoscaled(autoscaled_pods(3), serve_obs(3, 3), report(), old=st, now_unix=T0 + 9)
    assert held.queue.depth == 0, "within 10 s of the last write the figures are kept"
