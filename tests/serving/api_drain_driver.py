"""Driver for test_api_pool_drain_ray.py, run in its own process (its own Ray cluster).

An API pod (`spec.apiPool`) stops the way a pool pod does: its preStop (`dotsvlm drain-node`) drains its Ray
node, Serve starts the node's Ingress replica on another API node and stops the old one gracefully (its
graceful-shutdown timeout is the request timeout), and the old replica finishes its open streams. Here a pod
is a raylet: the head (Serve's controller and a proxy only: no control resource), one pool node (vision and
LLM) and two API nodes, A and B, each with the control resource and its own Serve proxy on its own port
(RAY_SERVE_WORKER_PROXY_HTTP_PORT), as each API pod has its own IP behind the API Service. Two Ingress
replicas, one per API node; the tensor queue (one replica) on one of them. The third argument says which API
node is drained: "ingress", the one that does NOT hold the queue (only its Ingress replica moves), or
"queue", the one that holds it (its Ingress replica and the tensor queue move: the old queue replica hands its
state to the new one as it stops).

A long greedy stream runs undisturbed first, then again through the drained node's proxy (and its Ingress
replica: a proxy prefers the replicas on its own node) while short requests keep going to the other API
node's proxy; meanwhile the node is drained with the deadline its pod's preStop gets by default. Prints one
JSON line: both streams, every short request's outcome, the drain's result, the replicas before and after,
which Ingress replica served the stream (from the replicas' logs), and when each step happened.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

MAX_TOKENS = 3000  # ~30 s while draining (~20 s undisturbed): Serve stops the old Ingress replica 12-15 s into the drain
REQUEST_TIMEOUT_S = 120.0  # modest: a drain that does not finish fails in minutes, not ten
STREAM_ID = "api-drain-long-stream"  # its x-request-id: the Ingress replica's access log names it
SHORT_EVERY_S = 0.25  # short requests to the other API node: about this often


def _stream(url: str, request_id: str, first_token: threading.Event | None = None) -> dict:
    """One long greedy stream: its text, how it ended, when each content chunk came (time.monotonic())."""
    import httpx
    from serving_support import chat_deltas

    body = {"model": "dots.vlm1", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse."}]}
    text, arrived, finish, error, status = [], [], None, None, None
    started = time.monotonic()
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers={"x-request-id": request_id},
                          timeout=REQUEST_TIMEOUT_S + 60) as r:
            status = r.status_code
            if r.status_code != 200:
                error = r.read().decode()[:500]
            for content, finished, err in chat_deltas(r.iter_lines() if r.status_code == 200 else ()):
                error = err or error
                if content:
                    text.append(content)
                    arrived.append(time.monotonic())
                    if first_token is not None:
                        first_token.set()
                finish = finished or finish
    except httpx.HTTPError as exc:  # the connection was cut: what had come until then
        error = f"{type(exc).__name__}: {exc}"
    if first_token is not None:
        first_token.set()  # (also when it failed: the driver goes on and reports it)
    return {"status": status, "text": "".join(text), "finish": finish, "error": error, "arrived": arrived,
            "ended_at": time.monotonic(), "seconds": round(time.monotonic() - started, 1)}


def _short(url: str, i: int) -> dict:
    """A short greedy text request (4 tokens): when sent and answered, and its status (or what went wrong)."""
    import httpx

    body = {"model": "dots.vlm1", "max_tokens": 4, "ignore_eos": True, "temperature": 0,
            "messages": [{"role": "user", "content": f"short question {i}"}]}
    sent = time.monotonic()
    try:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT_S + 30)
        got: int | str = r.status_code if r.status_code == 200 else f"{r.status_code}: {r.text[:300]}"
    except httpx.HTTPError as exc:
        got = f"{type(exc).__name__}: {exc}"
    return {"sent": sent, "answered": time.monotonic(), "got": got}


def _serve_replicas() -> dict[str, list[dict]]:
    """Every replica Serve's controller knows (any state), by deployment: replica id, state, node, actor, log."""
    from ray.serve.context import _get_global_client

    from dotsvlm_serving.serve_config import APP_NAME

    app = _get_global_client().get_serve_details()["applications"][APP_NAME]
    return {name: [{k: r.get(k) for k in ("replica_id", "state", "node_id", "actor_id", "log_file_path")}
                   for r in d["replicas"]] for name, d in app["deployments"].items()}


def _progress(step: str, t0: float) -> None:
    """Where the driver is, on stderr (shown when the test fails)."""
    print(f"[api-drain {time.monotonic() - t0:6.1f}s] {step}", file=sys.stderr, flush=True)


def main() -> int:
    import ray
    from ray import serve
    from serving_support import (free_port, live_replicas, pool_app_config, serve_app_on_cluster, start_cluster,
                                 wait_healthy)

    from dotsvlm_operator.naming import POD_STOP_MARGIN_S
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    from dotsvlm_serving.node_drain import drain_node
    from dotsvlm_serving.serve_config import (APP_NAME, CONTROL_RESOURCE, CONTROL_RESOURCE_CAPACITY,
                                              INGRESS_DEPLOYMENT, LLM_POOL_RESOURCE, POOL_RESOURCE_CAPACITY,
                                              QUEUE_DEPLOYMENT, VISION_POOL_RESOURCE)

    # The preStop's deadline on an API pod's default grace period (builders.api_pool_grace_seconds: the
    # request timeout + 2 margins) less the stop margin: Serve stops the old Ingress replica at the latest
    # its graceful-shutdown timeout (the request timeout) before it, 15 s after the drain starts.
    drain_deadline_s = int(REQUEST_TIMEOUT_S) + 2 * POD_STOP_MARGIN_S - POD_STOP_MARGIN_S
    port, model_dir = int(sys.argv[1]), sys.argv[2]
    which = sys.argv[3] if len(sys.argv) > 3 else "ingress"
    t0 = time.monotonic()
    written: dict = {}  # the tiny checkpoint is written while the raylets start
    writer = threading.Thread(target=lambda: written.update(model=ensure_tiny_checkpoint(model_dir)))
    writer.start()
    env = {"OMP_NUM_THREADS": "1"}
    ports = {"pool": free_port(), "a": free_port(), "b": free_port()}

    def worker(role: str, resources: dict, num_cpus: int) -> dict:
        return dict(num_cpus=num_cpus, resources=resources,
                    env_vars={**env, "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(ports[role])})

    api = {CONTROL_RESOURCE: CONTROL_RESOURCE_CAPACITY}
    _progress(f"starting four raylets; draining the {which} node", t0)
    cluster = start_cluster(dict(num_cpus=1, include_dashboard=False, env_vars=env), [
        worker("pool", {VISION_POOL_RESOURCE: POOL_RESOURCE_CAPACITY, LLM_POOL_RESOURCE: POOL_RESOURCE_CAPACITY}, 2),
        worker("a", api, 1), worker("b", api, 1)])
    phases = {"cluster_up": time.monotonic() - t0}
    try:
        writer.join()
        if "model" not in written:
            raise RuntimeError("writing the tiny checkpoint failed (its traceback is above)")
        # Which raylet is which: by the proxy port each was started with.
        role_of = {n.node_id: next(r for r, p in ports.items()
                                   if n._ray_params.env_vars["RAY_SERVE_WORKER_PROXY_HTTP_PORT"] == str(p))
                   for n in cluster.worker_nodes}
        role_of[cluster.head_node.node_id] = "head"
        node_of = {r: nid for nid, r in role_of.items()}
        config = pool_app_config(written["model"], request_timeout_s=REQUEST_TIMEOUT_S, vision_min=0,
                                 context_length=MAX_TOKENS + 256, max_running_requests=4)
        config["api"]["ingress_replicas"] = 2  # one per API node (Serve spreads a deployment's replicas)
        serve_app_on_cluster(cluster, port, config, env, proxy_location="EveryNode")
        urls = {r: f"http://127.0.0.1:{ports[r]}" for r in ("a", "b")}
        for u in urls.values():
            wait_healthy(u, 300)  # each API node's own proxy
        phases["api_proxies_answer"] = time.monotonic() - t0
        _progress("api_proxies_answer", t0)

        before = live_replicas("NodeID")
        ingress_roles = sorted(role_of[n] for _, n in before[INGRESS_DEPLOYMENT])
        ((queue_actor, queue_node),) = before[QUEUE_DEPLOYMENT]
        out: dict = {"nodes": node_of, "ingress_roles_before": ingress_roles, "queue_role": role_of[queue_node],
                     "before": {d: sorted(reps) for d, reps in before.items()}}
        if ingress_roles != ["a", "b"] or out["queue_role"] not in ("a", "b"):
            out["placement_error"] = (f"Serve did not place one Ingress replica on each API node: Ingress replicas "
                                      f"on {ingress_roles}, the tensor queue on {out['queue_role']}")
            print(json.dumps(out), flush=True)
            return 0
        if which == "queue":
            drained_role = out["queue_role"]
            other_role = "a" if drained_role == "b" else "b"
        else:
            other_role = out["queue_role"]
            drained_role = "a" if other_role == "b" else "b"
        drained, drained_url, other_url = node_of[drained_role], urls[drained_role], urls[other_role]
        out.update(drained_role=drained_role, other_role=other_role)

        reference = _stream(drained_url, "api-drain-reference")  # the same request, undisturbed
        phases["reference_done"] = time.monotonic() - t0
        _progress("reference_done", t0)
        shorts: list[dict] = []
        stop_shorts = threading.Event()

        def short_loop() -> None:  # one at a time, started at most every SHORT_EVERY_S
            i = 0
            while not stop_shorts.is_set():
                shorts.append(_short(other_url, i))
                i += 1
                stop_shorts.wait(max(0.0, SHORT_EVERY_S - (shorts[-1]["answered"] - shorts[-1]["sent"])))

        ingress_states: list[tuple[float, dict]] = []  # (when, the Ingress's replicas by state) at each change
        stop_watch = threading.Event()

        def watch() -> None:
            last = None
            while not stop_watch.is_set():
                try:
                    states = serve.status().applications[APP_NAME].deployments[INGRESS_DEPLOYMENT].replica_states
                    now = {str(getattr(k, "value", k)): v for k, v in states.items() if v}
                    if now != last:
                        ingress_states.append((time.monotonic(), now))
                        last = now
                except Exception:  # noqa: BLE001 - a missed poll is retried
                    pass
                stop_watch.wait(0.2)

        streamed: dict = {}
        first_token = threading.Event()
        streamer = threading.Thread(target=lambda: streamed.update(_stream(drained_url, STREAM_ID, first_token)))
        threading.Thread(target=watch, daemon=True).start()
        shorter = threading.Thread(target=short_loop, daemon=True)
        shorter.start()
        streamer.start()
        if not first_token.wait(60):
            raise AssertionError("the long stream did not start within 60 s")
        serving_before = _serve_replicas()
        time.sleep(0.5)  # a few tokens through the drained node's proxy
        drain_started = time.monotonic()
        phases["drain_started"] = drain_started - t0
        _progress("drain_started", t0)
        res = drain_node(cluster.address, deadline_s=drain_deadline_s, node_id=drained, poll_s=0.5)
        drain_returned = time.monotonic()
        streamer.join(timeout=REQUEST_TIMEOUT_S + 90)
        time.sleep(1)  # a few more short requests on what is left
        stop_shorts.set()
        shorter.join(timeout=REQUEST_TIMEOUT_S + 60)
        stop_watch.set()
        phases["traffic_done"] = time.monotonic() - t0
        _progress("traffic_done", t0)

        after = live_replicas("NodeID")
        queue_stats = serve.get_deployment_handle(QUEUE_DEPLOYMENT, APP_NAME).stats.remote().result(timeout_s=30)
        serving_after = _serve_replicas()
        # Which Ingress replica served the long stream: the one whose log names its request id.
        logs = Path(cluster.head_node.get_logs_dir_path())

        def log_of(r: dict) -> str:
            path = logs / (r.get("log_file_path") or "?").lstrip("/")
            return path.read_text(errors="replace") if path.is_file() else ""

        served_by = [role_of.get(r["node_id"], "?") for r in serving_before[INGRESS_DEPLOYMENT] if STREAM_ID in log_of(r)]

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - drain_started, 1)

        stopping_at = next((at for at, states in ingress_states if "STOPPING" in states), None)
        arrived = streamed.get("arrived", [])
        bad_shorts = [s for s in shorts if s["got"] != 200]
        out.update({
            "reference": {"status": reference.get("status"), "finish": reference.get("finish"),
                          "error": reference.get("error"), "chunks": len(reference.get("arrived", [])),
                          "seconds": reference.get("seconds")},
            "stream": {"status": streamed.get("status"), "finish": streamed.get("finish"), "error": streamed.get("error"),
                       "chunks": len(arrived), "seconds": streamed.get("seconds"),
                       "same_text": streamed.get("text") == reference.get("text"),
                       "text_chars": len(streamed.get("text") or ""), "reference_chars": len(reference.get("text") or ""),
                       # content chunks that came after Serve had told the old Ingress replica to stop
                       "chunks_after_stopping": sum(t > stopping_at for t in arrived) if stopping_at else None},
            "stream_served_by": served_by,
            "drain": {"drained": res.drained, "message": res.message, "seconds": res.seconds,
                      "deadline_s": drain_deadline_s},
            "shorts": {"sent": len(shorts), "failed": [s["got"] for s in bad_shorts][:10],
                       "during_drain": sum(drain_started <= s["sent"] < drain_returned for s in shorts),
                       "slowest_s": round(max((s["answered"] - s["sent"] for s in shorts), default=0.0), 2)},
            "after": {d: sorted(reps) for d, reps in after.items()},
            "ingress_roles_after": sorted(role_of.get(n, "?") for _, n in after.get(INGRESS_DEPLOYMENT, [])),
            "queue_after": sorted(a for a, _ in after.get(QUEUE_DEPLOYMENT, [])), "queue_before": [queue_actor],
            "queue_role_after": sorted(role_of.get(n, "?") for _, n in after.get(QUEUE_DEPLOYMENT, [])),
            "queue_counters": queue_stats["counters"],
            "drained_node_alive": any(n["NodeID"] == drained and n["Alive"] for n in ray.nodes()),
            "serve_after": {d: sorted((r["state"], role_of.get(r["node_id"], "?")) for r in reps)
                            for d, reps in serving_after.items() if d in (INGRESS_DEPLOYMENT, QUEUE_DEPLOYMENT)},
            # seconds after the drain started
            "timeline_s": {"stream_first_chunk": rel(arrived[0] if arrived else None),
                           "ingress_stopping": rel(stopping_at),
                           "ingress_states": [(rel(at), states) for at, states in ingress_states],
                           "stream_ended": rel(streamed.get("ended_at")), "drain_returned": rel(drain_returned)},
            "phases_s": {k: round(v, 1) for k, v in phases.items()},
        })
        print(json.dumps(out), flush=True)
        return 0
    finally:
        # Every raylet goes, Serve with them (no orderly serve.shutdown(): it only adds seconds here).
        ray.shutdown()
        cluster.shutdown()


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
