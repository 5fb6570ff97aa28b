"""A Ray node lost under load, on a real two-node local Ray cluster (CPU, tiny model).

What a GPU node's loss does to Ray: every replica on it dies at once and its pool resource disappears.
`ray.cluster_utils.Cluster` runs a second raylet on this machine with one LLM pool slot, so one of the two
LLM replicas lives there; the test removes that node (no grace) while both replicas hold requests. Every
request must end: 200 with all its tokens (work held by the lost replica goes back to the tensor queue
and another replica serves it), or a clear 503 that says to retry (a stream that had already sent tokens);
none hangs. The service keeps serving on the surviving node, and when a replacement node joins (what
the operator's replacement pod is), Serve places the missing replica there by itself.

The Kubernetes side of the same event (pods replaced, Degraded and back to Ready with the scheduler's
reason) is `tests/operator/test_operator_autoscaling.py::test_gpu_node_lost_under_load_...`: kwok pods run
no containers, so the two halves are tested where each is real.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from serving_support import free_port, add_node_with_retry, queue_stats, start_cluster, stop_cluster, wait_healthy

pytestmark = [pytest.mark.slow, pytest.mark.ray]

POOL = "dotsvlm_pool_llm"
MAX_TOKENS = 160


def _llm_nodes() -> dict[str, str]:
    """LLM replica actor id -> node id, for the replicas that are alive."""
    import ray._private.state as gcs_state  # reads the GCS directly: no dashboard needed

    return {aid: a["Address"]["NodeID"] for aid, a in gcs_state.actors().items()
            if a.get("State") == "ALIVE" and "LLMServer" in (a.get("Name") or "")}


async def _one(client: httpx.AsyncClient, i: int) -> tuple[str, int, str]:
    stream = i % 4 == 0
    body = {"model": "dots.vlm1", "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": f"node loss {i}"}]}
    try:
        if stream:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                text = "".join([x async for x in r.aiter_text()])
            return "stream", r.status_code, text
        r = await client.post("/v1/chat/completions", json=body)
        return "plain", r.status_code, r.text
    except httpx.HTTPError as exc:
        return "stream" if stream else "plain", -1, f"{type(exc).__name__}: {exc}"


def _check(kind: str, code: int, text: str) -> str:
    """The outcome's name, or an AssertionError that says what was wrong with it."""
    if kind == "plain":
        if code == 200:
            assert json.loads(text)["usage"]["completion_tokens"] == MAX_TOKENS, text[:300]
            return "complete"
        assert code in (503, 429) and "retry" in json.loads(text)["error"]["message"].lower(), (code, text[:300])
        return f"{code}"
    assert code == 200, (code, text[:300])  # a stream's status is sent before its first token
    assert text.rstrip().endswith("data: [DONE]"), text[-300:]
    if '"finish_reason":"length"' in text:
        return "complete"
    assert "retry" in text.lower(), text[-300:]
    return "stream-error"


def test_llm_node_lost_under_load_requests_end_cleanly_and_a_new_node_gets_the_replica(tmp_path) -> None:
    import ray
    from ray import serve

    from dotsvlm_serving.app import deploy_local
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    from dotsvlm_serving.serve_config import CONTROL_RESOURCE, ServeAppConfig

    assert not ray.is_initialized(), "this test starts its own two-node Ray (run it before the shared `served` app)"
    model = ensure_tiny_checkpoint(tmp_path / "tiny")
    cluster = start_cluster(dict(num_cpus=4, resources={POOL: 1, CONTROL_RESOURCE: 1000}, include_dashboard=False,
                                 env_vars={"OMP_NUM_THREADS": "1"}),
                            [dict(num_cpus=2, resources={POOL: 1}, env_vars={"OMP_NUM_THREADS": "1"})])
    (worker,) = cluster.worker_nodes
    try:
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        cfg = ServeAppConfig.model_validate({
            "model_path": str(model),
            "control_resource": CONTROL_RESOURCE,  # ingress and queue on the head, as the operator deploys them
            # One LLM replica per node (one pool slot each); the queue gives a lost replica's work back.
            "llm": {"context_length": 1024, "max_running_requests": 2, "max_new_tokens_default": 16,
                    "pool_resource": POOL, "autoscaling": {"min_replicas": 2, "max_replicas": 2}},
            "queue": {"lease_timeout_s": 5.0, "max_deliveries": 3},
            "api": {"request_timeout_s": 240},
        })
        port = free_port()
        # Both raylets share this machine's network: one HTTP proxy, on the head (in Kubernetes each Ray
        # pod has its own address and Serve's default of a proxy per node is fine).
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        deploy_local(cfg, host="127.0.0.1", port=port)
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 300)
        deadline = time.monotonic() + 120
        while len(set(_llm_nodes().values())) < 2:  # Serve placed the second replica on the worker node
            assert time.monotonic() < deadline, f"LLM replicas not on two nodes: {_llm_nodes()}"
            time.sleep(0.5)
        lost_node = worker.node_id
        assert lost_node in _llm_nodes().values()

        async def scenario() -> list[tuple[str, int, str]]:
            async with httpx.AsyncClient(base_url=url, timeout=280) as client:
                load = asyncio.gather(*(_one(client, i) for i in range(12)))
                task = asyncio.ensure_future(load)
                until = time.monotonic() + 60
                while time.monotonic() < until:  # remove the node once both replicas hold work
                    consumers = (await asyncio.to_thread(queue_stats))["consumers"]
                    if len(consumers) == 2 and all(c["leased"] > 0 for c in consumers.values()):
                        break
                    await asyncio.sleep(0.1)
                await asyncio.sleep(0.5)
                await asyncio.to_thread(cluster.remove_node, worker, False)  # no grace: the node is gone
                return await task

        results = asyncio.run(scenario())
        outcomes = [_check(*r) for r in results]
        assert len(outcomes) == 12, outcomes
        assert outcomes.count("complete") >= 6, outcomes
        print(f"node loss outcomes: { {o: outcomes.count(o) for o in set(outcomes)} }")
        deadline = time.monotonic() + 180  # the GCS marks the lost node's actors dead after its health checks
        while lost_node in _llm_nodes().values():
            assert time.monotonic() < deadline, "the lost node's LLM replica is still reported alive"
            time.sleep(1)

        # The surviving node serves on its own...
        wait_healthy(url, 120)
        r = httpx.post(url + "/v1/chat/completions", timeout=120,
                       json={"model": "dots.vlm1", "max_tokens": 8, "messages": [{"role": "user", "content": "still there?"}]})
        assert r.status_code == 200, r.text
        # ...and a replacement node (the operator's replacement pod) gets the missing replica from Serve.
        add_node_with_retry(cluster, num_cpus=2, resources={POOL: 1}, env_vars={"OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 240
        while len(_llm_nodes()) < 2:
            assert time.monotonic() < deadline, f"no second LLM replica on the new node: {_llm_nodes()}"
            time.sleep(1)
        assert len(set(_llm_nodes().values())) == 2
    finally:
        stop_cluster(cluster)
