"""Driver for test_head_restart_ray.py, run in its own process (its own Ray cluster).

`spec.head.gcsFaultTolerance` with an API pool, on a real local Ray: the head keeps the cluster's state (GCS
tables, Serve's checkpoint) in an external Redis, so when the head restarts the worker nodes stay, and so do
the replicas on them. Here a pod is a raylet: the head (no pool, no control resource: Serve's controller and
a proxy only), one pool node with both pools' resources, and one API node with the control resource (the API
and the tensor queue) and its own Serve proxy. Each worker node's proxy binds its own port
(RAY_SERVE_WORKER_PROXY_HTTP_PORT), as each pod has its own IP, so requests can be sent to the API node's
proxy alone. The head is killed outright (a crash or an eviction; an orderly head stop drains the API first,
tests/serving/test_head_drain_ray.py) and started again on the same GCS port with the same Redis, the way the
Deployment's new head pod comes up behind the same Service. From a few seconds before the kill until a few
seconds after the new head answers, one client sends the same greedy request to the API node's proxy, one
after the other, and another polls that proxy's /health.

Prints one JSON line: every replica (actor id, pid, node) before and after, whether the worker processes
lived through the outage, the tokens of one greedy request before and after (through the head's proxy),
what the requests and /health polls to the API node got, how many were sent while the head was down, how
long the head took to answer again, and when each phase ended (seconds from the cluster's start).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

LEAD_S = 2.0  # the client is sending this long before the head is killed
OUTAGE_S = 5.0  # the head is down this long (a new pod is scheduled, pulls, starts)
TAIL_S = 2.0  # and keeps sending this long after the new head answers


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


def _health(url: str) -> str | None:
    """None if `url`/health answers 200, else what it got."""
    import httpx

    try:
        r = httpx.get(url + "/health", timeout=30)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if r.status_code == 200 else f"{r.status_code}: {r.text[:300]}"


class Traffic:
    """Two client threads against one proxy: greedy requests back to back, and /health every 0.5 s; each
    result with when it was sent (time.monotonic())."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.requests: list[tuple[float, float, dict[str, str]]] = []  # (sent, answered, _ask's result)
        self.health: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._ask_loop, daemon=True),
                         threading.Thread(target=self._health_loop, daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self, join: bool = True) -> None:
        self._stop.set()
        for t in self._threads if join else ():
            t.join(150)

    def _ask_loop(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            got = _ask(self.url)
            self.requests.append((sent, time.monotonic(), got))

    def _health_loop(self) -> None:
        while not self._stop.is_set():
            sent = time.monotonic()
            self.health.append((sent, _health(self.url)))
            self._stop.wait(max(0.0, 0.5 - (time.monotonic() - sent)))

    def summary(self, expected: str | None, killed_at: float, restarted_at: float, healthy_at: float) -> dict:
        answers = [got.get("answer") for _, _, got in self.requests]
        return {
            "sent": len(self.requests),
            "sent_while_head_down": sum(killed_at <= s < restarted_at for s, _, _ in self.requests),
            "sent_until_head_answered": sum(killed_at <= s < healthy_at for s, _, _ in self.requests),
            "distinct_answers": sorted({a for a in answers if a is not None}),
            "wrong_answers": sum(a is not None and a != expected for a in answers),
            "errors": [got["error"] for _, _, got in self.requests if "error" in got][:10],
            "slowest_s": round(max((a - s for s, a, _ in self.requests), default=0.0), 2),
            "health_polls": len(self.health),
            "health_polls_while_head_down": sum(killed_at <= s < restarted_at for s, _ in self.health),
            "health_failures": [err for _, err in self.health if err is not None][:10]}


def _replicas() -> dict[str, list[tuple[str, int, str]]]:
    """(actor id, pid, node id) of each live replica of the application, by deployment."""
    from serving_support import live_replicas

    node_of = {aid: node for reps in live_replicas("NodeID").values() for aid, node in reps}
    return {d: sorted((aid, pid, node_of.get(aid)) for aid, pid in reps) for d, reps in live_replicas("Pid").items()}


def _nodes() -> dict[str, str]:
    """The node id of each alive raylet by its role: "api" (the control resource), "pool", "head"."""
    import ray

    from dotsvlm_serving.serve_config import CONTROL_RESOURCE, LLM_POOL_RESOURCE

    out = {}
    for n in ray.nodes():
        if n["Alive"]:
            res = n["Resources"]
            role = "api" if CONTROL_RESOURCE in res else "pool" if LLM_POOL_RESOURCE in res else "head"
            out[role] = n["NodeID"]
    return out


def main() -> int:
    import ray
    from serving_support import (free_port, pool_app_config, serve_app_on_cluster, start_cluster, stop_cluster,
                                 wait_healthy)
    from support.redis_server import RedisServer

    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    from dotsvlm_serving.serve_config import (CONTROL_RESOURCE, CONTROL_RESOURCE_CAPACITY, LLM_POOL_RESOURCE,
                                              POOL_RESOURCE_CAPACITY, VISION_POOL_RESOURCE)

    port, model_dir = int(sys.argv[1]), sys.argv[2]
    pool_port, api_port = free_port(), free_port()
    model = ensure_tiny_checkpoint(model_dir)
    redis = RedisServer()
    # What the operator sets on the head pod (builders.gcs_fault_tolerance_env) and on the worker pods.
    os.environ["RAY_REDIS_ADDRESS"] = redis.address
    os.environ["RAY_external_storage_namespace"] = "head-restart-test"
    os.environ["RAY_gcs_rpc_server_reconnect_timeout_s"] = "300"
    env = {"OMP_NUM_THREADS": "1"}
    head_args = dict(num_cpus=1, include_dashboard=False, env_vars=env)  # nothing of the application's
    pool_args = dict(num_cpus=2, env_vars={**env, "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(pool_port)},
                     resources={VISION_POOL_RESOURCE: POOL_RESOURCE_CAPACITY,
                                LLM_POOL_RESOURCE: POOL_RESOURCE_CAPACITY})
    api_args = dict(num_cpus=1, env_vars={**env, "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(api_port)},
                    resources={CONTROL_RESOURCE: CONTROL_RESOURCE_CAPACITY})
    t0 = time.monotonic()
    cluster = start_cluster(head_args, [pool_args, api_args])
    phases = {"cluster_up": time.monotonic() - t0}
    address = cluster.address
    api_url = f"http://127.0.0.1:{api_port}"
    traffic = Traffic(api_url)
    try:
        url = serve_app_on_cluster(cluster, port, pool_app_config(model, request_timeout_s=120), env,
                                   proxy_location="EveryNode")
        phases["head_proxy_answers"] = time.monotonic() - t0
        wait_healthy(api_url, 300)  # the API node's own proxy
        phases["api_proxy_answers"] = time.monotonic() - t0
        nodes_before = _nodes()
        answer_before = _ask(url)
        before = _replicas()
        ray.shutdown()  # this driver is a client of the head too: reconnect after
        worker_pids = [pid for reps in before.values() for _, pid, _ in reps]
        traffic.start()
        time.sleep(LEAD_S)
        cluster.remove_node(cluster.head_node, allow_graceful=False)  # the head pod dies
        killed_at = time.monotonic()
        phases["head_killed"] = killed_at - t0
        time.sleep(OUTAGE_S)
        alive_during = {pid: os.path.exists(f"/proc/{pid}") for pid in worker_pids}
        restarted_at = time.monotonic()
        cluster.add_node(**head_args, gcs_server_port=int(address.split(":")[1]))  # the new head pod
        ray.init(address=address, logging_level="WARNING", log_to_driver=False)
        wait_healthy(url, 300)
        healthy_at = time.monotonic()
        phases["new_head_answers"] = healthy_at - t0
        time.sleep(TAIL_S)
        traffic.stop()
        phases["traffic_stopped"] = time.monotonic() - t0
        answer_after = _ask(url)
        after, nodes_after = _replicas(), _nodes()
        out = {"nodes_before": nodes_before, "nodes_after": nodes_after,
               "answer_before": answer_before, "answer_after": answer_after,
               "head_back_s": round(healthy_at - killed_at, 1), "head_down_s": round(restarted_at - killed_at, 1),
               "before": before, "after": after, "alive_during_outage": alive_during,
               "alive_after": {pid: os.path.exists(f"/proc/{pid}") for pid in worker_pids},
               "traffic": traffic.summary(answer_before.get("answer"), killed_at, restarted_at, healthy_at)}
        phases["checked"] = time.monotonic() - t0
        stop_cluster(cluster)  # the resource is deleted: its head is gone; then the operator's cleanup Job runs
        cluster = None
        pattern = f"RAY{os.environ['RAY_external_storage_namespace']}@*"
        out["keys_before_cleanup"] = len(redis.keys(pattern))
        cleanup = subprocess.run([sys.executable, "-m", "dotsvlm_operator.cli", "cleanup-redis"], capture_output=True,
                                 text=True, timeout=300)
        out["cleanup"] = {"rc": cleanup.returncode, "said": (cleanup.stdout + cleanup.stderr).strip()[-500:]}
        out["keys_after_cleanup"] = len(redis.keys(pattern))
        out["phases_s"] = {k: round(v, 1) for k, v in {**phases, "cleaned_up": time.monotonic() - t0}.items()}
        print(json.dumps(out), flush=True)
        return 0
    finally:
        traffic.stop(join=False)
        try:
            if cluster is not None:
                stop_cluster(cluster)
        finally:
            redis.stop()


if __name__ == "__main__":
    sys.exit(main())
