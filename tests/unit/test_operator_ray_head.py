"""The Ray head client against a fake dashboard (httpx MockTransport): auth header, deploy, status, errors."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from dotsvlm_operator.ray_head import RayHeadClient, RayHeadError


def _run(coro):
    return asyncio.run(coro)


def test_deploy_then_status_with_bearer_token() -> None:
    seen = []
    apps: dict = {}

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((req.method, req.url.path, req.headers.get("authorization")))
        if req.method == "PUT":
            apps["dotsvlm"] = {"status": "DEPLOYING", "message": "", "deployments": {
                "LLM": {"status": "UPDATING", "message": "waiting for GPUs"}, "Ingress": {"status": "HEALTHY"}}}
            assert json.loads(req.content)["applications"][0]["name"] == "dotsvlm"
            return httpx.Response(200)
        return httpx.Response(200, json={"applications": apps})

    async def go():
        async with RayHeadClient("http://head:8265/", "tok", transport=httpx.MockTransport(handler)) as c:
            assert await c.application_status() == ("NOT_DEPLOYED", "the head runs no Serve application named 'dotsvlm'")
            await c.deploy({"applications": [{"name": "dotsvlm"}]})
            return await c.application_status()

    status, message = _run(go())
    assert status == "DEPLOYING" and message == "LLM: UPDATING waiting for GPUs"
    assert seen[1] == ("PUT", "/api/serve/applications/", "Bearer tok")
    assert all(auth == "Bearer tok" for _, _, auth in seen)


def test_wrong_token_is_a_clear_error() -> None:
    async def go():
        async with RayHeadClient("http://head:8265", "bad",
                                 transport=httpx.MockTransport(lambda r: httpx.Response(401))) as c:
            await c.application_status()

    with pytest.raises(RayHeadError) as err:
        _run(go())
    assert not err.value.unreachable and "refused the Ray token" in str(err.value)


def test_unreachable_head() -> None:
    async def go():
        # Port 9 on loopback: nothing listens there.
        async with RayHeadClient("http://127.0.0.1:9", "t", timeout=2) as c:
            await c.application_status()

    with pytest.raises(RayHeadError) as err:
        _run(go())
    assert err.value.unreachable and "ConnectError" in str(err.value)



def test_replica_spans_read_ray_state_api_with_the_token() -> None:
    seen = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append((req.url.path, dict(req.url.params), req.headers.get("authorization")))
        rows = ([{"name": "SERVE_REPLICA::dotsvlm#LLMServer#x", "state": "CREATED",
                  "bundles": [{"node_id": "a"}, {"node_id": "b"}, {"node_id": "a"}]}]
                if req.url.path.endswith("placement_groups") else
                [{"node_id": "a", "node_ip": "10.1.0.5"}, {"node_id": "b", "node_ip": "10.1.0.9"}])
        return httpx.Response(200, json={"result": True, "msg": "", "data": {"result": {"result": rows}}})

    async def go():
        async with RayHeadClient("http://head:8265", "tok", transport=httpx.MockTransport(handler)) as c:
            return await c.replica_spans()

    assert _run(go()) == {"SERVE_REPLICA::dotsvlm#LLMServer#x": ("10.1.0.5", "10.1.0.9")}
    assert [p for p, _, _ in seen] == ["/api/v0/placement_groups", "/api/v0/nodes"]
    assert seen[0][1]["detail"] == "true" and all(a == "Bearer tok" for _, _, a in seen)
