"""Pure builders: a DotsVLMDeployment spec -> the Kubernetes objects that serve it.

Nothing here talks to the API server; `children()` is a function of its arguments, so tests can assert
every object, and re-running it on an unchanged spec gives byte-identical objects (server-side apply
then changes nothing). Each pool's pod template is built only from that pool's spec and the fields
every Ray pod shares (image, model volume, token Secret), so changing the vision pool never changes
the LLM pool's template and never restarts its pods. The Serve application config is *not* in any pod
template: the operator deploys it through the Ray head's REST API (`serve_app` renders it). Names,
labels and ports come from `naming`.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Any

from dotsvlm_serving import serve_config
from dotsvlm_serving.metrics.catalog import DEPLOYMENT_ENV, NAMESPACE_ENV

from dotsvlm_operator import models, naming, redis_cleanup, rollout, serve_app
from dotsvlm_operator.monitoring import alerts, scrape
from dotsvlm_operator.naming import Owner


def _meta(owner: Owner, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": owner.namespace, "labels": naming.labels(owner, component),
            "ownerReferences": [owner.ref()]}


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def object_hash(obj: dict[str, Any]) -> str:
    """A digest of an object as built: equal digests, nothing to apply."""
    return _hash(obj)


# --- pods --------------------------------------------------------------------------------------------------

def _resources(res: models.Resources | None, gpus: int) -> dict[str, Any]:
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


def _ray_env(owner: Owner, spec: models.DotsVLMDeploymentSpec, component: str) -> list[dict[str, Any]]:
    """Every Ray pod's environment; the API keys only where the Ingress runs (`api_component`: the head, or the API
    pool), so a new api.apiKeySecretRef rolls no GPU pool."""
    env: list[dict[str, Any]] = [
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {"name": "RAY_AUTH_TOKEN_PATH", "value": naming.TOKEN_PATH},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        # Every dotsvlm metric carries them (dotsvlm_namespace, dotsvlm_deployment): dashboards and
        # alerts then work whatever the scrape configuration.
        {"name": NAMESPACE_ENV, "value": owner.namespace},
        {"name": DEPLOYMENT_ENV, "value": owner.name},
    ]
    ref = spec.api.api_key_secret_ref
    if ref is not None and component == api_component(spec):
        env.append({"name": serve_config.API_KEYS_ENV,
                    "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def gcs_fault_tolerance_env(owner: Owner, spec: models.DotsVLMDeploymentSpec, component: str) -> list[dict[str, Any]]:
    """Ray's GCS fault tolerance (spec.head.gcsFaultTolerance), as KubeRay sets it up: the head's GCS keeps its
    tables in Redis under this deployment's namespace; the pool pods' Ray processes wait for a new head for
    headRestartToleranceSeconds (Ray's default is 60 s) instead of exiting."""
    ft = spec.head.gcs_fault_tolerance
    if ft is None:
        return []
    if component != naming.COMPONENT_HEAD:
        return [{"name": "RAY_gcs_rpc_server_reconnect_timeout_s", "value": str(ft.head_restart_tolerance_seconds)}]
    return _redis_env(owner, ft)


def _redis_env(owner: Owner, ft: models.GcsFaultTolerance) -> list[dict[str, Any]]:
    """How a process finds the Ray state in Redis (what redis_cleanup.place_of reads back from a head pod)."""
    env: list[dict[str, Any]] = [{"name": "RAY_REDIS_ADDRESS", "value": ft.redis_address},
                                 {"name": "RAY_external_storage_namespace", "value": ft.storage_namespace or owner.uid}]
    if ft.password_secret_ref is not None:
        ref = ft.password_secret_ref
        env.append({"name": naming.REDIS_PASSWORD_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def redis_container(owner: Owner, spec: models.DotsVLMDeploymentSpec, command: str,
                    ft: models.GcsFaultTolerance | None = None) -> dict[str, Any]:
    """A container that runs `dotsvlm <command>` (check-redis, cleanup-redis) with the head's image and Redis
    settings (or `ft`'s: a place the head used before). Its last log line is its termination message: one
    sentence that says what to fix, which the status (an init container in CrashLoopBackOff) or a cleanup's
    Event (a failed Job) quotes."""
    ft = ft or spec.head.gcs_fault_tolerance
    assert ft is not None
    return {"name": command, "image": spec.image, "imagePullPolicy": spec.image_pull_policy,
            "command": ["dotsvlm", command], "env": _redis_env(owner, ft),
            "terminationMessagePolicy": "FallbackToLogsOnError"}


def _volumes(owner: Owner, spec: models.DotsVLMDeploymentSpec, shm_size: str) -> tuple[list[dict], list[dict]]:
    volumes = [
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}},
        {"name": "model", **spec.model.volume.to_api()},
        {"name": "ray-token", "secret": {"secretName": naming.token_secret_name(owner.name), "defaultMode": 0o444}},
    ]
    mounts = [
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "model", "mountPath": spec.model.mount_path, "readOnly": True},
        {"name": "ray-token", "mountPath": naming.TOKEN_MOUNT, "readOnly": True},
    ]
    return volumes, mounts


@dataclass(frozen=True)
class _Stop:
    """How a pod stops: its preStop command, grace period and extra environment."""

    pre_stop: list[str]
    grace_seconds: int
    env: tuple[dict[str, Any], ...] = ()


def head_keeps_api(spec: models.DotsVLMDeploymentSpec) -> bool:
    """Whether the API keeps answering while the head restarts: it runs on the API pool, and the pools'
    Ray processes (the API pool's among them) outlive the head because the GCS state is in Redis."""
    return spec.api_pool is not None and spec.head.gcs_fault_tolerance is not None


def _head_stop(spec: models.DotsVLMDeploymentSpec) -> _Stop:
    """The head drains the API first (`dotsvlm drain-head`, dotsvlm_serving.head_drain): new requests get
    503 with Retry-After, the open ones (at most the request timeout) finish; then SIGTERM stops Ray
    (every pool worker goes with it: without GCS fault tolerance they cannot outlive the head). Not when
    the API outlives the head (`head_keeps_api`): it keeps answering through the restart."""
    deadline = int(math.ceil(spec.api.request_timeout_seconds))
    if head_keeps_api(spec):
        return _Stop([], naming.POD_STOP_MARGIN_S * 2)
    return _Stop(["dotsvlm", "drain-head", f"--address=127.0.0.1:{naming.GCS_PORT}", f"--deadline-seconds={deadline}",
                  f"--retry-after-seconds={naming.HEAD_RESTART_RETRY_AFTER_S}"], deadline + naming.POD_STOP_MARGIN_S)


def _pool_stop(owner: Owner, grace_seconds: int) -> _Stop:
    """A pool pod drains its Ray node before it stops (`dotsvlm drain-node`, dotsvlm_serving.node_drain):
    Serve moves its replicas elsewhere and they finish their requests, within the grace period less
    POD_STOP_MARGIN_S; SIGTERM then stops Ray (its own drain on SIGTERM gets the rest of the margin)."""
    deadline = grace_seconds - naming.POD_STOP_MARGIN_S
    return _Stop(
        ["dotsvlm", "drain-node", f"--address={naming.head_service_host(owner)}:{naming.GCS_PORT}",
         f"--deadline-seconds={deadline}"],
        grace_seconds,
        ({"name": naming.POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
         {"name": "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "value": str(naming.POD_STOP_MARGIN_S - 5)}))


def _pool_probes(startup_timeout_seconds: int) -> dict[str, Any]:
    """The raylet's health on Ray's dashboard agent: a startup probe that allows `startup_timeout_seconds`
    (a slow pull, a node busy loading a large checkpoint), then liveness (a minute of failures restarts the
    pod) and readiness."""
    check = {"httpGet": {"path": naming.RAYLET_HEALTH_PATH, "port": naming.AGENT_PORT}, "timeoutSeconds": 5}
    period = 10
    return {
        "startupProbe": {**check, "periodSeconds": period, "failureThreshold": -(-startup_timeout_seconds // period)},
        "livenessProbe": {**check, "periodSeconds": period, "failureThreshold": 6},
        "readinessProbe": {**check, "periodSeconds": period, "failureThreshold": 3},
    }


def _pod_template(owner: Owner, spec: models.DotsVLMDeploymentSpec, component: str, command: list[str],
                  ports: list[dict], resources: dict, node_selector: dict | None, tolerations: list | None,
                  shm_size: str, probes: dict[str, Any], stop: _Stop, affinity: dict | None = None,
                  init_containers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    volumes, mounts = _volumes(owner, spec, shm_size)
    container: dict[str, Any] = {
        "name": "ray",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": command,
        "env": _ray_env(owner, spec, component) + gcs_fault_tolerance_env(owner, spec, component) + list(stop.env),
        "ports": ports,
        "volumeMounts": mounts,
        **probes,
    }
    if stop.pre_stop:
        container["lifecycle"] = {"preStop": {"exec": {"command": stop.pre_stop}}}
    if component != naming.COMPONENT_HEAD:
        # A pool pod's crash leaves its last log lines as the termination message, which the status quotes
        # (status.crash_summary: e.g. a new image's Ray version that the running head refuses). Not on the
        # head: a changed head template restarts Ray for the whole deployment on an operator upgrade.
        container["terminationMessagePolicy"] = "FallbackToLogsOnError"
    if resources:
        container["resources"] = resources
    pod: dict[str, Any] = {
        **({"initContainers": init_containers} if init_containers else {}),
        "containers": [container],
        "volumes": volumes,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": stop.grace_seconds,
    }
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if tolerations:
        pod["tolerations"] = [t.to_api() for t in tolerations]
    if affinity:
        pod["affinity"] = affinity
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    template = {"metadata": {"labels": naming.labels(owner, component)}, "spec": pod}
    # The hash makes "did this pool's pod spec change?" visible at a glance; it changes exactly when the
    # template does, so it never rolls a pool by itself.
    template["metadata"]["annotations"] = {naming.ANNOTATION_SPEC_HASH: _hash(template)}
    return template


def _deployment(owner: Owner, name: str, component: str, replicas: int, template: dict,
                max_surge: int | str = 0, max_unavailable: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(owner, name, component),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": naming.selector(owner, component)},
            # GPU pools: never ask for more GPUs during a rollout than the pool holds.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": max_surge, "maxUnavailable": max_unavailable}},
            "template": template,
        },
    }


def _metrics_port(spec: models.DotsVLMDeploymentSpec) -> list[str]:
    return [f"--metrics-export-port={naming.METRICS_PORT}"] if spec.monitoring.enabled else []


def _redis_password(spec: models.DotsVLMDeploymentSpec) -> list[str]:
    """`ray start` takes the Redis password only as an argument: Kubernetes puts the Secret's value there from
    the container's environment ($(VAR) in a command)."""
    ft = spec.head.gcs_fault_tolerance
    return [f"--redis-password=$({naming.REDIS_PASSWORD_ENV})"] if ft is not None and ft.password_secret_ref else []


def _control_resources() -> str:
    return f"--resources={json.dumps({serve_config.CONTROL_RESOURCE: serve_config.CONTROL_RESOURCE_CAPACITY})}"


def head_deployment(owner: Owner, spec: models.DotsVLMDeploymentSpec) -> dict[str, Any]:
    # Without an API pool the head advertises the control resource: the Ingress and TensorQueue replicas
    # run here, where GPU-pool churn cannot take them down. With one, they run on its pods only.
    control = [_control_resources()] if spec.api_pool is None else []
    cmd = ["ray", "start", "--head", f"--port={naming.GCS_PORT}", "--dashboard-host=0.0.0.0",
           f"--dashboard-port={naming.DASHBOARD_PORT}", "--num-gpus=0", *control,
           *_metrics_port(spec), *_redis_password(spec), "--block"]
    ports = [{"name": "gcs", "containerPort": naming.GCS_PORT},
             {"name": "dashboard", "containerPort": naming.DASHBOARD_PORT},
             {"name": "serve", "containerPort": spec.api.port},
             {"name": "metrics", "containerPort": naming.METRICS_PORT}]
    probe = {"tcpSocket": {"port": naming.GCS_PORT}, "periodSeconds": 10, "failureThreshold": 6}
    # `ray start --head` reads Redis first and, when it cannot, aborts with a stack trace that hides why: with
    # gcsFaultTolerance a check runs first and fails with one line that says what to fix (the status quotes it).
    init = [redis_container(owner, spec, "check-redis")] if spec.head.gcs_fault_tolerance is not None else []
    template = _pod_template(owner, spec, naming.COMPONENT_HEAD, cmd, ports, _resources(spec.head.resources, 0),
                             spec.head.node_selector, spec.head.tolerations, "2Gi", {"readinessProbe": probe},
                             _head_stop(spec), init_containers=init)
    dep = _deployment(owner, naming.head_name(owner.name), naming.COMPONENT_HEAD, 1, template)
    dep["spec"]["strategy"] = {"type": "Recreate"}  # one GCS at a time
    return dep


def _worker_command(owner: Owner, spec: models.DotsVLMDeploymentSpec, resource: str | None, gpus: int) -> list[str]:
    resources = (f"--resources={json.dumps({resource: serve_config.POOL_RESOURCE_CAPACITY})}" if resource
                 else _control_resources())
    return ["ray", "start", f"--address={naming.head_service_host(owner)}:{naming.GCS_PORT}", f"--num-gpus={gpus}",
            resources, f"--dashboard-agent-listen-port={naming.AGENT_PORT}", *_metrics_port(spec), "--block"]


def api_pool_grace_seconds(spec: models.DotsVLMDeploymentSpec) -> int:
    """An API pod's grace period: its Ingress replica's open requests may take the request timeout, and its
    tensor queue replica's hand-over up to the queue's graceful shutdown."""
    pool = spec.api_pool
    assert pool is not None
    if pool.termination_grace_period_seconds is not None:
        return pool.termination_grace_period_seconds
    longest = max(spec.api.request_timeout_seconds, serve_config.QUEUE_GRACEFUL_SHUTDOWN_TIMEOUT_S)
    return int(math.ceil(longest)) + 2 * naming.POD_STOP_MARGIN_S


def api_pool_deployment(owner: Owner, spec: models.DotsVLMDeploymentSpec) -> dict[str, Any]:
    """API pool (spec.apiPool): CPU pods that advertise the control resource, so the Ingress and
    TensorQueue replicas run there (and Serve's HTTP proxy answers there, behind the API Service). A new pod
    is up before an old one drains (maxSurge 1, maxUnavailable 0): Serve moves the old pod's replicas to it."""
    pool = spec.api_pool
    assert pool is not None
    template = _pod_template(
        owner, spec, naming.COMPONENT_API_POOL, _worker_command(owner, spec, None, 0),
        [{"name": "serve", "containerPort": spec.api.port}, {"name": "metrics", "containerPort": naming.METRICS_PORT}],
        _resources(pool.resources, 0), pool.node_selector, pool.tolerations, "2Gi",
        _pool_probes(pool.startup_timeout_seconds), _pool_stop(owner, api_pool_grace_seconds(spec)))
    return _deployment(owner, naming.pool_name(owner.name, naming.COMPONENT_API_POOL), naming.COMPONENT_API_POOL,
                       pool.replicas, template, max_surge=1, max_unavailable=0)


def vision_deployment(owner: Owner, spec: models.DotsVLMDeploymentSpec, replicas: int) -> dict[str, Any]:
    """Vision pool: one pod per vision replica, each with gpusPerReplica GPUs."""
    pool = spec.vision
    template = _pod_template(
        owner, spec, naming.COMPONENT_VISION,
        _worker_command(owner, spec, serve_config.VISION_POOL_RESOURCE, pool.gpus_per_replica),
        [{"name": "metrics", "containerPort": naming.METRICS_PORT}], _resources(pool.resources, pool.gpus_per_replica),
        pool.node_selector, pool.tolerations, pool.shm_size, _pool_probes(pool.startup_timeout_seconds),
        _pool_stop(owner, pool.termination_grace_period_seconds))
    return _deployment(owner, naming.pool_name(owner.name, naming.COMPONENT_VISION), naming.COMPONENT_VISION,
                       replicas, template)


def llm_deployment(owner: Owner, spec: models.DotsVLMDeploymentSpec, replicas: int) -> dict[str, Any]:
    """LLM pool: replicas x nodesPerReplica pods, each with gpusPerReplica/nodesPerReplica GPUs."""
    pool = spec.llm
    gpus = pool.gpus_per_pod
    affinity = None
    if pool.nodes_per_replica > 1:
        # One pod per node: the pods of a multi-node replica must not share a node (NCCL across nodes is
        # what the replica was sized for, and two 8-GPU pods would not fit one 8-GPU node anyway).
        affinity = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": naming.selector(owner, naming.COMPONENT_LLM)},
            "topologyKey": "kubernetes.io/hostname"}]}}
    template = _pod_template(
        owner, spec, naming.COMPONENT_LLM, _worker_command(owner, spec, serve_config.LLM_POOL_RESOURCE, gpus),
        [{"name": "metrics", "containerPort": naming.METRICS_PORT}], _resources(pool.resources, gpus),
        pool.node_selector, pool.tolerations, pool.shm_size, _pool_probes(pool.startup_timeout_seconds),
        _pool_stop(owner, pool.termination_grace_period_seconds), affinity)
    return _deployment(owner, naming.pool_name(owner.name, naming.COMPONENT_LLM), naming.COMPONENT_LLM,
                       replicas * pool.nodes_per_replica, template)


# --- services, config, policies -----------------------------------------------------------------------------

def head_service(owner: Owner, spec: models.DotsVLMDeploymentSpec) -> dict[str, Any]:
    ports = [{"name": "gcs", "port": naming.GCS_PORT, "targetPort": naming.GCS_PORT},
             {"name": "dashboard", "port": naming.DASHBOARD_PORT, "targetPort": naming.DASHBOARD_PORT},
             {"name": "serve", "port": spec.api.port, "targetPort": spec.api.port},
             {"name": "metrics", "port": naming.METRICS_PORT, "targetPort": naming.METRICS_PORT}]
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(owner, naming.head_name(owner.name), naming.COMPONENT_HEAD),
            "spec": {"type": "ClusterIP", "selector": naming.selector(owner, naming.COMPONENT_HEAD), "ports": ports}}


def api_component(spec: models.DotsVLMDeploymentSpec) -> str:
    """The pods whose Serve proxy the API Service sends requests to."""
    return naming.COMPONENT_HEAD if spec.api_pool is None else naming.COMPONENT_API_POOL


def api_service(owner: Owner, spec: models.DotsVLMDeploymentSpec) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": _meta(owner, naming.api_service_name(owner.name), naming.COMPONENT_API),
            "spec": {"type": spec.api.service_type, "selector": naming.selector(owner, api_component(spec)),
                     "ports": [{"name": "http", "port": spec.api.port, "targetPort": spec.api.port}]}}


def serve_config_map(owner: Owner, spec: models.DotsVLMDeploymentSpec) -> dict[str, Any]:
    """The Serve config, for people and tools to read; the operator deploys the same body to the head."""
    body = serve_app.deploy_body(spec)
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": _meta(owner, naming.serve_config_name(owner.name), naming.COMPONENT_SERVE_CONFIG),
            "data": {"serve-config.json": json.dumps(body, indent=2, sort_keys=True) + "\n"}}


def token_secret(owner: Owner, token: str) -> dict[str, Any]:
    """Ray's auth token. Created once (never re-applied), so the token does not change on each reconcile."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": _meta(owner, naming.token_secret_name(owner.name), naming.COMPONENT_RAY_TOKEN),
            "stringData": {naming.TOKEN_KEY: token}}


def pod_disruption_budget(owner: Owner, pool: str) -> dict[str, Any]:
    """At most one pod of the pool evicted at a time (a node drain then takes down one replica at a time)."""
    return {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
            "metadata": _meta(owner, naming.pool_name(owner.name, pool), pool),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": naming.selector(owner, pool)}}}


def network_policy(owner: Owner, spec: models.DotsVLMDeploymentSpec, operator_namespace: str | None = None) -> dict[str, Any]:
    """Ray's ports (GCS, dashboard, object manager, workers) reach only this deployment's own pods and the
    operator's pods in the operator's own namespace (`operator_namespace`; unknown: this deployment's
    namespace); the API port is open to all; the metrics port too when monitoring is on."""
    own = {"podSelector": {"matchLabels": naming.owned_labels(owner.name)}}
    operator = {"namespaceSelector": {"matchLabels": {naming.LABEL_NAMESPACE_NAME: operator_namespace or owner.namespace}},
                "podSelector": {"matchLabels": dict(naming.OPERATOR_POD_LABELS)}}
    open_ports = [{"protocol": "TCP", "port": spec.api.port}]
    if spec.monitoring.enabled:
        open_ports.append({"protocol": "TCP", "port": naming.METRICS_PORT})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _meta(owner, naming.network_policy_name(owner.name), naming.COMPONENT_NETWORK_POLICY),
        "spec": {
            "podSelector": {"matchLabels": naming.owned_labels(owner.name)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [own, operator]}, {"ports": open_ports}],
        },
    }


def _monitoring_meta(owner: Owner, spec: models.DotsVLMDeploymentSpec, name: str) -> dict[str, Any]:
    """A monitoring object's metadata, with spec.monitoring.labels for the Prometheus that selects it (ours win)."""
    meta = _meta(owner, name, naming.COMPONENT_MONITORING)
    meta["labels"] = {**(spec.monitoring.labels or {}), **meta["labels"]}
    return meta


def pod_monitor(owner: Owner, spec: models.DotsVLMDeploymentSpec) -> dict[str, Any]:
    """Scrapes every Ray pod of the deployment (head and pool workers) once, on its metrics port."""
    return scrape.pod_monitor(_monitoring_meta(owner, spec, naming.pod_monitor_name(owner.name)),
                              naming.owned_labels(owner.name), spec.monitoring.scrape_interval)


def prometheus_rule(owner: Owner, spec: models.DotsVLMDeploymentSpec) -> dict[str, Any]:
    """dotsvlm's alerts, narrowed to this deployment's series and held to its spec.slo."""
    return alerts.prometheus_rule(_monitoring_meta(owner, spec, naming.prometheus_rule_name(owner.name)),
                                  owner.namespace, owner.name,
                                  {"text": spec.slo.text_ttft_seconds, "image": spec.slo.image_ttft_seconds},
                                  spec.slo.inter_token_seconds, serve_app.encode_budget_seconds(spec))


def uses_pod_monitor(spec: models.DotsVLMDeploymentSpec, pod_monitor_supported: bool) -> bool:
    return spec.monitoring.enabled and spec.monitoring.pod_monitor and pod_monitor_supported


def uses_prometheus_rule(spec: models.DotsVLMDeploymentSpec, prometheus_rule_supported: bool) -> bool:
    return spec.monitoring.enabled and spec.monitoring.prometheus_rule and prometheus_rule_supported


def desired_replicas(pool: models.VisionPool | models.LLMPool, requested: int | None = None) -> int:
    """Replicas to run: the spec's minimum, or `requested` (Serve's target, the autoscaler's wish; see
    pod_sizing) kept within the spec's bounds."""
    want = pool.min_replicas if requested is None else requested
    return max(pool.min_replicas, min(pool.max_replicas, want))


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()[:16]


def children(owner: Owner, spec: models.DotsVLMDeploymentSpec, *, vision_replicas: int, llm_replicas: int,
             pod_monitor_supported: bool = False, prometheus_rule_supported: bool = False,
             ray_token_hash: str | None = None, operator_namespace: str | None = None,
             templates: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every object that server-side apply keeps in place for this deployment (the token Secret aside).

    `ray_token_hash` goes into every Ray pod template: Ray reads its token once at start, so a new token
    (the Secret was deleted and re-generated) must restart every Ray pod, and only then.
    `*_supported`: whether the Prometheus Operator's CRDs exist. Without a PodMonitor the Ray pods
    carry scrape annotations instead (never both: each pod would be scraped twice).
    `operator_namespace`: where the operator runs; the NetworkPolicy admits its pods from there only.
    `templates`: the pod template per Ray component while a template change rolls one group at a time
    (`rollout.plan_templates`); the one the spec builds for those not given. Each Ray Deployment records
    the template it runs (`rollout.with_template`)."""
    templates = templates or {}
    objs = [
        serve_config_map(owner, spec),
        head_service(owner, spec),
        api_service(owner, spec),
        head_deployment(owner, spec),
        vision_deployment(owner, spec, vision_replicas),
        llm_deployment(owner, spec, llm_replicas),
        pod_disruption_budget(owner, naming.COMPONENT_VISION),
        pod_disruption_budget(owner, naming.COMPONENT_LLM),
        network_policy(owner, spec, operator_namespace),
    ]
    if spec.api_pool is not None:
        objs[6:6] = [api_pool_deployment(owner, spec), pod_disruption_budget(owner, naming.COMPONENT_API_POOL)]
    annotations: dict[str, str] = {}
    if uses_pod_monitor(spec, pod_monitor_supported):
        objs.append(pod_monitor(owner, spec))
    elif spec.monitoring.enabled:
        annotations.update(scrape.scrape_annotations(naming.METRICS_PORT))
    if uses_prometheus_rule(spec, prometheus_rule_supported):
        objs.append(prometheus_rule(owner, spec))
    if ray_token_hash:
        annotations[naming.ANNOTATION_TOKEN_HASH] = ray_token_hash
    for i, obj in enumerate(objs):
        if obj["kind"] == "Deployment":
            obj["spec"]["template"]["metadata"]["annotations"].update(annotations)
            component = obj["metadata"]["labels"][naming.LABEL_COMPONENT]
            objs[i] = rollout.with_template(obj, templates.get(component, obj["spec"]["template"]))
    return objs


def ray_templates(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The pod template of each Ray component's Deployment among built children."""
    return {o["metadata"]["labels"][naming.LABEL_COMPONENT]: o["spec"]["template"] for o in objs
            if o["kind"] == "Deployment"}


# --- on deletion ------------------------------------------------------------------------------------------------

REDIS_CLEANUP_DEADLINE_S = 300  # the Job's activeDeadlineSeconds: Ray alone retries a lost Redis for a minute


def redis_cleanup_job(owner: Owner, spec: models.DotsVLMDeploymentSpec,
                      previous: models.RedisStateStatus | None = None) -> dict[str, Any]:
    """The Job that removes the deployment's Ray state from Redis (spec.head.gcsFaultTolerance): the head's
    image, Redis settings and placement, `dotsvlm cleanup-redis`.
    - Once the resource is deleted (no `previous`): not owned by the resource, since a foreground deletion
      (`kubectl delete --cascade=foreground`) would remove it before it ran. The deletion handler removes it
      when done; the annotation names the resource it serves.
    - For the place the head used before the spec moved it (`previous`, from status.redisState): owned by the
      resource, and its annotation names the place it empties."""
    ft = redis_cleanup.settings(previous) if previous is not None else spec.head.gcs_fault_tolerance
    pod: dict[str, Any] = {"containers": [redis_container(owner, spec, "cleanup-redis", ft)], "restartPolicy": "Never",
                           "enableServiceLinks": False}
    if spec.head.node_selector:
        pod["nodeSelector"] = dict(spec.head.node_selector)
    if spec.head.tolerations:
        pod["tolerations"] = [t.to_api() for t in spec.head.tolerations]
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": n} for n in spec.image_pull_secrets]
    labels = naming.labels(owner, naming.COMPONENT_REDIS_CLEANUP)
    if previous is None:
        meta = {"name": naming.redis_cleanup_job_name(owner.name), "namespace": owner.namespace, "labels": labels,
                "annotations": {naming.ANNOTATION_OWNER_UID: owner.uid}}
    else:
        meta = _meta(owner, naming.previous_redis_cleanup_job_name(owner.name), naming.COMPONENT_REDIS_CLEANUP)
        meta["annotations"] = {naming.ANNOTATION_REDIS_PLACE: redis_cleanup.place_label(previous)}
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
        "spec": {"backoffLimit": 2, "activeDeadlineSeconds": REDIS_CLEANUP_DEADLINE_S,
                 "template": {"metadata": {"labels": labels}, "spec": pod}},
    }
