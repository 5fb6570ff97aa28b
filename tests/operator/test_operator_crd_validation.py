"""The API server itself refuses bad DotsVLMDeployments, with a message that says what to fix.

Every case is sent with `kubectl create --dry-run=server`, which runs the CRD's OpenAPI and CEL
validation exactly as a real create would, without leaving anything behind.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable

import pytest
import yaml

from dvlm_support import load_example

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


def _set(path: str, value) -> Callable[[dict], None]:
    def mutate(obj: dict) -> None:
        keys = path.split(".")
        cur = obj
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        if value is _DELETE:
            cur.pop(keys[-1], None)
        else:
            cur[keys[-1]] = value
    return mutate


_DELETE = object()


def _many(*fns: Callable[[dict], None]) -> Callable[[dict], None]:
    def mutate(obj: dict) -> None:
        for f in fns:
            f(obj)
    return mutate


# (id, mutation of the small sample, text the API server's answer must contain)
INVALID = [
    ("vision-min-gt-max", _many(_set("spec.vision.minReplicas", 5), _set("spec.vision.maxReplicas", 2)),
     "vision.minReplicas must be less than or equal to vision.maxReplicas"),
    ("llm-min-gt-max", _many(_set("spec.llm.minReplicas", 3), _set("spec.llm.maxReplicas", 1)),
     "llm.minReplicas must be less than or equal to llm.maxReplicas"),
    ("llm-gpus-not-divisible-by-nodes", _many(_set("spec.llm.gpusPerReplica", 12), _set("spec.llm.tensorParallel", 12),
                                              _set("spec.llm.nodesPerReplica", 8)),
     "llm.gpusPerReplica must be divisible by llm.nodesPerReplica"),
    ("llm-gpus-not-multiple-of-tp", _many(_set("spec.llm.gpusPerReplica", 16), _set("spec.llm.tensorParallel", 6),
                                          _set("spec.llm.nodesPerReplica", 2)),
     "llm.gpusPerReplica must be a multiple of llm.tensorParallel"),
    ("llm-too-many-gpus-per-node", _many(_set("spec.llm.gpusPerReplica", 32), _set("spec.llm.tensorParallel", 32)),
     "must be at most 16 GPUs per node: raise llm.nodesPerReplica"),
    ("multi-node-without-gpus", _many(_set("spec.llm.gpusPerReplica", 0), _set("spec.llm.nodesPerReplica", 2),
                                      _set("spec.model.quantization", "none")),
     "llm.nodesPerReplica > 1 needs GPUs"),
    ("fp8-without-gpus", _set("spec.llm.gpusPerReplica", 0), "FP8 weights need GPUs"),
    ("volume-two-sources", _set("spec.model.volume", {"persistentVolumeClaim": {"claimName": "a"},
                                                      "hostPath": {"path": "/mnt"}}),
     "model.volume must name exactly one volume source"),
    ("path-outside-mount", _set("spec.model.path", "/data/dots"), "model.path must lie inside model.mountPath"),
    ("path-relative", _set("spec.model.path", "models/dots"), "spec.model.path in body should match '^/'"),
    ("mount-on-shared-memory", _many(_set("spec.model.mountPath", "/dev/shm"), _set("spec.model.path", "/dev/shm/dots")),
     "model.mountPath must not be /dev/shm, /etc/dotsvlm/ray-token, a folder above them or one inside them"),
    ("mount-above-the-token", _many(_set("spec.model.mountPath", "/etc"), _set("spec.model.path", "/etc/dots")),
     "model.mountPath must not be /dev/shm, /etc/dotsvlm/ray-token"),
    ("mount-trailing-slash", _many(_set("spec.model.mountPath", "/models/"), _set("spec.model.path", "/models/dots")),
     "model.mountPath must not end with '/'"),
    ("service-type-unknown", _set("spec.api.serviceType", "Ingress"),
     'spec.api.serviceType: Unsupported value: "Ingress"'),
    ("api-port-is-ray-port", _set("spec.api.port", 8265), "api.port must not be one of Ray's own ports"),
    ("api-port-is-ray-agent-port", _set("spec.api.port", 52365),
     "api.port must not be one of Ray's own ports on the pods that serve the API (6379, 8265, 8080, 10001, 52365)"),
    ("api-port-privileged", _set("spec.api.port", 80), "spec.api.port in body should be greater than or equal to 1024"),
    ("context-too-long", _set("spec.llm.contextLength", 200000),
     "spec.llm.contextLength in body should be less than or equal to 163840"),
    ("gpu-in-resources", _set("spec.vision.resources", {"requests": {"nvidia.com/gpu": 2}}),
     "do not set nvidia.com/gpu in resources: use the pool's gpusPerReplica instead"),
    ("toleration-exists-with-value", _set("spec.llm.tolerations", [{"key": "gpu", "operator": "Exists", "value": "x"}]),
     "a toleration with operator Exists matches every value"),
    ("name-too-long", _set("metadata.name", "d" * 50), "metadata.name must start with a letter"),
    ("missing-image", _set("spec.image", _DELETE), "spec.image: Required value"),
    ("missing-model", _set("spec.model", _DELETE), "spec.model: Required value"),
    ("zero-target-ongoing", _set("spec.vision.autoscaling", {"targetOngoingRequests": 0}),
     "spec.vision.autoscaling.targetOngoingRequests in body should be greater than 0"),
    ("bad-shm-size", _set("spec.llm.shmSize", "lots"), "spec.llm.shmSize in body should match"),
    ("negative-shm-size", _set("spec.llm.shmSize", "-1Gi"), "spec.llm.shmSize in body should match"),
    ("two-suffix-quantity", _set("spec.vision.resources", {"limits": {"memory": "16GiGi"}}),
     "spec.vision.resources.limits.memory in body should match"),
    ("unknown-resource-name", _set("spec.llm.resources", {"requests": {"memroy": "200Gi"}}),
     "every key of resources.requests and resources.limits must be a container resource"),
    ("gpu-as-resource-name", _set("spec.head.resources", {"limits": {"gpu": 1}}),
     "every key of resources.requests and resources.limits must be a container resource"),
    ("negative-cpu", _set("spec.vision.resources", {"requests": {"cpu": -4}}),
     "spec.vision.resources.requests.cpu in body should be greater than or equal to 0"),
    ("toleration-equal-without-key", _set("spec.llm.tolerations", [{"operator": "Equal", "value": "x"}]),
     "a toleration without a key must have operator Exists"),
    ("toleration-seconds-without-noexecute", _set("spec.llm.tolerations", [
        {"key": "gpu", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 30}]),
     "tolerationSeconds applies only to effect NoExecute"),
    ("monitoring-label-value-not-a-label", _set("spec.monitoring.labels", {"release": "kube prometheus"}),
     "spec.monitoring.labels.release in body should match"),
    ("monitoring-label-key-not-a-label", _set("spec.monitoring.labels", {"my label": "x", "a" * 70: "z"}),
     "every key of monitoring.labels must be a Kubernetes label key"),
    ("node-selector-value-not-a-label", _set("spec.vision.nodeSelector", {"pool": "v" * 64}),
     "spec.vision.nodeSelector.pool: Too long"),
    ("node-selector-key-not-a-label", _set("spec.llm.nodeSelector", {"gpu type": "h100"}),
     "every key of llm.nodeSelector must be a Kubernetes label key"),
    ("head-node-selector-key-not-a-label", _set("spec.head.nodeSelector", {"/pool": "cpu"}),
     "every key of head.nodeSelector must be a Kubernetes label key"),
    ("toleration-key-not-a-label", _set("spec.llm.tolerations", [{"key": "gpu node", "operator": "Exists"}]),
     "spec.llm.tolerations[0].key in body should match"),
    ("toleration-value-not-a-label", _set("spec.vision.tolerations", [{"key": "gpu", "value": "L40S only"}]),
     "spec.vision.tolerations[0].value in body should match"),
    ("negative-min-replicas", _set("spec.vision.minReplicas", -1),
     "spec.vision.minReplicas in body should be greater than or equal to 0"),
    ("bad-quantization", _set("spec.model.quantization", "int4"), 'spec.model.quantization: Unsupported value: "int4"'),
    ("llm-grace-shorter-than-drain", _set("spec.llm.drainTimeoutSeconds", 600),
     "llm.terminationGracePeriodSeconds must be at least llm.drainTimeoutSeconds + 25"),
    ("image-with-trailing-space", _set("spec.image", "ghcr.io/dotsvlm/dotsvlm-serving:0.1.0 "),
     "spec.image in body should match"),
    ("memory-request-above-limit", _set("spec.vision.resources", {"requests": {"memory": "2Gi"},
                                                                  "limits": {"memory": "1Gi"}}),
     "every resources.requests value must be at most the resources.limits value of the same resource"),
    ("cpu-request-above-limit-int-and-string", _set("spec.head.resources", {"requests": {"cpu": 4},
                                                                            "limits": {"cpu": "2500m"}}),
     "spec.head.resources.requests: Invalid value"),
    ("hugepages-without-limit", _set("spec.llm.resources", {"requests": {"memory": "1Gi", "hugepages-2Mi": "1Gi"}}),
     "huge pages and extended resources (a name with a domain, e.g. example.com/fpga) cannot be overcommitted"),
    ("extended-resource-in-millis", _set("spec.llm.resources", {"limits": {"example.com/fpga": "500m"}}),
     "an extended resource (a name with a domain, e.g. example.com/fpga) is counted in whole units"),
    ("api-key-secret-key-not-a-key", _set("spec.api.apiKeySecretRef", {"name": "keys", "key": "api keys"}),
     "spec.api.apiKeySecretRef.key in body should match"),
    ("redis-password-key-dot-dot", _set("spec.head.gcsFaultTolerance", {
        "redisAddress": "redis:6379", "passwordSecretRef": {"name": "pw", "key": "..password"}}),
     "spec.head.gcsFaultTolerance.passwordSecretRef.key in body should match"),
]


def _dry_run(kube, obj: dict, ns: str):
    return kube.kubectl("create", "--dry-run=server", "-n", ns, "-o", "json", "-f", "-", input=yaml.safe_dump(obj),
                        check=False)


@pytest.fixture(scope="module")
def ns(kube, crd) -> str:
    return kube.create_namespace("crdval")


@pytest.mark.parametrize("case_id,mutate,expected", INVALID, ids=[c[0] for c in INVALID])
def test_invalid_spec_is_refused_with_a_clear_message(kube, ns, case_id, mutate, expected) -> None:
    obj = copy.deepcopy(load_example("dotsvlm-small.yaml"))
    mutate(obj)
    proc = _dry_run(kube, obj, ns)
    assert proc.returncode != 0, f"{case_id}: the API server accepted an invalid spec"
    assert expected in proc.stderr, f"{case_id}: message does not say what to fix:\n{proc.stderr}"


def test_there_are_at_least_15_distinct_refusals() -> None:
    assert len({c[2] for c in INVALID}) >= 15


@pytest.mark.parametrize("sample", ["dotsvlm.yaml", "dotsvlm-small.yaml"])
def test_samples_are_accepted_and_defaulted(kube, ns, sample) -> None:
    proc = _dry_run(kube, load_example(sample), ns)
    assert proc.returncode == 0, proc.stderr
    spec = json.loads(proc.stdout)["spec"]
    # Defaults from the models are filled in by the API server, nested ones too.
    assert spec["queue"]["maxItems"] >= 1
    assert spec["api"]["port"] == 8000
    assert spec["vision"]["autoscaling"]["targetOngoingRequests"] > 0
    assert spec["model"]["mountPath"] == "/models"
    assert spec["monitoring"]["scrapeInterval"] == "30s"


def test_kubectl_explain_reads_the_model_descriptions(kube, crd) -> None:
    out = kube.wait_for(lambda: (p := kube.kubectl("explain", "dotsvlmdeployment.spec.llm.nodesPerReplica",
                                                   check=False)).returncode == 0 and p.stdout, 30, "kubectl explain")
    assert "Pods (one per node) that one LLM replica spans" in out
    out = kube.kubectl("explain", "dotsvlmdeployment.spec.vision.minReplicas").stdout
    assert "Default: 1." in out, out  # explain prints no schema default: the description says it


def test_every_child_of_the_longest_admitted_name_is_accepted(kube, ns) -> None:
    """The CRD admits names of up to 42 characters: every object the operator makes for such a resource (every
    optional one too: API pool, monitoring, both Redis cleanup Jobs) must pass the API server's own validation.
    A Job named over 63 characters is refused (its pods' job-name label carries the name), so a resource named
    with 41 or 42 characters could never empty a moved Redis state, and every pass failed on it."""
    from dotsvlm_operator import builders, models
    from dotsvlm_operator.naming import Owner

    obj = copy.deepcopy(load_example("dotsvlm-small.yaml"))
    name = "d" * 42
    obj["metadata"]["name"] = name
    assert _dry_run(kube, obj, ns).returncode == 0  # the CRD admits the name
    raw = obj["spec"]
    raw["apiPool"] = {"replicas": 2}
    raw["head"] = {"gcsFaultTolerance": {"redisAddress": "redis.redis.svc:6379", "passwordSecretRef": {"name": "pw"}}}
    raw["monitoring"] = {"prometheusRule": True}
    spec = models.DotsVLMDeploymentSpec.model_validate(raw)
    owner = Owner(name=name, namespace=ns, uid="0d6c1b5e-9a3f-4b7e-8f2a-1c2d3e4f5a6b")
    previous = models.RedisStateStatus(redis_address="old.redis.svc:6379", storage_namespace="before")
    objs = builders.children(owner, spec, vision_replicas=1, llm_replicas=1, ray_token_hash="abc")
    objs += [builders.token_secret(owner, "t"), builders.redis_cleanup_job(owner, spec),
             builders.redis_cleanup_job(owner, spec, previous=previous)]
    kinds = {o["kind"] for o in objs}
    assert {"Job", "Deployment", "Service", "PodDisruptionBudget", "NetworkPolicy", "ConfigMap", "Secret"} <= kinds
    refused = []
    for child in objs:
        if child["kind"] in ("PodMonitor", "PrometheusRule"):
            continue  # their CRDs are not installed here; their names are the resource's own
        child = copy.deepcopy(child)
        child["metadata"].pop("ownerReferences", None)  # the owner does not exist
        proc = kube.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=yaml.safe_dump(child), check=False)
        if proc.returncode != 0:
            refused.append(f"{child['kind']} {child['metadata']['name']}: {proc.stderr.strip()}")
    assert not refused, "\n".join(refused)


# Resources a user may write for a pool: (requests, limits). The CRD must admit exactly those that Kubernetes admits
# in the pool's Deployment: one it admitted and the Deployment's apply refused left the pool stuck at its old pods
# (Degraded=ReconcileFailed) or, for a new resource, without any.
RESOURCES = [
    ({"cpu": "500m", "memory": "1Gi"}, {"cpu": 1, "memory": "1024Mi"}),
    ({"memory": "1Gi", "hugepages-2Mi": "1Gi"}, {"hugepages-2Mi": "1024Mi"}),
    ({"cpu": 1}, {"example.com/fpga": 2}),
    ({"cpu": "1.5"}, {"cpu": "1500m"}),
    ({"ephemeral-storage": "10G"}, {"ephemeral-storage": "1e10"}),
    ({"memory": "2Gi"}, {"memory": "1Gi"}),
    ({"cpu": 4}, {"cpu": "2500m"}),
    ({"memory": "1Gi", "hugepages-2Mi": "1Gi"}, None),
    ({"memory": "1Gi", "hugepages-2Mi": "512Mi"}, {"hugepages-2Mi": "1Gi"}),
    ({"example.com/fpga": 1}, {"example.com/fpga": 2}),
    (None, {"example.com/fpga": "500m"}),
    ({"example.com/fpga": "1.5"}, {"example.com/fpga": "1.5"}),
    ({"hugepages-2Mi": "1Gi"}, {"hugepages-2Mi": "1Gi"}),
    (None, {"hugepages-1Gi": "2Gi", "memory": "4Gi"}),
    ({"ephemeral-storage": "1E"}, {"ephemeral-storage": "1Ei", "example.com/fpga": "1E"}),
    ({"memory": "2E"}, {"memory": "1Ei"}),
]


def test_resources_the_crd_admits_are_those_kubernetes_admits_in_the_pool(kube, ns) -> None:
    from pydantic import ValidationError

    from dotsvlm_operator import builders, models
    from dotsvlm_operator.naming import Owner

    base = copy.deepcopy(load_example("dotsvlm-small.yaml"))
    owner = Owner(name=base["metadata"]["name"], namespace=ns, uid="0d6c1b5e-9a3f-4b7e-8f2a-1c2d3e4f5a6b")
    template = builders.vision_deployment(owner, models.DotsVLMDeploymentSpec.model_validate(base["spec"]), 1)
    template["metadata"].pop("ownerReferences", None)
    wrong = []
    for requests, limits in RESOURCES:
        res = {k: v for k, v in (("requests", requests), ("limits", limits)) if v is not None}
        obj = copy.deepcopy(base)
        obj["spec"]["vision"]["resources"] = res
        crd_admits = _dry_run(kube, obj, ns).returncode == 0
        try:
            models.Resources.model_validate(res)
            model_admits = True
        except ValidationError:
            model_admits = False
        dep = copy.deepcopy(template)
        dep["spec"]["template"]["spec"]["containers"][0]["resources"] = {
            side: {k: str(v) for k, v in values.items()} for side, values in res.items()}
        proc = kube.kubectl("create", "--dry-run=server", "-n", ns, "-f", "-", input=yaml.safe_dump(dep), check=False)
        kubernetes_admits = proc.returncode == 0
        if not crd_admits == model_admits == kubernetes_admits:
            wrong.append(f"{res}: CRD {crd_admits}, model {model_admits}, Deployment {kubernetes_admits} "
                         f"{proc.stderr.strip()}")
    assert not wrong, "\n".join(wrong)
