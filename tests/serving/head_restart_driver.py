"""Driver for test_head_restart_ray.py, run in its own process (its own Ray cluster).

`spec.head.gcsFaultTolerance` on a real local Ray: the head keeps the cluster's state (GCS tables, Serve's
checkpoint) in an external Redis, so when the head restarts the pool nodes stay, and so do the replicas on
them. Here a pod is a raylet: the head (with the control resource: API and tensor queue) and one pool node
with both pools' resources. The head is killed outright (a crash or an eviction; an orderly head stop drains
the API first, tests/serving/test_head_drain_ray.py) and started again on the same GCS port with the same
Redis, the way the Deployment's new head pod comes up behind the same Service.

Prints one JSON line: the vision and LLM replicas (actor id, pid) before and after, whether their processes
lived through the outage, the tokens of one greedy request before and after, and how long the API took to
answer again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path


def _ask(url: str) -> dict[str, str]:
    """A greedy image + text request: {"answer": ...}, or {"error": what went wrong}."""
    import httpx
    from pool_roll_driver import _png

    body = {"model": "dots.vlm1", "max_tokens": 8, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": _png(3)}},
                                                      {"type": "text", "text": "what is this?"}]}]}
    try:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    except httpx.HTTPError as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    if r.status_code != 200:
        return {"error": f"{r.status_code}: {r.text[:300]}"}
    return {"answer": r.json()["choices"][0]["message"]["content"]}


def main() -> int:
    import ray
    from serving_support import (live_replicas, pool_app_config, serve_app_on_cluster, start_cluster, stop_cluster,
                                 wait_healthy)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support.*
    from support.redis_server import RedisServer

    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    from dotsvlm_serving.serve_config import (CONTROL_RESOURCE, CONTROL_RESOURCE_CAPACITY, LLM_DEPLOYMENT,
                                              LLM_POOL_RESOURCE, POOL_RESOURCE_CAPACITY, VISION_DEPLOYMENT,
                                              VISION_POOL_RESOURCE)

    port, model_dir = int(sys.argv[1]), sys.argv[2]
    model = ensure_tiny_checkpoint(model_dir)
    redis = RedisServer()
    # What the operator sets on the head pod (builders.gcs_fault_tolerance_env) and on the pool pods.
    os.environ["RAY_REDIS_ADDRESS"] = redis.address
    os.environ["RAY_external_storage_namespace"] = "head-restart-test"
    os.environ["RAY_gcs_rpc_server_reconnect_timeout_s"] = "300"
    env = {"OMP_NUM_THREADS": "1"}
    head_args = dict(num_cpus=2, include_dashboard=False, resources={CONTROL_RESOURCE: CONTROL_RESOURCE_CAPACITY},
                     env_vars=env)
    cluster = start_cluster(head_args, [dict(num_cpus=2, env_vars=env, resources={
        VISION_POOL_RESOURCE: POOL_RESOURCE_CAPACITY, LLM_POOL_RESOURCE: POOL_RESOURCE_CAPACITY})])
    address = cluster.address
    try:
        url = serve_app_on_cluster(cluster, port, pool_app_config(model, request_timeout_s=120), env)
        answer_before = _ask(url)
        before = live_replicas("Pid")
        ray.shutdown()  # this driver is a client of the head too: reconnect after
        pool_pids = [pid for dep in (VISION_DEPLOYMENT, LLM_DEPLOYMENT) for _, pid in before.get(dep, [])]
        cluster.remove_node(cluster.head_node, allow_graceful=False)  # the head pod dies
        killed_at = time.monotonic()
        time.sleep(5)  # the head is down a while (a new pod is scheduled, pulls, starts)
        alive_during = {pid: os.path.exists(f"/proc/{pid}") for pid in pool_pids}
        cluster.add_node(**head_args, gcs_server_port=int(address.split(":")[1]))  # the new head pod
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        wait_healthy(url, 300)
        answer_after = _ask(url)
        back_s = time.monotonic() - killed_at
        after = live_replicas("Pid")
        out = {"answer_before": answer_before, "answer_after": answer_after, "back_s": round(back_s, 1),
               "before": before, "after": after, "alive_during_outage": alive_during,
               "alive_after": {pid: os.path.exists(f"/proc/{pid}") for pid in pool_pids}}
        stop_cluster(cluster)  # the resource is deleted: its head is gone; then the operator's cleanup Job runs
        cluster = None
        pattern = f"RAY{os.environ['RAY_external_storage_namespace']}@*"
        out["keys_before_cleanup"] = len(redis.keys(pattern))
        cleanup = subprocess.run([sys.executable, "-m", "dotsvlm_operator.cli", "cleanup-redis"], capture_output=True,
                                 text=True, timeout=300)
        out["cleanup"] = {"rc": cleanup.returncode, "said": (cleanup.stdout + cleanup.stderr).strip()[-500:]}
        out["keys_after_cleanup"] = len(redis.keys(pattern))
        print(json.dumps(out), flush=True)
        return 0
    finally:
        try:
            if cluster is not None:
                stop_cluster(cluster)
        finally:
            redis.stop()


if __name__ == "__main__":
    sys.exit(main())
