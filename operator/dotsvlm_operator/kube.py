"""Thin adapter over the Kubernetes API: server-side apply, the token Secret, pods, status.

Synchronous (the official client); the kopf handlers call it through `asyncio.to_thread`. Paths are
built from a fixed kind table, so no API discovery is needed at start-up.
"""

from __future__ import annotations

import base64
import json
import logging
import secrets
import time
from typing import Any

import kubernetes
from kubernetes.client import ApiClient
from kubernetes.client.rest import ApiException

from dotsvlm_operator import builders, naming

log = logging.getLogger(__name__)

# kind -> (API prefix, plural)
KINDS: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Secret": ("/api/v1", "secrets"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "Deployment": ("/apis/apps/v1", "deployments"),
    "Job": ("/apis/batch/v1", "jobs"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "PodMonitor": ("/apis/monitoring.coreos.com/v1", "podmonitors"),
    "PrometheusRule": ("/apis/monitoring.coreos.com/v1", "prometheusrules"),
    naming.KIND: (f"/apis/{naming.GROUP}/{naming.VERSION}", naming.PLURAL),
}


def _replaceable(exc: ApiException) -> bool:
    """A 422 that re-creating the object can fix: the live object itself is in the way (a clashing list
    entry added by hand, an immutable field). Never for a refusal by an admission policy or webhook."""
    if exc.status != 422:
        return False
    try:
        status = json.loads(exc.body or "{}")
    except ValueError:
        return False
    message = str(status.get("message", "")).lower()
    if "denied" in message or "admission" in message:
        return False
    causes = (status.get("details") or {}).get("causes") or []
    return "immutable" in message or any(str(c.get("reason", "")).startswith("FieldValue") for c in causes)


# Threads that call the API server (asyncio.to_thread in handlers) and the connections kept open to it (more than
# the threads), so a burst does not open (and TLS-handshake) a new connection per request.
KUBE_THREADS = 16
CONNECTION_POOL_SIZE = 32


def load_config() -> None:
    """In-cluster config when running in a pod, else the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    try:
        kubernetes.config.load_incluster_config()
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config()
    cfg = kubernetes.client.Configuration.get_default_copy()
    cfg.connection_pool_maxsize = CONNECTION_POOL_SIZE
    kubernetes.client.Configuration.set_default(cfg)


class Kube:
    """The few API calls the operator makes."""

    def __init__(self, api: ApiClient | None = None) -> None:
        self.api = api or ApiClient()

    def _path(self, kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
        prefix, plural = KINDS[kind]
        path = f"{prefix}/namespaces/{namespace}/{plural}"
        if name:
            path += f"/{name}"
        if sub:
            path += f"/{sub}"
        return path

    def _call(self, method: str, path: str, *, body: Any = None, query: list | None = None,
              content_type: str | None = None) -> Any:
        headers = {"Accept": "application/json"}
        if content_type:
            headers["Content-Type"] = content_type
        req = self.api.param_serialize(method, path, query_params=query or [], header_params=headers, body=body,
                                       auth_settings=["BearerToken"])
        resp = self.api.call_api(*req, _request_timeout=60)
        data = resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException(status=resp.status, reason=resp.reason, body=data.decode(errors="replace") if data else "")
        return json.loads(data) if data else None

    def apply(self, obj: dict[str, Any]) -> Any:
        """Server-side apply with force: our field manager owns every field it sets, so hand edits to
        those fields are reverted and a deleted object is re-created."""
        meta = obj["metadata"]
        path = self._path(obj["kind"], meta["namespace"], meta["name"])
        query = [("fieldManager", naming.MANAGER), ("force", "true")]
        try:
            return self._call("PATCH", path, body=obj, query=query, content_type="application/apply-patch+yaml")
        except ApiException as exc:
            if not _replaceable(exc) or self.get(obj["kind"], meta["namespace"], meta["name"]) is None:
                raise  # refused (e.g. by an admission policy), or nothing to replace
            if not self._valid_as_new(obj):
                raise  # our own object is invalid (from a spec the API server refuses): keep the live one
            # The live object cannot be merged with ours: a hand edit added a list entry that clashes
            # (e.g. a second Service port with our port's name), or an immutable field differs. Replace it.
            log.warning(f"{obj['kind']} {meta['namespace']}/{meta['name']} cannot be updated in place "
                        f"({exc.body[:300] if exc.body else exc.reason}); re-creating it")
            try:
                self._call("DELETE", path, query=[("propagationPolicy", "Background")])
            except ApiException as gone:
                if gone.status != 404:
                    raise
            for _ in range(20):
                try:
                    return self._call("PATCH", path, body=obj, query=query, content_type="application/apply-patch+yaml")
                except ApiException as again:
                    if again.status != 409:  # still being deleted
                        raise
                    time.sleep(0.5)
            raise

    def _valid_as_new(self, obj: dict[str, Any]) -> bool:
        """Whether the API server would accept `obj` as a new object (a dry-run create: it validates before it
        finds the name taken). A 422 that re-creating could fix comes from the live object; one that a dry-run
        create also gets comes from ours, and deleting the live object (a pool's running pods) would only
        leave nothing in its place."""
        meta = obj["metadata"]
        try:
            self._call("POST", self._path(obj["kind"], meta["namespace"]), body=obj,
                       query=[("dryRun", "All"), ("fieldManager", naming.MANAGER)], content_type="application/json")
        except ApiException as exc:  # 409: valid, the name is taken (by the live object); else refused or unknown
            return exc.status == 409
        return True

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", self._path(kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete the object and, in the background, what it owns (a Job's pods too: the API orphans them by
        default)."""
        try:
            self._call("DELETE", self._path(kind, namespace, name), query=[("propagationPolicy", "Background")])
        except ApiException as exc:
            if exc.status != 404:
                raise

    def ensure_token(self, owner: naming.Owner, *, new_resource: bool = False) -> tuple[str, str | None]:
        """The deployment's Ray token: read it, or generate it once. Never rotated by the operator.
        `new_resource`: the Secret most likely does not exist yet, so create first (one call, not two).
        Returns the token and the Secret's resourceVersion (so its watch event is known as ours)."""
        name = naming.token_secret_name(owner.name)
        if new_resource:
            made = self._create_token(owner)
            if made is not None:
                return made
        for _ in range(3):
            secret = self.get("Secret", owner.namespace, name)
            if secret is not None:
                data = (secret.get("data") or {}).get(naming.TOKEN_KEY)
                if data:
                    return base64.b64decode(data).decode(), secret["metadata"].get("resourceVersion")
                # A Secret without the key (edited by hand): put a fresh token in.
                token = secrets.token_hex(32)
                live = self.apply(builders.token_secret(owner, token))
                return token, ((live or {}).get("metadata") or {}).get("resourceVersion")
            made = self._create_token(owner)
            if made is not None:
                return made
        raise RuntimeError(f"could not read or create Secret {owner.namespace}/{name}")

    def _create_token(self, owner: naming.Owner) -> tuple[str, str | None] | None:
        """Create the token Secret: (token, resourceVersion); None when it exists already (409: another pass
        created it; read that one)."""
        token = secrets.token_hex(32)
        try:
            made = self._call("POST", f"{KINDS['Secret'][0]}/namespaces/{owner.namespace}/secrets",
                              body=builders.token_secret(owner, token), content_type="application/json")
            return token, ((made or {}).get("metadata") or {}).get("resourceVersion")
        except ApiException as exc:
            if exc.status != 409:
                raise
            return None

    def list_pods(self, namespace: str, deployment: str) -> list[dict[str, Any]]:
        selector = ",".join(f"{k}={v}" for k, v in naming.owned_labels(deployment).items())
        res = self._call("GET", f"/api/v1/namespaces/{namespace}/pods", query=[("labelSelector", selector)])
        return list(res.get("items") or [])

    def patch_pod_annotations(self, namespace: str, name: str, annotations: dict[str, str]) -> bool:
        """Set annotations on a pod; False when the pod is gone already (nothing left to annotate)."""
        try:
            self._call("PATCH", self._path("Pod", namespace, name), body={"metadata": {"annotations": annotations}},
                       content_type="application/merge-patch+json")
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    def secret_value(self, namespace: str, name: str, key: str) -> str | None:
        """One key of a Secret, decoded; None when the Secret or the key is missing."""
        secret = self.get("Secret", namespace, name)
        data = ((secret or {}).get("data") or {}).get(key)
        return base64.b64decode(data).decode() if data else None

    def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        self._call("PATCH", self._path(naming.KIND, namespace, name, "status"), body={"status": status},
                   content_type="application/merge-patch+json")

    def has_crd(self, kind: str) -> bool:
        """Whether the CRD of `kind` (one of KINDS, e.g. PodMonitor) is installed."""
        prefix, plural = KINDS[kind]
        group = prefix.split("/")[2]
        try:
            self._call("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{plural}.{group}")
            return True
        except ApiException as exc:
            if exc.status in (403, 404):
                return False
            raise
