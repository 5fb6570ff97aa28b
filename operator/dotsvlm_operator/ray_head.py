"""Client for the Ray head's dashboard REST API: deploy the Serve application and read its status.

The operator talks to `http://<name>-ray-head.<ns>.svc:8265` with the deployment's Ray token
(`Authorization: Bearer`, Ray's token authentication). Every failure becomes a `RayHeadError` whose
message says what went wrong in words, so status can show it as is.
"""

from __future__ import annotations

from typing import Any

import httpx

from dotsvlm_serving.serve_config import APP_NAME

SERVE_APPLICATIONS = "/api/serve/applications/"


class RayHeadError(Exception):
    """The head could not be reached or refused the request. `unreachable` is True for network errors."""

    def __init__(self, message: str, *, unreachable: bool) -> None:
        super().__init__(message)
        self.unreachable = unreachable


class RayHeadClient:
    """Async client for one Ray head. Create one per reconcile; it holds no state besides the connection."""

    def __init__(self, base_url: str, token: str | None, *, timeout: float = 5.0,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._client = httpx.AsyncClient(base_url=self.base_url, headers=headers, timeout=timeout, transport=transport)

    async def __aenter__(self) -> "RayHeadClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
        try:
            resp = await self._client.request(method, path, json=body)
        except httpx.TimeoutException as exc:
            raise RayHeadError(f"timed out after {self._client.timeout.connect}s ({type(exc).__name__})", unreachable=True) from exc
        except httpx.TransportError as exc:
            raise RayHeadError(f"{type(exc).__name__}: {exc or 'connection failed'}", unreachable=True) from exc
        if resp.status_code in (401, 403):
            raise RayHeadError(f"the dashboard refused the Ray token (HTTP {resp.status_code}); is RAY_AUTH_MODE=token "
                               "set with the same token on the head?", unreachable=False)
        if resp.status_code >= 400:
            raise RayHeadError(f"{method} {path} answered HTTP {resp.status_code}: {resp.text[:300]}", unreachable=False)
        return resp

    async def deploy(self, body: dict[str, Any]) -> None:
        """Declaratively (re)deploy the Serve applications in `body` (serve_deploy_body)."""
        await self._request("PUT", SERVE_APPLICATIONS, body)

    async def application_status(self, name: str = APP_NAME) -> tuple[str, str]:
        """(status, message) of one Serve application; ("NOT_DEPLOYED", ...) when the head has none by that name."""
        resp = await self._request("GET", SERVE_APPLICATIONS)
        try:
            data = resp.json()
        except ValueError as exc:
            raise RayHeadError(f"the dashboard answered something that is not JSON: {resp.text[:200]}", unreachable=False) from exc
        app = (data.get("applications") or {}).get(name)
        if not app:
            return "NOT_DEPLOYED", f"the head runs no Serve application named {name!r}"
        message = app.get("message") or ""
        if not message:
            bad = [f"{d}: {info.get('status')} {info.get('message', '')}".strip()
                   for d, info in (app.get("deployments") or {}).items()
                   if info.get("status") not in (None, "HEALTHY")]
            message = "; ".join(bad)
        return str(app.get("status") or "Unknown"), message
