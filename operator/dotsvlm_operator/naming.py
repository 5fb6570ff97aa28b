"""Names and constants of everything the operator creates: the only place to look them up.

The custom resource's identity (group, kind, plural), label and annotation keys, components, the Ray
ports, the token Secret's key and mount, and the name of every child object. Builders, status, kube,
handlers and the CRD's CEL rules all read them from here, so a name changes in one place. Names that
the serving side must agree on too (pool resources, the application name, the API-keys variable) live
in the contract, `dotsvlm_serving.serve_config`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dotsvlm_serving import redis_state

# --- the custom resource ---------------------------------------------------------------------------------
GROUP = "dotsvlm.io"
VERSION = "v1alpha1"
KIND = "DotsVLMDeployment"
PLURAL = "dotsvlmdeployments"
SINGULAR = "dotsvlmdeployment"
SHORT_NAMES = ["dvlm"]
API_VERSION = f"{GROUP}/{VERSION}"
# The longest metadata.name the CRD admits: every child's name (the resource's name and a suffix) stays a valid
# Kubernetes name, at most 63 characters (a DNS label for Services; a label value for a Job's pods).
MAX_NAME_LENGTH = 42

# --- labels and annotations ----------------------------------------------------------------------------
MANAGER = "dotsvlm-operator"  # label value and server-side-apply field manager
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_DEPLOYMENT = "dotsvlm.io/deployment"
ANNOTATION_SPEC_HASH = "dotsvlm.io/pod-spec-hash"
ANNOTATION_TOKEN_HASH = "dotsvlm.io/ray-token-hash"
# On each Ray Deployment: the pod template the operator last applied (JSON), so that a template change rolls
# one group at a time even across an operator restart (rollout.py).
ANNOTATION_POD_TEMPLATE = "dotsvlm.io/pod-template"
# Kubernetes' own: the ReplicaSet controller removes pods with the lowest cost first on scale-down.
ANNOTATION_POD_DELETION_COST = "controller.kubernetes.io/pod-deletion-cost"
# On the Redis cleanup Job (not owned: it outlives its resource): the UID of the resource it cleans up after.
ANNOTATION_OWNER_UID = "dotsvlm.io/owner-uid"
# On the Job that empties the place in Redis the head used before the spec moved it: that place (address/namespace).
ANNOTATION_REDIS_PLACE = "dotsvlm.io/redis-place"
# Pods of the operator carry this label; the NetworkPolicy lets them reach the Ray ports.
OPERATOR_POD_LABELS = {LABEL_NAME: "dotsvlm-operator"}
# Kubernetes sets it on every namespace (its name): a namespaceSelector for one namespace.
LABEL_NAMESPACE_NAME = "kubernetes.io/metadata.name"

# --- components (the value of LABEL_COMPONENT) ----------------------------------------------------------------
COMPONENT_HEAD = "ray-head"
COMPONENT_VISION = "vision"
COMPONENT_LLM = "llm"
COMPONENT_API = "api"
COMPONENT_API_POOL = "api-pool"  # the pods that run the API and the queue (spec.apiPool)
COMPONENT_SERVE_CONFIG = "serve-config"
COMPONENT_RAY_TOKEN = "ray-token"
COMPONENT_NETWORK_POLICY = "network-policy"
COMPONENT_MONITORING = "monitoring"
COMPONENT_REDIS_CLEANUP = "redis-cleanup"

# --- Ray's ports on the head ---------------------------------------------------------------------------------
GCS_PORT = 6379
DASHBOARD_PORT = 8265
METRICS_PORT = 8080
CLIENT_PORT = 10001
# Ray's dashboard agent on every node (the head's too: Ray's default port); it answers /api/local_raylet_healthz
# (the pool pods' probes).
AGENT_PORT = 52365
# Ports the API may not take (the CRD's CEL rule on api.port lists them): Ray's own on the pods where Serve's HTTP
# proxy runs (the head, or the API pool's pods), where the proxy could not bind the port.
RAY_HEAD_PORTS = (GCS_PORT, DASHBOARD_PORT, METRICS_PORT, CLIENT_PORT, AGENT_PORT)
RAYLET_HEALTH_PATH = "/api/local_raylet_healthz"

# --- stopping a pool pod ---------------------------------------------------------------------------------
# Of a pool pod's termination grace period, the drain (preStop: `dotsvlm drain-node`) may take all but
# this; the rest is for Ray to stop on SIGTERM.
POD_STOP_MARGIN_S = 15
# The Retry-After of requests refused while the head drains (`dotsvlm drain-head`): about how long a head
# pod takes to stop, start and have the application deployed again.
HEAD_RESTART_RETRY_AFTER_S = 60
# The pod's IP, from the downward API: `dotsvlm drain-node` finds its Ray node by it.
POD_IP_ENV = "DOTSVLM_POD_IP"
# The operator's own namespace (downward API in the chart); the NetworkPolicies admit it from there.
OPERATOR_NAMESPACE_ENV = "POD_NAMESPACE"

# --- Ray's auth token ------------------------------------------------------------------------------------------
TOKEN_KEY = "token"
TOKEN_MOUNT = "/etc/dotsvlm/ray-token"
TOKEN_PATH = f"{TOKEN_MOUNT}/{TOKEN_KEY}"
# The head pod's Redis password (spec.head.gcsFaultTolerance), from the user's Secret; `dotsvlm check-redis`
# and `dotsvlm cleanup-redis` read it too.
REDIS_PASSWORD_ENV = redis_state.REDIS_PASSWORD_ENV


@dataclass(frozen=True)
class Owner:
    """The DotsVLMDeployment that owns the children (for names, labels and ownerReferences)."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def of(cls, metadata: Any) -> "Owner":
        """The resource's own metadata (a kopf body's) -> its Owner."""
        return cls(name=metadata["name"], namespace=metadata["namespace"], uid=metadata["uid"])

    def ref(self) -> dict[str, Any]:
        return {"apiVersion": API_VERSION, "kind": KIND, "name": self.name, "uid": self.uid,
                "controller": True, "blockOwnerDeletion": True}


# --- object names ------------------------------------------------------------------------------------------------

def head_name(name: str) -> str:
    """The head's Deployment and Service."""
    return f"{name}-ray-head"


def pool_name(name: str, pool: str) -> str:
    """A pool's Deployment and PodDisruptionBudget."""
    return f"{name}-{pool}"


def api_service_name(name: str) -> str:
    return f"{name}-api"


def token_secret_name(name: str) -> str:
    return f"{name}-ray-token"


def serve_config_name(name: str) -> str:
    return f"{name}-serve-config"


def network_policy_name(name: str) -> str:
    return f"{name}-ray"


def pod_monitor_name(name: str) -> str:
    return name


def prometheus_rule_name(name: str) -> str:
    return name


def head_service_host(owner: Owner) -> str:
    return f"{head_name(owner.name)}.{owner.namespace}.svc"


def dashboard_url(owner: Owner) -> str:
    return f"http://{head_service_host(owner)}:{DASHBOARD_PORT}"


def api_url(owner: Owner, api_port: int) -> str:
    """The API Service inside the cluster (the ingress also serves /-/autoscaler there)."""
    return f"http://{api_service_name(owner.name)}.{owner.namespace}.svc:{api_port}"


def endpoint(owner: Owner, api_port: int) -> str:
    """Base URL of the OpenAI-compatible API inside the cluster."""
    return f"http://{api_service_name(owner.name)}.{owner.namespace}.svc:{api_port}/v1"


# --- labels ----------------------------------------------------------------------------------------------------

def labels(owner: Owner, component: str) -> dict[str, str]:
    return {LABEL_NAME: "dotsvlm", LABEL_INSTANCE: owner.name, LABEL_COMPONENT: component,
            LABEL_MANAGED_BY: MANAGER, LABEL_DEPLOYMENT: owner.name}


def selector(owner: Owner, component: str) -> dict[str, str]:
    return {LABEL_INSTANCE: owner.name, LABEL_COMPONENT: component, LABEL_DEPLOYMENT: owner.name}


def owned_labels(name: str) -> dict[str, str]:
    """Every object and pod this operator made for the deployment `name`."""
    return {LABEL_DEPLOYMENT: name, LABEL_MANAGED_BY: MANAGER}


def redis_cleanup_job_name(name: str) -> str:
    """The Job that removes a deleted deployment's Ray state from Redis (spec.head.gcsFaultTolerance)."""
    return f"{name}-redis-cleanup"


def previous_redis_cleanup_job_name(name: str) -> str:
    """The Job that removes the Ray state from the place in Redis the head used before the spec moved it. At most
    63 characters for the longest name the CRD admits (MAX_NAME_LENGTH): a Job's pods carry its name as a label."""
    return f"{name}-redis-cleanup-prev"
