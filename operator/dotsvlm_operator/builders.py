"""Pure builders: a DotsVLMDeployment spec -> the Kubernetes objects that serve it.

Nothing here talks to the API server; `children()` is a function of its arguments, so tests can assert
every object, and re-running it on an unchanged spec gives byte-identical objects (server-side apply
then changes nothing). Each pool's pod template is built only from that pool's spec and the fields
every Ray pod shares (image, model volume, token Secret), so changing the vision pool never changes
the LLM pool's template and never restarts its pods. The Serve application config is *not* in any pod
template: the operator deploys it through the Ray head's REST API.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from dotsvlm_serving import serve_config as sc

from dotsvlm_operator import models as m

MANAGER = "dotsvlm-operator"
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DEPLOYMENT = "dotsvlm.io/deployment"
ANNOTATION_SPEC_HASH = "dotsvlm.io/pod-spec-hash"
ANNOTATION_TOKEN_HASH = "dotsvlm.io/ray-token-hash"
# Pods of the operator carry this label; the NetworkPolicy lets them reach the Ray ports.
OPERATOR_POD_LABELS = {LABEL_NAME: "dotsvlm-operator"}

GCS_PORT = 6379
DASHBOARD_PORT = 8265
METRICS_PORT = 8080
CLIENT_PORT = 10001
TOKEN_KEY = "token"
TOKEN_MOUNT = "/etc/dotsvlm/ray-token"
TOKEN_PATH = f"{TOKEN_MOUNT}/{TOKEN_KEY}"
API_KEYS_ENV = "DOTSVLM_API_KEYS"

COMPONENT_HEAD = "ray-head"
COMPONENT_VISION = "vision"
COMPONENT_LLM = "llm"
POOLS = (COMPONENT_VISION, COMPONENT_LLM)


@dataclass(frozen=True)
class Owner:
    """The DotsVLMDeployment that owns the children (for names, labels and ownerReferences)."""

    name: str
    namespace: str
    uid: str

    def ref(self) -> dict[str, Any]:
        return {"apiVersion": m.API_VERSION, "kind": m.KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


# --- names ---------------------------------------------------------------------------------------------

def head_name(name: str) -> str:
    return f"{name}-ray-head"


def pool_name(name: str, pool: str) -> str:
    return f"{name}-{pool}"


def api_service_name(name: str) -> str:
    return f"{name}-api"


def token_secret_name(name: str) -> str:
    return f"{name}-ray-token"


def serve_config_name(name: str) -> str:
    return f"{name}-serve-config"


def head_service_host(owner: Owner) -> str:
    return f"{head_name(owner.name)}.{owner.namespace}.svc"


def dashboard_url(owner: Owner) -> str:
    return f"http://{head_service_host(owner)}:{DASHBOARD_PORT}"


def endpoint(owner: Owner, spec: m.DotsVLMDeploymentSpec) -> str:
    return f"http://{api_service_name(owner.name)}.{owner.namespace}.svc:{spec.api.port}/v1"


def labels(owner: Owner, component: str) -> dict[str, str]:
    return {LABEL_NAME: "dotsvlm", LABEL_INSTANCE: owner.name, LABEL_COMPONENT: component,
            LABEL_MANAGED_BY: MANAGER, LABEL_DEPLOYMENT: owner.name}


def selector(owner: Owner, component: str) -> dict[str, str]:
    return {LABEL_INSTANCE: owner.name, LABEL_COMPONENT: component, LABEL_DEPLOYMENT: owner.name}


def _meta(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": labels(owner, component),
            "ownerReferences": [owner.ref()]}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# --- the Serve application config ------------------------------------------------------------------------

def _targets(auto: m.Autoscaling, lo: int, hi: int) -> sc.AutoscalingTargets:
    return sc.AutoscalingTargets(
        min_replicas=lo, max_replicas=hi, target_ongoing_requests=auto.target_ongoing_requests,
        upscale_delay_s=auto.upscale_delay_seconds, downscale_delay_s=auto.downscale_delay_seconds)


def serve_app_config(spec: m.DotsVLMDeploymentSpec) -> sc.ServeAppConfig:
    """The application's args (the contract in dotsvlm_serving.serve_config), rendered from the spec."""
    gpu = spec.llm.gpus_per_replica > 0 or spec.vision.gpus_per_replica > 0
    return sc.ServeAppConfig(
        model_path=spec.model.path,
        served_model_name=spec.model.served_name,
        device="cuda" if gpu else "cpu",
        dtype=spec.model.dtype,
        vision=sc.VisionPoolConfig(
            gpus_per_replica=spec.vision.gpus_per_replica,
            pool_resource=sc.VISION_POOL_RESOURCE,
            max_batch_pixels=spec.vision.max_batch_pixels,
            max_batch_wait_ms=spec.vision.max_batch_wait_ms,
            autoscaling=_targets(spec.vision.autoscaling, spec.vision.min_replicas, spec.vision.max_replicas),
        ),
        llm=sc.LLMPoolConfig(
            gpus_per_replica=spec.llm.gpus_per_replica,
            tensor_parallel=spec.llm.tensor_parallel,
            nodes_per_replica=spec.llm.nodes_per_replica,
            pool_resource=sc.LLM_POOL_RESOURCE,
            context_length=spec.llm.context_length,
            max_running_requests=spec.llm.max_running_requests,
            max_new_tokens_default=spec.llm.max_new_tokens_default,
            autoscaling=_targets(spec.llm.autoscaling, spec.llm.min_replicas, spec.llm.max_replicas),
        ),
        queue=sc.QueueConfig(max_items=spec.queue.max_items, max_bytes=spec.queue.max_bytes,
                             enqueue_timeout_s=spec.queue.enqueue_timeout_seconds,
                             lease_timeout_s=spec.queue.lease_timeout_seconds, max_deliveries=spec.queue.max_deliveries),
        api=sc.ApiConfig(api_keys_env=API_KEYS_ENV if spec.api.api_key_secret_ref else None,
                         request_timeout_s=spec.api.request_timeout_seconds),
    )


def serve_body(spec: m.DotsVLMDeploymentSpec) -> dict[str, Any]:
    """The body of `PUT /api/serve/applications/` for this spec."""
    return sc.serve_deploy_body(serve_app_config(spec), http_port=spec.api.port)


def serve_body_hash(body: dict[str, Any]) -> str:
    return _hash(body)


# --- pods --------------------------------------------------------------------------------------------------

def _resources(res: m.Resources | None, gpus: int) -> dict[str, Any]:
    requests = {k: str(v) for k, v in ((res.requests or {}) if res else {}).items()}
    limits = {k: str(v) for k, v in ((res.limits or {}) if res else {}).items()}
    if gpus:
        requests["nvidia.com/gpu"] = str(gpus)
        limits["nvidia.com/gpu"] = str(gpus)
    out: dict[str, Any] = {}
    if requests:
        out["requests"] = requests
    if limits:
        out["limits"] = limits
    return out


def _ray_env(owner: Owner, spec: m.DotsVLMDeploymentSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN_PATH", "value": TOKEN_PATH},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        {"name": "DOTSVLM_DEPLOYMENT", "value": owner.name},
        {"name": "DOTSVLM_MODEL_QUANTIZATION", "value": spec.model.quantization},
    ]
    ref = spec.api.api_key_secret_ref
    if ref is not None:
        env.append({"name": API_KEYS_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _volumes(owner: Owner, spec: m.DotsVLMDeploymentSpec, shm_size: str) -> tuple[list[dict], list[dict]]:
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
        {"name": "model", **spec.model.volume.to_api()},
        {"name": "ray-token", "secret": {"secretName": token_secret_name(owner.name), "defaultMode": 0o444}},
    ]
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "model", "mountPath": spec.model.mount_path, "readOnly": True},
        {"name": "ray-token", "mountPath": TOKEN_MOUNT, "readOnly": True},
    ]
    return volumes, mounts


def _pod_template(owner: Owner, spec: m.DotsVLMDeploymentSpec, component: str, command: list[str],
                  ports: list[dict], resources: dict, node_selector: dict | None, tolerations: list | None,
                  shm_size: str, probe: dict | None, affinity: dict | None = None) -> dict[str, Any]:
    volumes, mounts = _volumes(owner, spec, shm_size)
    container: dict[str, Any] = {
        "name": "ray",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": command,
        "env": _ray_env(owner, spec),
        "ports": ports,
        "volumeMounts": mounts,
        "lifecycle": {"preStop": {"exec": {"command": ["ray", "stop"]}}},
    }
    if resources:
        container["resources"] = resources
    if probe:
        container["readinessProbe"] = probe
    pod: dict[str, Any] = {
        "containers": [container],
        "volumes": volumes,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
    }
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [t.to_api() for t in tolerations]
    if affinity:
        pod["affinity"] = affinity
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    template = {"metadata": {"labels": labels(owner, component)}, "spec": pod}
    # The hash makes "did this pool's pod spec change?" visible at a glance; it changes exactly when the
    # template does, so it never rolls a pool by itself.
    template["metadata"]["annotations"] = {ANNOTATION_SPEC_HASH: _hash(template)}
    return template


def _deployment(owner: Owner, name: str, component: str, replicas: int, template: dict,
                max_surge: int | str = 0) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, name, component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector(owner, component)},
            # GPU pools: never ask for more GPUs during a rollout than the pool holds.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": max_surge, "maxUnavailable": 1}},
            "template": template,
        },
    }


def _metrics_port(spec: m.DotsVLMDeploymentSpec) -> list[str]:
    return [f"--metrics-export-port={METRICS_PORT}"] if spec.monitoring.enabled else []


def head_deployment(owner: Owner, spec: m.DotsVLMDeploymentSpec) -> dict[str, Any]:
    cmd = ["ray", "start", "--head", f"--port={GCS_PORT}", "--dashboard-host=0.0.0.0",
           f"--dashboard-port={DASHBOARD_PORT}", "--num-gpus=0", *_metrics_port(spec), "--block"]
    ports = [{"name": "gcs", "containerPort": GCS_PORT}, {"name": "dashboard", "containerPort": DASHBOARD_PORT},
             {"name": "serve", "containerPort": spec.api.port}, {"name": "metrics", "containerPort": METRICS_PORT}]
    probe = {"tcpSocket": {"port": GCS_PORT}, "periodSeconds": 10, "failureThreshold": 6}
    template = _pod_template(owner, spec, COMPONENT_HEAD, cmd, ports, _resources(spec.head.resources, 0),
                             spec.head.node_selector, spec.head.tolerations, "2Gi", probe)
    dep = _deployment(owner, head_name(owner.name), COMPONENT_HEAD, 1, template)
    dep["spec"]["strategy"] = {"type": "Recreate"}  # one GCS at a time
    return dep


def _worker_command(owner: Owner, spec: m.DotsVLMDeploymentSpec, resource: str, gpus: int) -> list[str]:
    return ["ray", "start", f"--address={head_service_host(owner)}:{GCS_PORT}", f"--num-gpus={gpus}",
            f"--resources={json.dumps({resource: sc.POOL_RESOURCE_CAPACITY})}", *_metrics_port(spec), "--block"]


def vision_deployment(owner: Owner, spec: m.DotsVLMDeploymentSpec, replicas: int) -> dict[str, Any]:
    """Vision pool: one pod per vision replica, each with gpusPerReplica GPUs."""
    pool = spec.vision
    template = _pod_template(
        owner, spec, COMPONENT_VISION,
        _worker_command(owner, spec, sc.VISION_POOL_RESOURCE, pool.gpus_per_replica),
        [{"name": "metrics", "containerPort": METRICS_PORT}], _resources(pool.resources, pool.gpus_per_replica),
        pool.node_selector, pool.tolerations, pool.shm_size, None)
    return _deployment(owner, pool_name(owner.name, COMPONENT_VISION), COMPONENT_VISION, replicas, template)


def llm_deployment(owner: Owner, spec: m.DotsVLMDeploymentSpec, replicas: int) -> dict[str, Any]:
    """LLM pool: replicas x nodesPerReplica pods, each with gpusPerReplica/nodesPerReplica GPUs."""
    pool = spec.llm
    gpus = pool.gpus_per_pod
    affinity = None
    if pool.nodes_per_replica > 1:
        # One pod per node: the pods of a multi-node replica must not share a node (NCCL across nodes is
        # what the replica was sized for, and two 8-GPU pods would not fit one 8-GPU node anyway).
        affinity = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": selector(owner, COMPONENT_LLM)},
            "topologyKey": "kubernetes.io/hostname"}]}}
    template = _pod_template(
        owner, spec, COMPONENT_LLM, _worker_command(owner, spec, sc.LLM_POOL_RESOURCE, gpus),
        [{"name": "metrics", "containerPort": METRICS_PORT}], _resources(pool.resources, gpus),
        pool.node_selector, pool.tolerations, pool.shm_size, None, affinity)
    return _deployment(owner, pool_name(owner.name, COMPONENT_LLM), COMPONENT_LLM,
                       replicas * pool.nodes_per_replica, template)


# --- services, config, policies -----------------------------------------------------------------------------

def head_service(owner: Owner, spec: m.DotsVLMDeploymentSpec) -> dict[str, Any]:
    ports = [{"name": "gcs", "port": GCS_PORT, "targetPort": GCS_PORT},
             {"name": "dashboard", "port": DASHBOARD_PORT, "targetPort": DASHBOARD_PORT},
             {"name": "serve", "port": spec.api.port, "targetPort": spec.api.port},
             {"name": "metrics", "port": METRICS_PORT, "targetPort": METRICS_PORT}]
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(owner, head_name(owner.name), COMPONENT_HEAD),
            "spec": {"type": "ClusterIP", "selector": selector(owner, COMPONENT_HEAD), "ports": ports}}


def api_service(owner: Owner, spec: m.DotsVLMDeploymentSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(owner, api_service_name(owner.name), "api"),
            "spec": {"type": spec.api.service_type, "selector": selector(owner, COMPONENT_HEAD),
                     "ports": [{"name": "http", "port": spec.api.port, "targetPort": spec.api.port}]}}


def serve_config_map(owner: Owner, spec: m.DotsVLMDeploymentSpec) -> dict[str, Any]:
    """The Serve config, for people and tools to read; the operator deploys the same body to the head."""
    body = serve_body(spec)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(owner, serve_config_name(owner.name), "serve-config"),
            "data": {"serve-config.json": json.dumps(body, indent=2, sort_keys=True) + "\n"}}


def token_secret(owner: Owner, token: str) -> dict[str, Any]:
    """Ray's auth token. Created once (never re-applied), so the token does not change on each reconcile."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(owner, token_secret_name(owner.name), "ray-token"),
            "stringData": {TOKEN_KEY: token}}


def pod_disruption_budget(owner: Owner, pool: str) -> dict[str, Any]:
    """At most one pod of the pool evicted at a time (a node drain then takes down one replica at a time)."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(owner, pool_name(owner.name, pool), pool),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(owner, pool)}}}


def network_policy(owner: Owner, spec: m.DotsVLMDeploymentSpec) -> dict[str, Any]:
    """Ray's ports (GCS, dashboard, object manager, workers) reach only this deployment's own pods and the
    operator; the API port is open to all; the metrics port too when monitoring is on."""
    own = {"podSelector": {"matchLabels": {LABEL_DEPLOYMENT: owner.name, LABEL_MANAGED_BY: MANAGER}}}
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(OPERATOR_POD_LABELS)}}
    open_ports = [{"protocol": "TCP", "port": spec.api.port}]
    if spec.monitoring.enabled:
        open_ports.append({"protocol": "TCP", "port": METRICS_PORT})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(owner, f"{owner.name}-ray", "network-policy"),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_DEPLOYMENT: owner.name, LABEL_MANAGED_BY: MANAGER}},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [own, operator]}, {"ports": open_ports}],
        },
    }


def service_monitor(owner: Owner, spec: m.DotsVLMDeploymentSpec) -> dict[str, Any]:
    return {"apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
            "metadata": _meta(owner, owner.name, "monitoring"),
            "spec": {"selector": {"matchLabels": {LABEL_INSTANCE: owner.name, LABEL_COMPONENT: COMPONENT_HEAD}},
                     "endpoints": [{"port": "metrics", "interval": spec.monitoring.scrape_interval}]}}


def desired_replicas(pool: m.VisionPool | m.LLMPool, current_desired: int | None) -> int:
    """Replicas to run: what the status (later: the pool autoscaler) asks for, kept within the spec's bounds."""
    want = pool.min_replicas if current_desired is None else current_desired
    return max(pool.min_replicas, min(pool.max_replicas, want))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def children(owner: Owner, spec: m.DotsVLMDeploymentSpec, *, vision_replicas: int, llm_replicas: int,
             service_monitor_supported: bool = False, ray_token_hash: str | None = None) -> list[dict[str, Any]]:
    """Every object that server-side apply keeps in place for this deployment (the token Secret aside).

    `ray_token_hash` goes into every Ray pod template: Ray reads its token once at start, so a new token
    (the Secret was deleted and re-generated) must restart every Ray pod, and only then."""
    objs = [
        serve_config_map(owner, spec),
        head_service(owner, spec),
        api_service(owner, spec),
        head_deployment(owner, spec),
        vision_deployment(owner, spec, vision_replicas),
        llm_deployment(owner, spec, llm_replicas),
        pod_disruption_budget(owner, COMPONENT_VISION),
        pod_disruption_budget(owner, COMPONENT_LLM),
        network_policy(owner, spec),
    ]
    if spec.monitoring.enabled and spec.monitoring.service_monitor and service_monitor_supported:
        objs.append(service_monitor(owner, spec))
    if ray_token_hash:
        for obj in objs:
            if obj["kind"] == "Deployment":
                obj["spec"]["template"]["metadata"]["annotations"][ANNOTATION_TOKEN_HASH] = ray_token_hash
    return objs
