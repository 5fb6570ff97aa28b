"""The operator on a real control plane: children, placement, status, updates, drift, deletion.

kwok's fake nodes run no containers, so there is no Ray head to talk to: the operator is pointed at
a closed local port (--ray-head-url-override) and must say so in status instead of failing.
"""

from __future__ import annotations

import json

import pytest
import yaml
from dvlm_support import condition, get_json, load_example, poll, release_namespace
from support.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

CHILD_KINDS = "deployments,services,configmaps,secrets,poddisruptionbudgets,networkpolicies"
EXPECTED_CHILDREN = {
    ("Deployment", "{n}-ray-head"), ("Deployment", "{n}-vision"), ("Deployment", "{n}-llm"),
    ("Service", "{n}-ray-head"), ("Service", "{n}-api"), ("ConfigMap", "{n}-serve-config"),
    ("Secret", "{n}-ray-token"), ("PodDisruptionBudget", "{n}-vision"), ("PodDisruptionBudget", "{n}-llm"),
    ("NetworkPolicy", "{n}-ray"),
}
WEIGHTS = """
apiVersion: v1
kind: PersistentVolume
metadata: {name: weights-%(ns)s}
spec:
  capacity: {storage: 1Ti}
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  hostPath: {path: /mnt/weights}
  claimRef: {namespace: %(ns)s, name: dots-weights}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: dots-weights, namespace: %(ns)s}
spec:
  accessModes: [ReadOnlyMany]
  storageClassName: ""
  volumeName: weights-%(ns)s
  resources: {requests: {storage: 1Ti}}
---
apiVersion: v1
kind: Secret
metadata: {name: dots-api-keys, namespace: %(ns)s}
stringData: {api-keys: "k1,k2"}
"""


def _slice(body: dict, deployment: str) -> dict:
    """One Serve deployment's slice of the config in a deploy body: its user_config."""
    return next(d for d in body["applications"][0]["deployments"] if d["name"] == deployment)["user_config"]


def children_of(kube, ns: str, name: str) -> list[dict]:
    items = get_json(kube, CHILD_KINDS, "-n", ns, "-l", f"dotsvlm.io/deployment={name}")["items"]
    return items


def pods_of(kube, ns: str, name: str, component: str | None = None) -> list[dict]:
    sel = f"dotsvlm.io/deployment={name}" + (f",app.kubernetes.io/component={component}" if component else "")
    return get_json(kube, "pods", "-n", ns, "-l", sel)["items"]


@pytest.fixture
def ns(kube, crd):
    name = kube.create_namespace("op")
    kube.apply(WEIGHTS % {"ns": name})
    yield name
    # Its pods go at once, so the next test has all fake GPUs.
    release_namespace(kube, name)
    kube.kubectl("delete", "pv", f"weights-{name}", "--ignore-not-found", "--wait=false")


def _apply_cr(kube, ns: str, cr: dict) -> dict:
    kube.apply(yaml.safe_dump(cr), namespace=ns)
    return get_json(kube, "dvlm", cr["metadata"]["name"], "-n", ns)


def test_full_sample_children_placement_and_status(kube, ns, operator_factory) -> None:
    op = operator_factory([ns])
    cr = load_example("dotsvlm.yaml")
    name = cr["metadata"]["name"]
    created = _apply_cr(kube, ns, cr)
    uid = created["metadata"]["uid"]

    def all_children():
        items = children_of(kube, ns, name)
        got = {(i["kind"], i["metadata"]["name"]) for i in items}
        want = {(k, n.format(n=name)) for k, n in EXPECTED_CHILDREN}
        return items if want <= got else None

    items = poll(all_children, 60, "every child object", op.log_tail)
    for item in items:
        refs = item["metadata"].get("ownerReferences") or []
        assert [(r["kind"], r["uid"], r.get("controller")) for r in refs] == [("DotsVLMDeployment", uid, True)], item["metadata"]["name"]

    # Pods land on the fake GPU nodes of the right type; the two pods of the LLM replica on two nodes.
    def placed():
        vision = pods_of(kube, ns, name, "vision")
        llm = pods_of(kube, ns, name, "llm")
        nodes = [p["spec"].get("nodeName") for p in vision + llm]
        return (vision, llm) if len(vision) == 1 and len(llm) == 2 and all(nodes) else None

    vision, llm = poll(placed, 60, "vision and LLM pods scheduled", op.log_tail)
    assert vision[0]["spec"]["nodeName"].startswith("gpu-l40s-")
    assert {p["spec"]["nodeName"][:9] for p in llm} == {"gpu-h100-"}
    assert len({p["spec"]["nodeName"] for p in llm}) == 2
    for p in llm:
        c = p["spec"]["containers"][0]
        assert c["resources"]["requests"]["nvidia.com/gpu"] == "8"
        assert '--resources={"dotsvlm_pool_llm": 1000}' in c["command"]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"].endswith("/token")
        assert any(m["mountPath"] == "/dev/shm" for m in c["volumeMounts"])

    # Status says what it waits for: pools are up (kwok marks pods ready), the Ray head is not reachable.
    def waiting_for_head():
        cr = get_json(kube, "dvlm", name, "-n", ns)
        prog = condition(cr, "Progressing")
        return cr if prog and prog["reason"] == "RayHeadUnreachable" else None

    cr = poll(waiting_for_head, 60, "Progressing=RayHeadUnreachable", op.log_tail)
    st = cr["status"]
    assert "http://127.0.0.1:9" in condition(cr, "Progressing")["message"]
    assert condition(cr, "Ready")["status"] == "False"
    assert condition(cr, "Degraded")["status"] == "False"
    assert st["vision"]["readyOfDesired"] == "1/1" and st["llm"]["readyOfDesired"] == "1/1"
    assert st["llm"]["pods"] == 2 and st["llm"]["readyReplicas"] == 1
    assert st["endpoint"] == f"http://dots-api.{ns}.svc:8000/v1"
    assert st["observedGeneration"] == cr["metadata"]["generation"]

    # The Serve config is rendered from the spec (LLM TP 16 over 2 nodes) into the ConfigMap.
    cm = get_json(kube, "configmap", f"{name}-serve-config", "-n", ns)
    body = json.loads(cm["data"]["serve-config.json"])
    llm_args = _slice(body, "LLMServer")  # the LLM deployment's own slice of the config (its user_config)
    assert (llm_args["tensor_parallel"], llm_args["nodes_per_replica"], llm_args["context_length"]) == (16, 2, 65536)

    # kubectl get shows the printer columns; an Event was recorded on the resource.
    out = kube.kubectl("get", "dvlm", name, "-n", ns).stdout
    assert "READY" in out and "VISION" in out and "LLM" in out and "ENDPOINT" in out and "1/1" in out
    events = poll(lambda: [e for e in get_json(kube, "events", "-n", ns)["items"]
                           if e["involvedObject"].get("kind") == "DotsVLMDeployment"], 30, "an Event on the resource")
    assert any(e["reason"] == "RayHeadUnreachable" for e in events), [e["reason"] for e in events]
    # Only the operator's own Events: not each of its log lines a second time (kopf's "Logging" Events).
    assert not [e["message"] for e in events if e["reason"] == "Logging"]
    # --log-format json: every line is a JSON object; lines about a resource name it.
    lines = [json.loads(line) for line in op.log_path.read_text().splitlines() if line.strip()]
    assert any(rec.get("object", {}).get("name") == name and rec.get("severity") for rec in lines)


def test_too_few_gpus_is_degraded_with_the_schedulers_reason(kube, ns, operator_factory) -> None:
    op = operator_factory([ns])
    cr = load_example("dotsvlm-small.yaml")
    # Five 8-GPU LLM replicas on H100 nodes: the cluster has four (vision stays on the L40S nodes).
    cr["spec"]["vision"]["nodeSelector"] = {"nvidia.com/gpu.product": "NVIDIA-L40S"}
    cr["spec"]["llm"].update(minReplicas=5, maxReplicas=5, nodeSelector={"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"})
    _apply_cr(kube, ns, cr)

    def degraded():
        c = condition(get_json(kube, "dvlm", cr["metadata"]["name"], "-n", ns), "Degraded")
        return c if c and c["status"] == "True" else None

    c = poll(degraded, 90, "Degraded=True", op.log_tail)
    assert c["reason"] == "Unschedulable"
    assert "1 of 5 LLM pods pending: 0/6 nodes are available:" in c["message"]
    assert "Insufficient nvidia.com/gpu" in c["message"]  # the scheduler's own words
    assert "each llm pod needs 8 free nvidia.com/gpu on a node labelled nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3" in c["message"]
    # Four replicas fit; Ready says what is missing.
    ready = poll(lambda: (r := condition(get_json(kube, "dvlm", cr["metadata"]["name"], "-n", ns), "Ready"))
                 and "LLM pool: 4 of 5 replicas ready" in r["message"] and r, 60, "4 of 5 LLM replicas ready", op.log_tail)
    assert ready["status"] == "False"
    events = poll(lambda: [e for e in get_json(kube, "events", "-n", ns)["items"]
                           if e["involvedObject"].get("kind") == "DotsVLMDeployment" and e["type"] == "Warning"],
                  30, "a Warning event on the resource")
    assert any(e["reason"] == "Unschedulable" for e in events)


def _pod_uids(kube, ns: str, name: str, component: str) -> set[str]:
    return {p["metadata"]["uid"] for p in pods_of(kube, ns, name, component) if not p["metadata"].get("deletionTimestamp")}


def test_vision_only_update_rolls_only_the_vision_pool(kube, ns, operator_factory) -> None:
    op = operator_factory([ns])
    cr = load_example("dotsvlm-small.yaml")
    name = cr["metadata"]["name"]
    _apply_cr(kube, ns, cr)
    poll(lambda: _pod_uids(kube, ns, name, "vision") and _pod_uids(kube, ns, name, "llm")
         and _pod_uids(kube, ns, name, "ray-head"), 60, "pods of every pool", op.log_tail)
    before = {c: _pod_uids(kube, ns, name, c) for c in ("vision", "llm", "ray-head")}
    gens = {c: get_json(kube, "deployment", f"{name}-{c}", "-n", ns)["metadata"]["generation"]
            for c in ("vision", "llm", "ray-head")}
    cm_before = get_json(kube, "configmap", f"{name}-serve-config", "-n", ns)["data"]

    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge",
                 "-p", json.dumps({"spec": {"vision": {"resources": {"requests": {"cpu": "4"}}, "maxBatchPixels": 4194304}}}))

    def vision_rolled():
        now = _pod_uids(kube, ns, name, "vision")
        dep = get_json(kube, "deployment", f"{name}-vision", "-n", ns)
        return now and not (now & before["vision"]) and dep["status"].get("updatedReplicas") == 1
    poll(vision_rolled, 60, "the vision pool to roll", op.log_tail)
    new_pod = pods_of(kube, ns, name, "vision")[0]
    assert new_pod["spec"]["containers"][0]["resources"]["requests"]["cpu"] == "4"
    # The LLM pool and the head were not touched: same pods, same Deployment generation.
    assert _pod_uids(kube, ns, name, "llm") == before["llm"]
    assert _pod_uids(kube, ns, name, "ray-head") == before["ray-head"]
    assert get_json(kube, "deployment", f"{name}-llm", "-n", ns)["metadata"]["generation"] == gens["llm"]
    assert get_json(kube, "deployment", f"{name}-ray-head", "-n", ns)["metadata"]["generation"] == gens["ray-head"]
    # The Serve config follows the spec (it reaches the head through its REST API, not through pods).
    cm = poll(lambda: (d := get_json(kube, "configmap", f"{name}-serve-config", "-n", ns)["data"]) != cm_before and d,
              30, "the Serve config to change")
    assert _slice(json.loads(cm["serve-config.json"]), "VisionEncoder")["max_batch_pixels"] == 4194304


def test_drift_is_corrected_and_delete_leaves_nothing(kube, ns, operator_factory) -> None:
    op = operator_factory([ns])
    cr = load_example("dotsvlm-small.yaml")
    name = cr["metadata"]["name"]
    _apply_cr(kube, ns, cr)
    poll(lambda: get_json(kube, "networkpolicy", f"{name}-ray", "-n", ns), 60, "children", op.log_tail)
    token = get_json(kube, "secret", f"{name}-ray-token", "-n", ns)["data"]["token"]

    # By hand: delete a Deployment and the NetworkPolicy, change the API Service's port, scale the LLM pool.
    kube.kubectl("delete", "deployment", f"{name}-vision", "-n", ns, "--wait=false")
    kube.kubectl("delete", "networkpolicy", f"{name}-ray", "-n", ns, "--wait=false")
    kube.kubectl("patch", "service", f"{name}-api", "-n", ns, "--type=json",
                 "-p", '[{"op":"replace","path":"/spec/ports/0/port","value":9999}]')
    kube.kubectl("scale", "deployment", f"{name}-llm", "-n", ns, "--replicas=3")

    def healed():
        dep = get_json(kube, "deployment", f"{name}-vision", "-n", ns)
        pol = get_json(kube, "networkpolicy", f"{name}-ray", "-n", ns)
        svc = get_json(kube, "service", f"{name}-api", "-n", ns)
        llm = get_json(kube, "deployment", f"{name}-llm", "-n", ns)
        return (dep and not dep["metadata"].get("deletionTimestamp") and pol and not pol["metadata"].get("deletionTimestamp")
                and svc["spec"]["ports"][0]["port"] == 8000 and llm["spec"]["replicas"] == 1)
    poll(healed, 60, "hand edits to be reverted and deleted children re-created", op.log_tail)
    # The token is not rotated by reconciling.
    assert get_json(kube, "secret", f"{name}-ray-token", "-n", ns)["data"]["token"] == token

    # Deleting the token Secret: a new token is generated and every Ray pod restarts to pick it up.
    hashes = {c: get_json(kube, "deployment", f"{name}-{c}", "-n", ns)["spec"]["template"]["metadata"]["annotations"]
              ["dotsvlm.io/ray-token-hash"] for c in ("ray-head", "vision", "llm")}
    kube.kubectl("delete", "secret", f"{name}-ray-token", "-n", ns)

    def rolled_with_new_token():
        sec = get_json(kube, "secret", f"{name}-ray-token", "-n", ns)
        if not sec or sec["data"]["token"] == token:
            return False
        return all(get_json(kube, "deployment", f"{name}-{c}", "-n", ns)["spec"]["template"]["metadata"]["annotations"]
                   ["dotsvlm.io/ray-token-hash"] != hashes[c] for c in hashes)
    poll(rolled_with_new_token, 60, "a new token and every Ray pool rolled", op.log_tail)

    # Delete: the finalizer lets the operator stop, then garbage collection removes every child and pod.
    kube.kubectl("delete", "dvlm", name, "-n", ns, "--wait=true", timeout=60)

    def all_gone():
        left = children_of(kube, ns, name) + pods_of(kube, ns, name)
        return not left
    poll(all_gone, 90, "every child and pod to be garbage-collected",
         lambda: str([(i["kind"], i["metadata"]["name"]) for i in children_of(kube, ns, name)]))


MONITORING_CRDS = {kind: f"""
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {{name: {plural}.monitoring.coreos.com}}
spec:
  group: monitoring.coreos.com
  scope: Namespaced
  names: {{kind: {kind}, plural: {plural}, singular: {plural[:-1]}}}
  versions:
  - name: v1
    served: true
    storage: true
    schema: {{openAPIV3Schema: {{type: object, x-kubernetes-preserve-unknown-fields: true}}}}
""" for kind, plural in [("PodMonitor", "podmonitors"), ("PrometheusRule", "prometheusrules")]}


@pytest.fixture
def monitoring_crds(kube):
    for crd in MONITORING_CRDS.values():
        kube.apply(crd)
    yield
    for plural in ("podmonitors", "prometheusrules"):
        kube.kubectl("delete", "crd", f"{plural}.monitoring.coreos.com", "--ignore-not-found", "--wait=false")


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of the sample `name` with exactly these labels in a Prometheus exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return None


def _scrape(port: int) -> str | None:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None


def _scrape_annotated(kube, ns: str, name: str) -> bool:
    dep = get_json(kube, "deployment", f"{name}-vision", "-n", ns)
    return bool(dep) and "prometheus.io/scrape" in dep["spec"]["template"]["metadata"].get("annotations", {})


def test_pod_monitor_and_rules_follow_the_switches_when_their_crds_exist(kube, monitoring_crds, ns,
                                                                         operator_factory) -> None:
    for plural in ("podmonitors", "prometheusrules"):
        kube.kubectl("wait", "--for=condition=Established", f"crd/{plural}.monitoring.coreos.com", "--timeout=60s")
    metrics_port = free_port()
    op = operator_factory([ns], extra=["--metrics-port", str(metrics_port)])
    cr = load_example("dotsvlm-small.yaml")
    name = cr["metadata"]["name"]
    cr["spec"]["monitoring"] = {"podMonitor": True, "prometheusRule": True, "scrapeInterval": "15s"}
    _apply_cr(kube, ns, cr)
    pm = poll(lambda: get_json(kube, "podmonitor", name, "-n", ns), 60, "the PodMonitor", op.log_tail)
    endpoint = pm["spec"]["podMetricsEndpoints"][0]
    assert endpoint["port"] == "metrics" and endpoint["interval"] == "15s"
    rule = poll(lambda: get_json(kube, "prometheusrule", name, "-n", ns), 60, "the PrometheusRule", op.log_tail)
    assert len(rule["spec"]["groups"][0]["rules"]) >= 10
    assert not _scrape_annotated(kube, ns, name)  # scraped by the PodMonitor only, never twice
    # The operator's own metrics, on its own port: reconciles and the status's per-pool replicas.
    who = {"dotsvlm_namespace": ns, "dotsvlm_deployment": name}
    # The pool gauges are set during a pass and the reconcile counter after it: wait for a finished pass.
    text = poll(lambda: (t := _scrape(metrics_port))
                and _sample(t, "dotsvlm_operator_reconciles_total", result="success", **who) is not None and t,
                60, "a finished reconcile in the operator's metrics",
                lambda: f"{_scrape(metrics_port)}\n{op.log_tail()}")
    assert _sample(text, "dotsvlm_pool_desired_replicas", pool="llm", **who) == 1  # the small example's minReplicas
    assert _sample(text, "dotsvlm_pool_max_replicas", pool="vision", **who) is not None
    assert _sample(text, "dotsvlm_operator_reconciles_total", result="success", **who) >= 1
    assert _sample(text, "dotsvlm_operator_reconcile_duration_seconds_count", **who) >= 1
    from support.prometheus import promtool
    done = promtool("check", "metrics", stdin=text)
    assert done.returncode == 0, done.stdout + done.stderr
    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge", "-p",
                 '{"spec":{"monitoring":{"podMonitor":false,"prometheusRule":false}}}')
    poll(lambda: get_json(kube, "podmonitor", name, "-n", ns) is None, 60, "the PodMonitor to go", op.log_tail)
    poll(lambda: get_json(kube, "prometheusrule", name, "-n", ns) is None, 60, "the PrometheusRule to go", op.log_tail)
    poll(lambda: _scrape_annotated(kube, ns, name), 60, "scrape annotations on the pods instead", op.log_tail)


POLICY = """
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata: {name: no-lb-%(ns)s}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - {apiGroups: [""], apiVersions: ["v1"], operations: ["CREATE", "UPDATE"], resources: ["services"]}
  validations:
  - expression: "object.spec.type != 'LoadBalancer'"
    message: "LoadBalancer Services are not allowed in this namespace"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata: {name: no-lb-%(ns)s}
spec:
  policyName: no-lb-%(ns)s
  validationActions: [Deny]
  matchResources:
    namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: %(ns)s}}
"""


@pytest.fixture
def no_load_balancers(kube, ns):
    kube.apply(POLICY % {"ns": ns})
    yield
    kube.kubectl("delete", "validatingadmissionpolicybinding,validatingadmissionpolicy", f"no-lb-{ns}",
                 "--ignore-not-found", "--wait=false")


def test_refused_child_shows_in_status_and_recovers(kube, ns, no_load_balancers, operator_factory) -> None:
    op = operator_factory([ns])
    cr = load_example("dotsvlm-small.yaml")
    name = cr["metadata"]["name"]
    cr["spec"]["api"] = {"serviceType": "LoadBalancer"}
    _apply_cr(kube, ns, cr)

    def failed():
        c = condition(get_json(kube, "dvlm", name, "-n", ns), "Degraded")
        return c if c and c["reason"] == "ReconcileFailed" else None
    c = poll(failed, 90, "Degraded=ReconcileFailed", op.log_tail)
    assert c["status"] == "True"
    assert "LoadBalancer Services are not allowed in this namespace" in c["message"]
    assert f"Service {name}-api" in c["message"], c
    # The refused Service does not hold back the other children: the Ray head and both pools get their
    # Deployments (before, the first refusal ended the pass, so a new resource got no pods at all), and the
    # status still follows the pools.
    for deployment in (f"{name}-ray-head", f"{name}-vision", f"{name}-llm"):
        poll(lambda: get_json(kube, "deployment", deployment, "-n", ns), 30, f"Deployment {deployment}", op.log_tail)
    cr_now = get_json(kube, "dvlm", name, "-n", ns)
    assert condition(cr_now, "Ready") is not None and cr_now["status"]["vision"]["desiredPods"] >= 1, cr_now["status"]

    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge", "-p", '{"spec":{"api":{"serviceType":"ClusterIP"}}}')
    poll(lambda: (c := condition(get_json(kube, "dvlm", name, "-n", ns), "Degraded")) and c["reason"] != "ReconcileFailed",
         60, "the failure to clear once the spec is fixed", op.log_tail)
    assert get_json(kube, "service", f"{name}-api", "-n", ns)["spec"]["type"] == "ClusterIP"

    # A spec the CRD accepts but the API server refuses in a child (a volume source the CRD takes as it is, with a
    # hostPath type Kubernetes does not know; the CRD now refuses a memory request above its limit itself): the
    # status says so with the API server's words, and the running pool stays as it was (the operator re-creates a
    # child only when the live object is in its way, never when its own is invalid).
    vision = get_json(kube, "deployment", f"{name}-vision", "-n", ns)
    bad = {"spec": {"model": {"volume": {"persistentVolumeClaim": None,
                                         "hostPath": {"path": "/mnt/models", "type": "Folder"}}}}}
    kube.kubectl("patch", "dvlm", name, "-n", ns, "--type=merge", "-p", json.dumps(bad))
    c = poll(lambda: (c := failed()) and "hostPath" in c["message"] and c, 90,
             "Degraded=ReconcileFailed naming the volume", op.log_tail)
    assert 'Unsupported value: "Folder"' in c["message"], c
    now = get_json(kube, "deployment", f"{name}-vision", "-n", ns)
    assert now and now["metadata"]["uid"] == vision["metadata"]["uid"], "the vision pool's Deployment was replaced"
    assert not now["metadata"].get("deletionTimestamp")
    assert "re-creating it" not in op.log_path.read_text(errors="replace")
