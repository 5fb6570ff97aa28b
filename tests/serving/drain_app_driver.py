"""Driver for test_node_drain.py's dotsvlm test, run in its own process (its own Ray cluster).

A head node with the control resource (the API and the tensor queue run there, as on the operator's
head) and two worker nodes with the pool resources (as two pool pods); the dotsvlm application with
the tiny model and one LLM replica. A long streaming request runs on that replica; its node is drained
the way a stopping pool pod drains itself (its preStop command, `dotsvlm drain-node`). Prints one JSON line: the streamed text against the same
request's text before the drain, how the stream ended, the drain's result, where the LLM replica runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

MAX_TOKENS = 1500
# The drain's deadline: Serve stops a replica on a draining node at the latest its graceful-shutdown
# time (60 s for the LLM) before the deadline, so with 62 s it stops the LLM replica about 2 s after the
# drain starts, while the stream runs, whether or not its replacement has started yet; the replica then
# finishes the stream within its 50 s drain.
DRAIN_DEADLINE_S = 62


def _stream(url: str) -> dict:
    import httpx
    from serving_support import chat_deltas

    body = {"model": "dots.vlm1", "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": "Tell me a very long story about a lighthouse."}]}
    text, finish, error, chunks, first_at = [], None, None, 0, None
    started = time.monotonic()
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as r:
        if r.status_code != 200:
            return {"status": r.status_code, "error": r.read().decode()[:500]}
        for content, finished, err in chat_deltas(r.iter_lines()):
            error = err or error
            if content:
                text.append(content)
                chunks += 1
                first_at = first_at or time.monotonic()
            finish = finished or finish
    return {"status": 200, "text": "".join(text), "finish": finish, "error": error, "chunks": chunks,
            "ended_at": time.monotonic(), "seconds": round(time.monotonic() - started, 1)}


def main() -> int:
    from ray import serve
    from serving_support import pool_app_config, serve_app_on_cluster, start_cluster, stop_cluster

    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint
    from dotsvlm_serving.serve_config import (APP_NAME, CONTROL_RESOURCE, CONTROL_RESOURCE_CAPACITY, LLM_DEPLOYMENT,
                                              LLM_POOL_RESOURCE, POOL_RESOURCE_CAPACITY, VISION_POOL_RESOURCE)

    port, model_dir = int(sys.argv[1]), sys.argv[2]
    model = ensure_tiny_checkpoint(model_dir)
    pools = {VISION_POOL_RESOURCE: POOL_RESOURCE_CAPACITY, LLM_POOL_RESOURCE: POOL_RESOURCE_CAPACITY}
    cluster = start_cluster(dict(num_cpus=2, include_dashboard=False, resources={CONTROL_RESOURCE: CONTROL_RESOURCE_CAPACITY}),
                            [dict(num_cpus=2, resources=pools)] * 2)
    try:
        url = serve_app_on_cluster(cluster, port, pool_app_config(model, request_timeout_s=300, vision_min=0,
                                                                  context_length=2048, max_running_requests=2),
                                   {"OMP_NUM_THREADS": "1"})

        from ray._private import state

        def llm_nodes() -> list[str]:
            name = f"ServeReplica:{APP_NAME}:{LLM_DEPLOYMENT}"
            return [a["Address"]["NodeID"] for a in state.actors().values()
                    if a["ActorClassName"] == name and a["State"] == "ALIVE"]

        reference = _stream(url)  # the same request, undisturbed
        node = llm_nodes()[0]
        result: dict = {}
        streamed: dict = {}
        t = threading.Thread(target=lambda: streamed.update(_stream(url)))
        t.start()
        stopping: dict = {}

        def watch() -> None:  # when Serve starts stopping the LLM replica on the draining node
            while t.is_alive() and "at" not in stopping:
                try:
                    states = serve.status().applications[APP_NAME].deployments[LLM_DEPLOYMENT].replica_states
                    if any(str(getattr(k, "value", k)) in ("STOPPING", "PENDING_MIGRATION") for k in states):
                        stopping.setdefault("migrating_at", time.monotonic())
                    if any(str(getattr(k, "value", k)) == "STOPPING" for k in states):
                        stopping["at"] = time.monotonic()
                except Exception:  # noqa: BLE001 - a missed poll is retried
                    pass
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        time.sleep(2)  # the request runs on the LLM replica now
        drain_started = time.monotonic()
        # The pod's preStop itself, as the operator writes it (`dotsvlm drain-node`), with the node named by id:
        # here every node has the same IP, which is how a pool pod finds its node (unit-tested).
        hook = subprocess.run([str(Path(sys.executable).with_name("dotsvlm")), "drain-node",
                               f"--address={cluster.address}", f"--deadline-seconds={DRAIN_DEADLINE_S}",
                               f"--node-id={node}"], capture_output=True, text=True, timeout=DRAIN_DEADLINE_S + 60)
        result.update(drained="the node finished draining" in hook.stderr, exit_code=hook.returncode,
                      message=hook.stderr.strip()[-500:], seconds=round(time.monotonic() - drain_started, 1))
        t.join(timeout=300)
        print(json.dumps({
            "same_text": streamed.get("text") == reference.get("text"), "reference_chunks": reference.get("chunks"),
            "chunks": streamed.get("chunks"), "finish": streamed.get("finish"), "error": streamed.get("error"),
            "status": streamed.get("status"), "drain": result, "node_before": node, "nodes_after": llm_nodes(),
            "stream_ended_after_drain_started_s": round(streamed.get("ended_at", 0) - drain_started, 1),
            "reference_seconds": reference.get("seconds"), "seconds": streamed.get("seconds"),
            # Serve stopped the replica while the stream still ran (so the replica's drain finished it)
            "stopping_before_stream_end": "at" in stopping and stopping["at"] < streamed.get("ended_at", 0),
            "stopping_after_drain_started_s": round(stopping["at"] - drain_started, 1) if "at" in stopping else None,
            }), flush=True)
        return 0
    finally:
        stop_cluster(cluster)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
