"""Nothing lost on updates (issue 14), operator side, on the test control plane (pods on kwok).

The status never says Ready while the pool every request needs has no replica; a new image rolls the
pools one at a time (so does any change that reaches every Ray pod); the NetworkPolicy admits the
operator only from its own namespace. The Ray head is the fake one (tests/support/fake_ray_head.py), which plays Serve's targets and replicas.
"""

from __future__ import annotations

import json

import pytest
import yaml
from dvlm_support import condition, get_json, load_example, poll

from support.fake_ray_head import LLM, VISION, FakeRayHead

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


NAMESPACE_PREFIX = "safe"  # the `ns` fixture (conftest.py) names test namespaces after it


@pytest.fixture
def fake_head():
    head = FakeRayHead()
    url = head.start()
    yield head, url
    head.stop()


def _small(name: str) -> dict:
    cr = load_example("dotsvlm-small.yaml")
    cr["metadata"]["name"] = name
    cr["spec"]["model"]["volume"] = {"hostPath": {"path": "/mnt/weights"}}
    return cr


def test_llm_pool_at_zero_is_not_ready_and_says_why(kube, ns, fake_head, operator_factory) -> None:
    head, url = fake_head
    op = operator_factory([ns], head_url=url, extra=["--api-url-override", url, "--pod-loop-seconds", "1"])
    name = "dots-zero"
    cr = _small(name)
    cr["spec"]["llm"].update(minReplicas=0, maxReplicas=2)
    head.set_deployment(LLM, 0)
    kube.apply(yaml.safe_dump(cr), namespace=ns)

    def ready_condition():
        return condition(get_json(kube, "dvlm", name, "-n", ns), "Ready")

    def diag() -> str:
        return f"status: {(get_json(kube, 'dvlm', name, '-n', ns) or {}).get('status')}\n{op.log_tail()}"

    # The head, the vision pool and the Serve app are fine; the LLM pool has no replica: not Ready.
    poll(lambda: head.deployed, 60, "the Serve config deployed to the fake head", op.log_tail)
    vision_ip = poll(lambda: [p["status"].get("podIP") for p in get_json(
        kube, "pods", "-n", ns, "-l", f"dotsvlm.io/deployment={name},app.kubernetes.io/component=vision")["items"]
        if p["status"].get("podIP")], 60, "the vision pod", diag)[0]
    head.set_deployment(VISION, 1, [("RUNNING", vision_ip)])
    cond = poll(lambda: (c := ready_condition()) and c["reason"] == "NoLLMReplica" and c, 90,
                "Ready=False with reason NoLLMReplica", diag)
    assert cond["status"] == "False"
    assert "no request can be answered" in cond["message"] and "set llm.minReplicas to 1 or more" in cond["message"]
    assert get_json(kube, "deployment", f"{name}-llm", "-n", ns)["spec"]["replicas"] == 0
    # The autoscaler wakes the pool: its pod is ready, but the replica still loads the model -> not Ready yet.
    head.set_deployment(LLM, 1, [("STARTING", None)])
    cond = poll(lambda: (c := ready_condition()) and c["reason"] == "LLMReplicaStarting" and c, 90,
                "Ready=False with reason LLMReplicaStarting while the LLM replica starts", diag)
    assert cond["status"] == "False" and "1 STARTING" in cond["message"]
    # The replica runs -> Ready.
    head.set_deployment(LLM, 1, [("RUNNING", None)])
    poll(lambda: (c := ready_condition()) and c["status"] == "True", 90, "Ready=True once an LLM replica runs", diag)


def _deployments(kube, ns: str, name: str) -> dict[str, dict]:
    items = get_json(kube, "deployments", "-n", ns, "-l", f"dotsvlm.io/deployment={name}")["items"]
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in items}


def _image(dep: dict) -> str:
    return dep["spec"]["template"]["spec"]["containers"][0]["image"]


def _complete(dep: dict) -> bool:
    st, want = dep.get("status") or {}, dep["spec"]["replicas"]
    return (st.get("observedGeneration", 0) >= dep["metadata"]["generation"] and st.get("updatedReplicas", 0) == want
            and st.get("replicas", 0) == want and st.get("availableReplicas", 0) == want)


def _watch_roll_order(kube, ns: str, name: str, took, status, diag,
                      groups: tuple[str, ...] = ("vision", "llm", "ray-head")) -> set[str]:
    """Watch the Ray Deployments until each has taken the change (`took(deployment)`): each must take it
    only once the one before has finished its rollout (`groups`, in order). The RollingOut messages seen."""
    order: list[str] = []
    rolling_messages: set[str] = set()
    polls = 0
    while len(order) < len(groups):
        polls += 1
        assert polls < 1200, f"the rollout did not finish: {order}\n{diag()}"
        deps = _deployments(kube, ns, name)
        for component, before in zip(groups, (None, *groups[:-1])):
            if component in order or not took(deps[component]):
                continue
            if before is not None:
                assert order and order[-1] == before, f"{component} took the change before {before}: {order}"
                assert _complete(deps[before]), f"{component} took the change while {before} still rolled: {deps[before]['status']}"
            order.append(component)
        progressing = condition({"status": status()}, "Progressing") or {}
        if progressing.get("reason") == "RollingOut":
            rolling_messages.add(progressing["message"])
    assert order == list(groups)
    return rolling_messages


def test_a_new_image_rolls_vision_then_llm_then_head_each_after_the_last_finished(kube, ns, fake_head,
                                                                                  operator_factory) -> None:
    head, url = fake_head
    op = operator_factory([ns], head_url=url, extra=["--api-url-override", url, "--pod-loop-seconds", "1"])
    name = "dots-roll"
    cr = _small(name)
    cr["spec"]["image"] = "dotsvlm-serving:1"
    cr["spec"]["vision"].update(minReplicas=2, maxReplicas=2)
    head.set_deployment(VISION, 2)
    kube.apply(yaml.safe_dump(cr), namespace=ns)

    def status() -> dict:
        return (get_json(kube, "dvlm", name, "-n", ns) or {}).get("status") or {}

    def diag() -> str:
        return f"status: {status()}\n{op.log_tail()}"

    poll(lambda: (c := condition({"status": status()}, "Ready")) and c["status"] == "True", 120, "Ready", diag)
    deps = _deployments(kube, ns, name)
    assert {_image(d) for d in deps.values()} == {"dotsvlm-serving:1"}

    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge", "-p", '{"spec":{"image":"dotsvlm-serving:2"}}')
    # Each of the three Deployments takes the new image only once the one before has finished.
    messages = _watch_roll_order(kube, ns, name, lambda d: _image(d) == "dotsvlm-serving:2", status, diag)
    assert any(m.startswith("new image dotsvlm-serving:2: rolling the vision pool")
               and "then the LLM pool, then the Ray head" in m for m in messages), messages
    # Every pool pod of the new image drains its Ray node when it stops.
    for pod in get_json(kube, "pods", "-n", ns, "-l", f"dotsvlm.io/deployment={name},app.kubernetes.io/component in (vision,llm)")["items"]:
        c = pod["spec"]["containers"][0]
        if c["image"] == "dotsvlm-serving:2":
            assert c["lifecycle"]["preStop"]["exec"]["command"][:2] == ["dotsvlm", "drain-node"]
    poll(lambda: (c := condition({"status": status()}, "Progressing")) and c["reason"] != "RollingOut"
         and all(_complete(d) for d in _deployments(kube, ns, name).values()), 120, "the rollout finished", diag)
    # Not only the image: any change that reaches every Ray pod (here a pull secret) rolls the same way, and a
    # group that waits keeps the whole template it runs.
    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge", "-p", '{"spec":{"imagePullSecrets":["regcred"]}}')
    messages = _watch_roll_order(kube, ns, name, lambda d: d["spec"]["template"]["spec"].get("imagePullSecrets")
                                 == [{"name": "regcred"}], status, diag)
    assert any(m.startswith("new pod settings: rolling the vision pool") for m in messages), messages
    poll(lambda: (c := condition({"status": status()}, "Progressing")) and c["reason"] != "RollingOut"
         and all(_complete(d) for d in _deployments(kube, ns, name).values()), 120, "the second rollout finished", diag)

    # A new Ray version: one group at a time, the first new vision pod could not join the old head and the
    # rollout would stop there. rolloutStrategy AllAtOnce gives every group the image together: here the new
    # vision pod cannot start at all (no node matches), yet the LLM pool and the head take the image.
    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge", "-p", json.dumps({"spec": {
        "image": "dotsvlm-serving:3", "rolloutStrategy": "AllAtOnce",
        "vision": {"nodeSelector": {"nvidia.com/gpu.product": "no-such-gpu"}}}}))
    deps = poll(lambda: (d := _deployments(kube, ns, name)) and all(_image(x) == "dotsvlm-serving:3" for x in d.values())
                and d, 60, "every group on the new image at once", diag)
    assert not _complete(deps["vision"]), deps["vision"]["status"]  # it did not wait for the vision pool
    rolling = poll(lambda: (c := condition({"status": status()}, "Progressing")) and c["reason"] == "RollingOut"
                   and "rolloutStrategy AllAtOnce" in c["message"] and c, 60, "the AllAtOnce rollout in the status", diag)
    assert "dotsvlm-serving:3: rolling the vision pool" in rolling["message"], rolling


def test_an_api_pool_serves_the_api_service_rolls_before_the_head_and_goes_when_removed(kube, ns, fake_head,
                                                                                        operator_factory) -> None:
    """spec.apiPool: the API Service's endpoints are the API pods, the head stops advertising the control
    resource (the Ingress and the queue can only run on the API pods), a new image rolls vision, LLM, API pool,
    then head; without spec.apiPool again, its pods go and the Service is the head's once more."""
    head, url = fake_head
    op = operator_factory([ns], head_url=url, extra=["--api-url-override", url, "--pod-loop-seconds", "1"])
    name = "dots-api"
    cr = _small(name)
    cr["spec"]["image"] = "dotsvlm-serving:1"
    cr["spec"]["apiPool"] = {"replicas": 2, "resources": {"requests": {"cpu": "1", "memory": "1Gi"}}}
    kube.apply(yaml.safe_dump(cr), namespace=ns)

    def status() -> dict:
        return (get_json(kube, "dvlm", name, "-n", ns) or {}).get("status") or {}

    def diag() -> str:
        return f"status: {status()}\n{op.log_tail()}"

    def pods(component: str) -> list[dict]:
        return get_json(kube, "pods", "-n", ns, "-l",
                        f"dotsvlm.io/deployment={name},app.kubernetes.io/component={component}")["items"]

    def endpoints() -> set[str]:
        slices = get_json(kube, "endpointslices", "-n", ns, "-l", f"kubernetes.io/service-name={name}-api")["items"]
        return {a for s in slices for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready")
                for a in e["addresses"]}

    poll(lambda: (c := condition({"status": status()}, "Ready")) and c["status"] == "True"
         and (status().get("apiPool") or {}).get("readyPods") == 2, 120, "Ready with 2 API pods ready", diag)
    api_ips = {p["status"]["podIP"] for p in pods("api-pool")}
    assert len(api_ips) == 2
    poll(lambda: endpoints() == api_ips, 60, "the API Service's endpoints are the API pods", diag)
    head_command = _deployments(kube, ns, name)["ray-head"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert not any("dotsvlm_control" in arg for arg in head_command), head_command
    api_command = _deployments(kube, ns, name)["api-pool"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert any("dotsvlm_control" in arg for arg in api_command), api_command

    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge", "-p", '{"spec":{"image":"dotsvlm-serving:2"}}')
    messages = _watch_roll_order(kube, ns, name, lambda d: _image(d) == "dotsvlm-serving:2", status, diag,
                                 groups=("vision", "llm", "api-pool", "ray-head"))
    assert any("then the LLM pool, then the API pool, then the Ray head" in m for m in messages), messages
    poll(lambda: (c := condition({"status": status()}, "Progressing")) and c["reason"] != "RollingOut"
         and all(_complete(d) for d in _deployments(kube, ns, name).values()), 120, "the rollout finished", diag)

    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=json", "-p", '[{"op":"remove","path":"/spec/apiPool"}]')
    poll(lambda: "api-pool" not in _deployments(kube, ns, name) and not pods("api-pool"), 90,
         "the API pool's Deployment and pods gone", diag)
    assert get_json(kube, "pdb", f"{name}-api-pool", "-n", ns) is None
    head_ip = poll(lambda: [p["status"].get("podIP") for p in pods("ray-head") if p["status"].get("podIP")
                            and not p["metadata"].get("deletionTimestamp")], 90, "the head pod", diag)[0]
    poll(lambda: endpoints() == {head_ip}, 120, "the API Service's endpoint is the head again", diag)
    poll(lambda: "apiPool" not in status(), 60, "status.apiPool gone", diag)


def test_network_policy_admits_the_operator_only_from_its_own_namespace(kube, ns, operator_factory) -> None:
    op = operator_factory([ns], extra=["--operator-namespace", "dotsvlm-system"])
    name = "dots-netpol"
    kube.apply(yaml.safe_dump(_small(name)), namespace=ns)
    pol = poll(lambda: get_json(kube, "networkpolicy", f"{name}-ray", "-n", ns), 60, "the NetworkPolicy", op.log_tail)
    peers = pol["spec"]["ingress"][0]["from"]
    # The API server kept both selectors in one peer: operator pods AND in the operator's namespace.
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "dotsvlm-system"}},
            "podSelector": {"matchLabels": {"app.kubernetes.io/name": "dotsvlm-operator"}}} in peers
    assert all(p.get("namespaceSelector") != {} for p in peers)
