"""What wakes a resource's full pass: a spec change or someone else's change to a child, never the echo of
the operator's own writes (kopf's finalizer patch, the token Secret it created, the children it applied).
A burst of creates made a second full pass of most new resources before (a Secret read, a pod list and a
status write each, on a control plane that was already the bottleneck)."""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import kopf
import pytest

from dotsvlm_operator import handlers, naming

NS, NAME = "ns", "demo"
GENERATION_KINDS = {"Deployment", "PodDisruptionBudget", "NetworkPolicy"}  # the API server sets metadata.generation


class FakeKube:
    """The calls reconcile_once makes, answered as an empty cluster would, each write with a new version."""

    def __init__(self) -> None:
        self.version = 100
        self.calls: list[str] = []
        self.objects: dict[str, dict[str, Any]] = {}

    def _stored(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        live = copy.deepcopy(obj)
        live["metadata"]["resourceVersion"] = str(self.version)
        if obj["kind"] in GENERATION_KINDS:
            live["metadata"]["generation"] = 1
        self.objects[f"{obj['kind']}/{obj['metadata']['name']}"] = live
        return live

    def ensure_token(self, owner: naming.Owner, *, new_resource: bool = False) -> tuple[str, str | None]:
        self.calls.append("ensure_token")
        secret = {"kind": "Secret", "metadata": {"name": naming.token_secret_name(owner.name),
                                                 "labels": naming.owned_labels(owner.name)}}
        return "t" * 64, self._stored(secret)["metadata"]["resourceVersion"]

    def has_crd(self, kind: str) -> bool:
        return False

    def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(f"apply {obj['kind']}/{obj['metadata']['name']}")
        return self._stored(obj)

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        self.calls.append(f"get {kind}/{name}")
        return self.objects.get(f"{kind}/{name}")

    def list_pods(self, namespace: str, deployment: str) -> list[dict[str, Any]]:
        self.calls.append("list_pods")
        return []

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self.calls.append("patch_status")

    def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        return None

    def delete(self, kind: str, namespace: str, name: str) -> None:
        self.calls.append(f"delete {kind}/{name}")
        self.objects.pop(f"{kind}/{name}", None)


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> FakeKube:
    fake = FakeKube()
    monkeypatch.setattr(handlers, "_kube", fake)
    monkeypatch.setattr(handlers, "_crds", {})
    monkeypatch.setattr(kopf, "event", lambda *a, **k: None)
    monkeypatch.setattr(handlers.CONFIG, "head_url_override", None)
    monkeypatch.setattr(handlers, "_resources", {})
    return fake


def resource(generation: int = 1, finalizer: bool = False) -> kopf.Body:
    spec = {"image": "img", "model": {"path": "/models/x", "quantization": "none",
                                      "volume": {"persistentVolumeClaim": {"claimName": "w"}}},
            "vision": {"gpusPerReplica": 0}, "llm": {"gpusPerReplica": 0, "tensorParallel": 1}}
    meta: dict[str, Any] = {"name": NAME, "namespace": NS, "uid": "u-1", "generation": generation}
    if finalizer:
        meta["finalizers"] = ["dotsvlm.io/operator"]
    return kopf.Body({"apiVersion": "dotsvlm.io/v1alpha1", "kind": "DotsVLMDeployment", "metadata": meta, "spec": spec})


PLURALS = {"Deployment": ("apps", "v1", "deployments"), "Service": ("", "v1", "services"),
           "ConfigMap": ("", "v1", "configmaps"), "Secret": ("", "v1", "secrets"),
           "PodDisruptionBudget": ("policy", "v1", "poddisruptionbudgets"),
           "NetworkPolicy": ("networking.k8s.io", "v1", "networkpolicies")}


def child_event(live: dict[str, Any], type: str = "ADDED") -> None:
    group, version, plural = PLURALS[live["kind"]]
    asyncio.run(handlers._on_child_event(labels={naming.LABEL_DEPLOYMENT: NAME}, namespace=NS,
                                         name=live["metadata"]["name"], body=kopf.Body(live), type=type,
                                         resource=kopf.Resource(group, version, plural)))


def first_pass(cluster: FakeKube) -> handlers.ResourceState:
    state = handlers._resources[(NS, NAME)] = handlers.ResourceState()
    asyncio.run(handlers.reconcile_once(resource(), logging.getLogger("test"), state))
    state.wake.clear()
    return state


def test_a_new_resource_needs_one_full_pass_the_echoes_of_its_own_writes_wake_none(cluster: FakeKube) -> None:
    state = first_pass(cluster)
    assert "ensure_token" in cluster.calls and "patch_status" in cluster.calls
    assert sum(c.startswith("apply ") for c in cluster.calls) == 9  # the 10th child, the token Secret, is created apart

    # kopf adds its finalizer (same generation), then the watch delivers every object the pass wrote.
    asyncio.run(handlers.on_resource_event(name=NAME, namespace=NS, body=resource(finalizer=True)))
    for live in cluster.objects.values():
        child_event(live)
    assert not state.wake.is_set() and not state.full and not state.dirty

    # A controller's status update of a Deployment keeps its generation: still nothing to do.
    deployment = next(o for o in cluster.objects.values() if o["kind"] == "Deployment")
    child_event(dict(deployment, metadata=dict(deployment["metadata"], resourceVersion="999")), type="MODIFIED")
    assert not state.full


def test_a_spec_change_wakes_a_full_pass(cluster: FakeKube) -> None:
    state = first_pass(cluster)
    asyncio.run(handlers.on_resource_event(name=NAME, namespace=NS, body=resource(generation=2, finalizer=True)))
    assert state.wake.is_set() and state.full


def test_someone_elses_change_to_the_token_secret_is_read_again_on_the_next_pass(cluster: FakeKube) -> None:
    state = first_pass(cluster)
    token_key = f"Secret/{naming.token_secret_name(NAME)}"
    secret = cluster.objects[token_key]
    child_event(dict(secret, metadata=dict(secret["metadata"], resourceVersion="5000")), type="MODIFIED")
    assert state.wake.is_set() and state.full and token_key in state.dirty

    cluster.calls.clear()
    asyncio.run(handlers.reconcile_once(resource(finalizer=True), logging.getLogger("test"), state))
    assert "ensure_token" in cluster.calls and token_key not in state.dirty
    # And a pass with nothing changed reads no Secret and applies nothing.
    cluster.calls.clear()
    asyncio.run(handlers.reconcile_once(resource(finalizer=True), logging.getLogger("test"), state))
    assert "ensure_token" not in cluster.calls and not any(c.startswith("apply ") for c in cluster.calls)


def test_pod_events_reuse_a_fresh_answer_of_the_head_the_timer_always_asks(cluster: FakeKube, monkeypatch) -> None:
    """A rollout or a scale-up brings a stream of pod events, each a light pass: they size the pods from the
    head's last answer while it is younger than the pod loop's period, instead of two HTTP calls each."""
    from dotsvlm_operator import ingress_client
    from dotsvlm_operator.ray_head import ServeApp
    from dotsvlm_operator.status import ServeObservation

    calls = {"head": 0, "ingress": 0}

    async def observe(*_a, **_k):
        calls["head"] += 1
        return ServeObservation(url="http://head", reachable=True, status="RUNNING", app=ServeApp("RUNNING"),
                                drift="told once")

    async def report(*_a, **_k):
        calls["ingress"] += 1
        return None

    monkeypatch.setattr(handlers, "observe_serve", observe)
    monkeypatch.setattr(ingress_client, "fetch_report", report)
    monkeypatch.setattr(handlers.CONFIG, "head_url_override", "http://head")
    monkeypatch.setattr(handlers.CONFIG, "pod_loop_seconds", 5.0)
    state = first_pass(cluster)
    assert calls == {"head": 1, "ingress": 1}
    log = logging.getLogger("test")
    body = resource(finalizer=True)

    for _ in range(3):  # pod events
        asyncio.run(handlers.size_pods_once(body, log, state, reuse_observation=True))
    assert calls == {"head": 1, "ingress": 1}
    assert state.observed is not None and state.observed[1].drift is None  # a drift is not told again
    asyncio.run(handlers.size_pods_once(body, log, state))  # the timer
    assert calls == {"head": 2, "ingress": 2}
    # Older than the period: a pod event asks again.
    state.observed = (state.observed[0] - 5.0, *state.observed[1:])
    asyncio.run(handlers.size_pods_once(body, log, state, reuse_observation=True))
    assert calls == {"head": 3, "ingress": 3}


def test_a_full_pass_builds_the_children_once_and_a_pass_with_nothing_new_builds_none(cluster: FakeKube,
                                                                                       monkeypatch) -> None:
    """The pure builders are a few ms of CPU per resource, shared with the API server in a burst: a new
    resource's pass builds its children once (the rollout plan's templates and the children are the same
    build), and a later pass with the same inputs (the resync) builds nothing."""
    builds = []
    real = handlers._build
    monkeypatch.setattr(handlers, "_build", lambda *a, **k: builds.append(1) or real(*a, **k))
    state = first_pass(cluster)
    assert len(builds) == 1 and any(c.startswith("apply Deployment/") for c in cluster.calls)
    builds.clear()
    monkeypatch.setattr(handlers.CONFIG, "resync_seconds", 0.0)  # forced: every child applied again
    asyncio.run(handlers.reconcile_once(resource(finalizer=True), logging.getLogger("test"), state))
    assert builds == []


def test_a_restarted_operator_that_cannot_read_the_status_keeps_the_pools_live_sizes(cluster: FakeKube) -> None:
    """After a downgrade the stored status may hold a field this version does not know, and cannot be read:
    the pools keep their live Deployments' sizes (sizing them at minReplicas would remove pods that still host
    replicas), and a new resource (no status at all) reads no Deployment."""
    first_pass(cluster)
    assert not any(c.startswith("get Deployment/") for c in cluster.calls)
    vision = naming.pool_name(NAME, naming.COMPONENT_VISION)
    cluster.objects[f"Deployment/{vision}"]["spec"]["replicas"] = 3  # the pod loop grew the pool
    assert handlers._old_status(body := kopf.Body({**resource(finalizer=True),
                                                   "status": {"vision": {"desiredPods": 3, "fromANewerVersion": 1}}})) is None

    restarted = handlers._resources[(NS, NAME)] = handlers.ResourceState()
    cluster.calls.clear()
    asyncio.run(handlers.reconcile_once(body, logging.getLogger("test"), restarted))
    assert f"get Deployment/{vision}" in cluster.calls
    assert cluster.objects[f"Deployment/{vision}"]["spec"]["replicas"] == 3


def test_an_api_pool_left_from_a_spec_changed_while_the_operator_was_down_is_deleted_once(cluster: FakeKube) -> None:
    """spec.apiPool removed while the operator was down: its Deployment is read once after the restart (the
    watch's first list may come before the resource is known) and deleted; later passes do not read it again."""
    first_pass(cluster)
    api_pool = naming.pool_name(NAME, naming.COMPONENT_API_POOL)
    cluster.objects[f"Deployment/{api_pool}"] = {"kind": "Deployment", "metadata": {"name": api_pool}}
    body = kopf.Body({**resource(finalizer=True), "status": {"phase": "Ready"}})
    restarted = handlers._resources[(NS, NAME)] = handlers.ResourceState()
    cluster.calls.clear()
    asyncio.run(handlers.reconcile_once(body, logging.getLogger("test"), restarted))
    assert f"get Deployment/{api_pool}" in cluster.calls and f"delete Deployment/{api_pool}" in cluster.calls
    cluster.calls.clear()
    restarted.full = True
    asyncio.run(handlers.reconcile_once(body, logging.getLogger("test"), restarted))
    assert f"get Deployment/{api_pool}" not in cluster.calls


def test_a_refused_child_leaves_the_pod_loop_running_and_retries_the_full_pass_later(cluster: FakeKube,
                                                                                    monkeypatch) -> None:
    """A child the API server keeps refusing (a LoadBalancer Service an admission policy forbids) made every pass a
    full one, each after a doubling backoff up to the resync period: the pools followed the autoscaler once a
    minute instead of every pod loop, though the status said they kept following it. Now the light passes go on
    between the full pass's retries, and the status keeps naming the refused child."""
    import time

    from kubernetes.client.rest import ApiException

    def refuse_services(obj: dict[str, Any]) -> dict[str, Any]:
        if obj["kind"] == "Service":
            cluster.calls.append(f"refused {obj['kind']}/{obj['metadata']['name']}")
            exc = ApiException(status=403, reason="Forbidden")
            exc.body = '{"message": "LoadBalancer Services are not allowed in this namespace"}'
            raise exc
        return FakeKube.apply(cluster, obj)
    written: list[dict[str, Any]] = []
    monkeypatch.setattr(cluster, "apply", refuse_services)
    monkeypatch.setattr(cluster, "patch_status", lambda namespace, name, status: written.append(status))
    monkeypatch.setattr(handlers.CONFIG, "pod_loop_seconds", 0.02)
    monkeypatch.setattr(handlers.CONFIG, "resync_seconds", 60.0)
    passes: list[str] = []
    full_pass, light_pass = handlers.reconcile_once, handlers.size_pods_once

    async def counted_full(*args: Any, **kwargs: Any) -> None:
        passes.append("full")
        await full_pass(*args, **kwargs)

    async def counted_light(*args: Any, **kwargs: Any) -> None:
        passes.append("light")
        await light_pass(*args, **kwargs)
    monkeypatch.setattr(handlers, "reconcile_once", counted_full)
    monkeypatch.setattr(handlers, "size_pods_once", counted_light)

    class Stopped:
        def __init__(self) -> None:
            self.event = asyncio.Event()

        def __bool__(self) -> bool:
            return self.event.is_set()

        async def wait(self) -> None:
            await self.event.wait()

    async def run() -> None:
        stopped = Stopped()
        daemon = asyncio.ensure_future(handlers.reconciler(name=NAME, namespace=NS, body=resource(finalizer=True),
                                                           stopped=stopped, logger=logging.getLogger("test")))
        deadline = time.monotonic() + 10
        while not cluster.calls.count("list_pods") and time.monotonic() < deadline:  # the full pass's end
            await asyncio.sleep(0.01)
        deadline = time.monotonic() + 1.0  # well within the first retry's 2 s backoff
        while passes.count("light") < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        stopped.event.set()
        await asyncio.wait_for(daemon, 5)
    asyncio.run(run())

    assert passes[0] == "full" and passes.count("light") >= 5, passes
    assert passes.count("full") == 1, passes  # the refused Service is retried by a full pass after the backoff
    refused = [c for c in cluster.calls if c.startswith("refused ")]
    assert refused and len(refused) == len(set(refused)), refused  # each sent once, not on every light pass
    assert cluster.calls.count("list_pods") == 1  # the light passes read pods from the watch's cache
    degraded = [c for st in written for c in st.get("conditions", []) if c["type"] == "Degraded"]
    assert degraded and all(c["reason"] == "ReconcileFailed" for c in degraded), degraded
    assert f"Service {NAME}-api: LoadBalancer Services are not allowed" in degraded[-1]["message"]
