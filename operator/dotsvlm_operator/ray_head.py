"""Client for the Ray head's dashboard REST API: deploy the Serve application, read its status and each
deployment's target and replicas (where they run).

The operator talks to `http://<name>-ray-head.<ns>.svc:8265` with the deployment's Ray token
(`Authorization: Bearer`, Ray's token authentication). Every failure becomes a `RayHeadError` whose
message says what went wrong in words, so status can show it as is.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from dotsvlm_serving.serve_config import APP_NAME

SERVE_APPLICATIONS = "/api/serve/applications/"
# Ray's state API on the same dashboard: where each placement group's bundles run, and each node's IP.
# Serve names a replica's placement group after the replica's actor, so a replica that spans several
# nodes (an LLM replica over nodesPerReplica pods) is found on every node it holds.
PLACEMENT_GROUPS = "/api/v0/placement_groups?detail=true&limit=10000"
NODES = "/api/v0/nodes?limit=10000"
# Replica states (ray.serve._private.common.ReplicaState) of a replica that still occupies its node:
# its pod must stay. STOPPING is a replica draining its work; only when it has left may its pod go.
OCCUPYING_STATES = frozenset({"STARTING", "UPDATING", "RECOVERING", "RUNNING", "STOPPING", "PENDING_MIGRATION"})


@dataclass(frozen=True)
class ReplicaView:
    """One Serve replica as the dashboard lists it (ray.serve.schema.ReplicaDetails)."""

    state: str
    node_ip: str | None = None
    node_id: str | None = None
    actor_name: str | None = None
    # Every node the replica holds (its placement group's bundles), when known; else just node_ip.
    node_ips: tuple[str, ...] = ()

    @property
    def ips(self) -> tuple[str, ...]:
        return self.node_ips or ((self.node_ip,) if self.node_ip else ())


@dataclass(frozen=True)
class DeploymentView:
    """One Serve deployment: the target the autoscaler set and the live replicas
    (ray.serve.schema.DeploymentDetails.target_num_replicas, .replicas)."""

    target: int | None
    replicas: tuple[ReplicaView, ...] = ()

    @property
    def running(self) -> int:
        return sum(r.state == "RUNNING" for r in self.replicas)

    def with_spans(self, spans: dict[str, tuple[str, ...]]) -> "DeploymentView":
        """The same deployment with each replica's nodes filled in from `replica_spans` (by actor name)."""
        return replace(self, replicas=tuple(replace(r, node_ips=spans.get(r.actor_name or "", r.node_ips))
                                            for r in self.replicas))


@dataclass(frozen=True)
class ServeApp:
    """The Serve application: its status, message and deployments (by Serve deployment name)."""

    status: str
    message: str = ""
    deployments: dict[str, DeploymentView] = field(default_factory=dict)
    # The config the application was deployed with (`deployed_app_config`); None when it was deployed
    # by serve.run rather than from a config, or when the head runs no such application.
    deployed_config: dict[str, Any] | None = None


def parse_application(data: Any, name: str = APP_NAME) -> ServeApp:
    """`GET /api/serve/applications/` (ray.serve.schema.ServeInstanceDetails as JSON) -> one ServeApp."""
    app = ((data or {}).get("applications") or {}).get(name) if isinstance(data, dict) else None
    if not app:
        return ServeApp("NOT_DEPLOYED", f"the head runs no Serve application named {name!r}")
    deployments: dict[str, DeploymentView] = {}
    for dep_name, info in (app.get("deployments") or {}).items():
        info = info or {}
        target = info.get("target_num_replicas")
        replicas = tuple(ReplicaView(state=str(r.get("state") or ""), node_ip=r.get("node_ip"), node_id=r.get("node_id"),
                                     actor_name=r.get("actor_name"))
                         for r in info.get("replicas") or [] if isinstance(r, dict))
        deployments[dep_name] = DeploymentView(target=int(target) if isinstance(target, (int, float)) else None,
                                               replicas=replicas)
    message = app.get("message") or ""
    if not message:
        bad = [f"{d}: {info.get('status')} {info.get('message', '')}".strip()
               for d, info in (app.get("deployments") or {}).items()
               if (info or {}).get("status") not in (None, "HEALTHY")]
        message = "; ".join(bad)
    deployed = app.get("deployed_app_config")
    return ServeApp(str(app.get("status") or "Unknown"), message, deployments,
                    deployed if isinstance(deployed, dict) else None)


def _state_rows(data: Any) -> list[dict]:
    """Rows of a state API answer ({"data": {"result": {"result": [...]}}})."""
    try:
        rows = data["data"]["result"]["result"]
    except (KeyError, TypeError):
        return []
    return [r for r in rows if isinstance(r, dict)] if isinstance(rows, list) else []


def parse_replica_spans(placement_groups: Any, nodes: Any) -> dict[str, tuple[str, ...]]:
    """Placement group name (= the replica's actor name) -> the IPs of the nodes its bundles hold."""
    ip_of = {n.get("node_id"): n.get("node_ip") for n in _state_rows(nodes)}
    spans: dict[str, tuple[str, ...]] = {}
    for pg in _state_rows(placement_groups):
        if pg.get("state") == "REMOVED" or not pg.get("name"):
            continue
        ips = {ip_of.get(b.get("node_id")) for b in pg.get("bundles") or [] if isinstance(b, dict)}
        ips.discard(None)
        if ips:
            spans[pg["name"]] = tuple(sorted(ips))
    return spans


class RayHeadError(Exception):
    """The head could not be reached or refused the request. `unreachable` is True for network errors."""

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class RayHeadClient:
    """Async client for one Ray head. Pass a shared `http` client to reuse its connections (the operator
    does: building an httpx client loads the TLS trust store, too costly for a loop every few seconds);
    without one, the client makes its own and closes it on exit."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 5.0,
                 transport: httpx.AsyncBaseTransport | None = None, http: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._timeout = timeout
        self._own = http is None
        self._client = http if http is not None else httpx.AsyncClient(timeout=timeout, transport=transport)

    async def __aenter__(self) -> "RayHeadClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._own:
            await self._client.aclose()

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            resp = await self._client.request(method, self.base_url + path, json=body, headers=self._headers,
                                              timeout=self._timeout)
        except httpx.TimeoutException as exc:
            raise RayHeadError(f"timed out after {self._timeout:g}s ({type(exc).__name__})", unreachable=True) from exc
        except httpx.TransportError as exc:
            raise RayHeadError(f"{type(exc).__name__}: {exc or 'connection failed'}", unreachable=True) from exc
        if resp.status_code in (401, 403):
            raise RayHeadError(f"the dashboard refused the Ray token (HTTP {resp.status_code}); is RAY_AUTH_MODE=token "
                               "set with the same token on the head?", unreachable=False)
        if resp.status_code >= 400:
            raise RayHeadError(f"{method} {path} answered HTTP {resp.status_code}: {resp.text[:300]}", unreachable=False)
        return resp

    async def deploy(self, body: dict[str, Any]) -> None:
        """Declaratively (re)deploy the Serve applications in `body` (`ServeAppConfig.deploy_body`)."""
        await self._request("PUT", SERVE_APPLICATIONS, body)

    async def application(self, name: str = APP_NAME) -> ServeApp:
        """The Serve application `name` with its deployments' targets and replicas (status NOT_DEPLOYED
        when the head has none by that name)."""
        resp = await self._request("GET", SERVE_APPLICATIONS)
        try:
            data = resp.json()
        except ValueError as exc:
            raise RayHeadError(f"the dashboard answered something that is not JSON: {resp.text[:200]}", unreachable=False) from exc
        return parse_application(data, name)

    async def replica_spans(self) -> dict[str, tuple[str, ...]]:
        """Every node each replica holds (see PLACEMENT_GROUPS): two calls to Ray's state API."""
        pgs = await self._request("GET", PLACEMENT_GROUPS)
        nodes = await self._request("GET", NODES)
        try:
            return parse_replica_spans(pgs.json(), nodes.json())
        except ValueError as exc:
            raise RayHeadError(f"the state API answered something that is not JSON: {exc}", unreachable=False) from exc

    async def application_status(self, name: str = APP_NAME) -> tuple[str, str]:
        """(status, message) of one Serve application; ("NOT_DEPLOYED", ...) when the head has none by that name."""
        app = await self.application(name)
        return app.status, app.message
