"""The operator works with exactly the permissions examples/operator.yaml grants (a ServiceAccount token),
deletion included: with GCS fault tolerance it stops the head, then runs the Job that removes the Ray state
from Redis. A move of that state (another storage namespace) empties the previous place the same way once
the head has moved (kwok completes the Jobs' pods; `dotsvlm cleanup-redis` itself is tested on a real Redis
in tests/serving/test_redis_state.py)."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from dvlm_support import EXAMPLES, condition, get_json, load_example, poll, release_namespace, write_sa_kubeconfig

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


@pytest.fixture
def operator_rbac(kube, crd):
    docs = [d for d in yaml.safe_load_all((EXAMPLES / "operator.yaml").read_text()) if d]
    rbac = [d for d in docs if d["kind"] != "Deployment"]  # no image to run in kwok: the operator runs here
    kube.apply("\n---\n".join(yaml.safe_dump(d) for d in rbac))
    yield
    kube.kubectl("delete", "clusterrolebinding,clusterrole", "dotsvlm-operator", "--ignore-not-found")
    kube.kubectl("delete", "namespace", "dotsvlm-system", "--ignore-not-found", "--wait=false")


def test_operator_runs_with_the_example_rbac(kube, operator_rbac, operator_factory, tmp_path) -> None:
    ns = kube.create_namespace("rbac")
    try:
        kubeconfig = write_sa_kubeconfig(kube, "dotsvlm-system", "dotsvlm-operator", tmp_path / "sa.kubeconfig")
        # Cluster-wide, as the example Deployment runs it.
        op = operator_factory([], kubeconfig=kubeconfig)
        cr = load_example("dotsvlm-small.yaml")
        cr["spec"]["monitoring"] = {"podMonitor": True, "prometheusRule": True}
        cr["spec"]["model"]["volume"] = {"hostPath": {"path": "/mnt/weights"}}
        cr["spec"].setdefault("head", {})["gcsFaultTolerance"] = {"redisAddress": "redis.redis.svc:6379",
                                                                   "passwordSecretRef": {"name": "redis-auth"}}
        kube.apply(yaml.safe_dump(cr), namespace=ns)
        name = cr["metadata"]["name"]
        got = poll(lambda: (c := get_json(kube, "dvlm", name, "-n", ns)) and condition(c, "Progressing")
                   and c["status"]["vision"]["readyOfDesired"] == "1/1" and c, 90, "a full status", op.log_tail)
        assert condition(got, "Degraded")["reason"] == "AsExpected"
        log = op.log_path.read_text()
        assert "forbidden" not in log.lower(), op.log_tail()
        assert "reconcile failed" not in log
        assert get_json(kube, "networkpolicy", f"{name}-ray", "-n", ns)

        uid = got["metadata"]["uid"]
        place = poll(lambda: (get_json(kube, "dvlm", name, "-n", ns)["status"].get("redisState")), 30,
                     "status.redisState", op.log_tail)
        assert place["storageNamespace"] == uid and place["redisAddress"] == "redis.redis.svc:6379", place

        # The state moves to another storage namespace: the head rolls, then a Job empties the previous place.
        kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge",
                     "-p", json.dumps({"spec": {"head": {"gcsFaultTolerance": {"storageNamespace": "moved"}}}}))
        previous = poll(lambda: get_json(kube, "job", f"{name}-redis-cleanup-prev", "-n", ns), 120,
                        "the Job that empties the previous place in Redis", op.log_tail)
        heads = get_json(kube, "pods", "-n", ns, "-l", f"app.kubernetes.io/component=head,app.kubernetes.io/instance={name}")
        assert all("moved" in json.dumps(p["spec"]) for p in heads["items"]), "no head pod may still use the old place"
        (container,) = previous["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["dotsvlm", "cleanup-redis"]
        assert {e["name"]: e.get("value") for e in container["env"]}["RAY_external_storage_namespace"] == uid
        moved = poll(lambda: (s := get_json(kube, "dvlm", name, "-n", ns)["status"].get("redisState") or {})
                     and s["storageNamespace"] == "moved" and not s.get("message") and s, 120,
                     "status.redisState at the new place once the previous one was emptied", op.log_tail)
        assert moved["redisAddress"] == "redis.redis.svc:6379", moved
        poll(lambda: get_json(kube, "job", f"{name}-redis-cleanup-prev", "-n", ns) is None, 60,
             "the Job removed after it emptied the previous place", op.log_tail)
        events = get_json(kube, "events", "-n", ns, "--field-selector", f"involvedObject.name={name}")
        assert any(e["reason"] == "RedisStateRemoved" and f"'{uid}'" in e["message"] and "'moved'" in e["message"]
                   for e in events["items"]), [(e["reason"], e["message"]) for e in events["items"]]

        kube.kubectl("delete", "dvlm", name, "-n", ns, "--wait=false")
        job = poll(lambda: get_json(kube, "job", f"{name}-redis-cleanup", "-n", ns), 90,
                   "the Job that removes the Ray state from Redis", op.log_tail)
        assert get_json(kube, "deployment", f"{name}-ray-head", "-n", ns) is None, "the head must stop first"
        (container,) = job["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["dotsvlm", "cleanup-redis"]
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_external_storage_namespace"]["value"] == "moved"
        assert env["DOTSVLM_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "redis-auth"
        poll(lambda: get_json(kube, "dvlm", name, "-n", ns) is None, 120,
             "the resource gone once the cleanup Job completed", op.log_tail)
        poll(lambda: get_json(kube, "job", f"{name}-redis-cleanup", "-n", ns) is None, 60,
             "the cleanup Job removed after it completed", op.log_tail)
        events = get_json(kube, "events", "-n", ns, "--field-selector", f"involvedObject.name={name}")
        assert any(e["reason"] == "RedisStateRemoved" and "storage namespace 'moved')" in e["message"]
                   and "now" not in e["message"] for e in events["items"]), [(e["reason"], e["message"]) for e in events["items"]]
        log = op.log_path.read_text()
        assert "forbidden" not in log.lower(), op.log_tail()

        # A namespace deleted with such a resource in it: no Job can be created there any more, so the
        # operator gives up on Redis at once instead of holding the namespace's deletion.
        cr["metadata"]["name"] = "second"
        kube.apply(yaml.safe_dump(cr), namespace=ns)
        poll(lambda: get_json(kube, "deployment", "second-ray-head", "-n", ns), 60, "the second head", op.log_tail)
        started = time.monotonic()
        kube.kubectl("delete", "namespace", ns, "--wait=false")
        poll(lambda: get_json(kube, "namespace", ns) is None, 120, "the namespace gone", op.log_tail)
        assert time.monotonic() - started < 90
        assert "the cleanup Job could not be created" in op.log_path.read_text(), op.log_tail()
    finally:
        release_namespace(kube, ns)
