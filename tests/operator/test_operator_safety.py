"""Nothing lost on updates (issue 14), operator side, on the test control plane (pods on kwok).

The status never says Ready while the pool every request needs has no replica; a new image rolls the
pools one at a time; the NetworkPolicy admits the operator only from its own namespace. The Ray head
is the fake one (tests/support/fake_ray_head.py), which plays Serve's targets and replicas.
"""

from __future__ import annotations

import pytest
import yaml
from dvlm_support import condition, get_json, load_example, poll

from support.fake_ray_head import LLM, VISION, FakeRayHead

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def ns(kube, crd):
    name = kube.create_namespace("safe")
    yield name
    for cr in (get_json(kube, "dvlm", "-n", name) or {}).get("items", []):
        kube.kubectl("patch", "dvlm", cr["metadata"]["name"], "-n", name, "--type=merge",
                     "-p", '{"metadata":{"finalizers":null}}', check=False)
    kube.delete_namespace(name, wait=True)


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
    # The autoscaler wakes the pool: one LLM replica, its pod ready -> Ready.
    head.set_deployment(LLM, 1)
    poll(lambda: (c := ready_condition()) and c["status"] == "True", 90, "Ready=True once an LLM replica runs", diag)
