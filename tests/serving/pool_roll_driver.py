"""Driver for test_node_drain.py's rolling-update test, run in its own process (its own Ray cluster).

What a change of `spec.image` does to the pools on Kubernetes, on a real local Ray: the operator rolls the
vision pool, then the LLM pool (tests/operator: the order and the pod templates); each pool pod that goes
runs its preStop (`dotsvlm drain-node`, deadline = the pool's default grace period less the stop margin)
and its replacement joins. Here a pod is a raylet with its pool's resource: for each pool in turn a new
raylet joins, the old one is drained the way its pod's preStop drains it, then removed.

Requests run all the while: image requests and long text streams, each one new as soon as the last ended.
Prints one JSON line: every request's outcome, where each pool's replica ran before and after, and the
replica ids of the ingress and the tensor queue (on the head, which this roll does not touch).
"""

from __future__ import annotations

import base64
import io
import json
import os
import sys
import threading
import time

STREAM_TOKENS = 120
IMAGE_TOKENS = 12


def _png(i: int) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (160 + 8 * (i % 10), 120), (i % 255, 40, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _request(url: str, i: int, stream: bool) -> dict:
    """One request; its outcome: 'ok' (status 200 and every token) or what went wrong."""
    import httpx

    if stream:
        content: str | list = f"Tell me a long story, number {i}."
        max_tokens = STREAM_TOKENS
    else:
        content = [{"type": "image_url", "image_url": {"url": _png(i)}}, {"type": "text", "text": f"image {i}"}]
        max_tokens = IMAGE_TOKENS
    body = {"model": "dots.vlm1", "max_tokens": max_tokens, "ignore_eos": True, "stream": stream,
            "messages": [{"role": "user", "content": content}]}
    if stream:
        body["stream_options"] = {"include_usage": True}
    started = time.monotonic()
    try:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=300)
    except httpx.HTTPError as exc:
        return {"kind": "stream" if stream else "image", "outcome": f"{type(exc).__name__}: {exc}", "started": started}
    outcome = f"{r.status_code}: {r.text[:300]}"
    if r.status_code == 200:
        if stream:
            lines = [x[6:] for x in r.text.splitlines() if x.startswith("data: ")]
            tokens = json.loads(lines[-2]).get("usage", {}).get("completion_tokens") if len(lines) > 1 else None
            outcome = "ok" if lines and lines[-1] == "[DONE]" and tokens == max_tokens else f"stream: {r.text[-300:]}"
        else:
            tokens = r.json()["usage"]["completion_tokens"]
            outcome = "ok" if tokens == max_tokens else f"short answer: {tokens} tokens"
    return {"kind": "stream" if stream else "image", "outcome": outcome, "started": started, "ended": time.monotonic()}


def main() -> int:
    from serving_support import (add_node_with_retry, live_replicas, pool_app_config, serve_app_on_cluster,
                                 start_cluster, stop_cluster)

    from dotsvlm_operator.models import LLMPool, VisionPool
    from dotsvlm_operator.naming import POD_STOP_MARGIN_S
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    from dotsvlm_serving.node_drain import drain_node
    from dotsvlm_serving.serve_config import (CONTROL_RESOURCE, CONTROL_RESOURCE_CAPACITY, INGRESS_DEPLOYMENT,
                                              LLM_DEPLOYMENT, LLM_POOL_RESOURCE, POOL_RESOURCE_CAPACITY, QUEUE_DEPLOYMENT,
                                              VISION_DEPLOYMENT, VISION_POOL_RESOURCE)

    port, model_dir = int(sys.argv[1]), sys.argv[2]
    model = ensure_tiny_checkpoint(model_dir)
    env = {"OMP_NUM_THREADS": "1"}
    pool_node = {"vision": dict(num_cpus=2, resources={VISION_POOL_RESOURCE: POOL_RESOURCE_CAPACITY}, env_vars=env),
                 "llm": dict(num_cpus=2, resources={LLM_POOL_RESOURCE: POOL_RESOURCE_CAPACITY}, env_vars=env)}
    # The preStop's deadline on the pools' default grace periods (what the operator writes into the pods).
    deadline_s = {"vision": VisionPool.model_fields["termination_grace_period_seconds"].default - POD_STOP_MARGIN_S,
                  "llm": LLMPool.model_fields["termination_grace_period_seconds"].default - POD_STOP_MARGIN_S}
    cluster = start_cluster(
        dict(num_cpus=2, include_dashboard=False, resources={CONTROL_RESOURCE: CONTROL_RESOURCE_CAPACITY}, env_vars=env),
        [pool_node["vision"], pool_node["llm"]])
    try:
        url = serve_app_on_cluster(cluster, port, pool_app_config(model, request_timeout_s=300), env)

        def replicas() -> dict[str, list[tuple[str, str]]]:
            """(actor id, node id) of each live replica, by deployment."""
            return live_replicas("NodeID")

        results: list[dict] = []
        stop = threading.Event()

        def client(k: int, stream: bool) -> None:
            i = 0
            while not stop.is_set():
                results.append(_request(url, 1000 * k + i, stream))
                i += 1

        before = replicas()
        clients = [threading.Thread(target=client, args=(k, k % 2 == 1), daemon=True) for k in range(4)]
        for t in clients:
            t.start()
        time.sleep(3)  # requests are running on both pools now
        rolls = []
        for pool, deployment in (("vision", VISION_DEPLOYMENT), ("llm", LLM_DEPLOYMENT)):
            (old_node,) = {node for _, node in replicas()[deployment]}
            started = time.monotonic()
            add_node_with_retry(cluster, **pool_node[pool])  # the new pod joins
            res = drain_node(cluster.address, deadline_s=deadline_s[pool], node_id=old_node, poll_s=0.5)  # preStop
            old = next(n for n in cluster.worker_nodes if n.node_id == old_node)
            cluster.remove_node(old)  # the pod stops
            now_on = {node for _, node in replicas().get(deployment, [])}
            rolls.append({"pool": pool, "drained": res.drained, "message": res.message, "drain_s": res.seconds,
                          "old_node": old_node, "now_on": sorted(now_on), "seconds": round(time.monotonic() - started, 1),
                          "requests_ok_so_far": sum(r["outcome"] == "ok" for r in results)})
        # Requests keep coming for a while on the new nodes, then the clients finish what they hold.
        served_after = sum(r["outcome"] == "ok" for r in results)
        deadline = time.monotonic() + 120
        while sum(r["outcome"] == "ok" for r in results) < served_after + 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        stop.set()
        for t in clients:
            t.join(timeout=320)
        after = replicas()
        print(json.dumps({
            "rolls": rolls, "clients_done": not any(t.is_alive() for t in clients),
            "requests": len(results), "by_kind": {k: sum(r["kind"] == k for r in results) for k in ("image", "stream")},
            "failures": [r for r in results if r["outcome"] != "ok"],
            "control_before": {d: sorted(a for a, _ in before.get(d, [])) for d in (INGRESS_DEPLOYMENT, QUEUE_DEPLOYMENT)},
            "control_after": {d: sorted(a for a, _ in after.get(d, [])) for d in (INGRESS_DEPLOYMENT, QUEUE_DEPLOYMENT)},
            "replicas_after": {d: sorted(n for _, n in after.get(d, [])) for d in (VISION_DEPLOYMENT, LLM_DEPLOYMENT)},
        }), flush=True)
        return 0
    finally:
        stop_cluster(cluster)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
