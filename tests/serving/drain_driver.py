"""Driver for test_node_drain.py, run in its own process (its own Ray cluster: two worker raylets and a head).

A Serve deployment pinned to the workers' `pool` resource streams slowly; with a stream in flight on
one worker, that worker is drained the way a stopping pool pod drains itself (`node_drain.drain_node`).
Prints one JSON line: the tokens the stream delivered, the drain's result, where the replica runs after.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

STREAM_TOKENS = 40
TOKEN_INTERVAL_S = 0.25


def main() -> int:
    import ray
    from ray import serve
    from serving_support import start_cluster, stop_cluster

    from dotsvlm_serving.node_drain import drain_node

    port = int(sys.argv[1])
    cluster = start_cluster(dict(num_cpus=2, include_dashboard=False), [dict(num_cpus=1, resources={"pool": 1})] * 2)
    try:
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})

        @serve.deployment(ray_actor_options={"num_cpus": 0, "resources": {"pool": 1}},
                          graceful_shutdown_timeout_s=40, graceful_shutdown_wait_loop_s=0.5)
        class Streamer:
            def where(self) -> str:
                return ray.get_runtime_context().get_node_id()

            def __call__(self, n: int):
                for i in range(n):
                    time.sleep(TOKEN_INTERVAL_S)
                    yield i

        handle = serve.run(Streamer.bind(), name="drain", route_prefix=None)
        node = handle.where.remote().result()
        stream = handle.options(stream=True).remote(STREAM_TOKENS)
        tokens = [next(iter(stream))]  # the request runs on the replica now
        result: dict = {}

        def drain() -> None:
            res = drain_node(cluster.address, deadline_s=120, node_id=node, poll_s=0.5)
            result.update(drained=res.drained, message=res.message, seconds=res.seconds)

        t = threading.Thread(target=drain)
        t.start()
        error = None
        try:
            tokens += list(stream)
        except Exception as exc:  # noqa: BLE001 - the test reports it
            error = f"{type(exc).__name__}: {exc}"
        stream_done = time.monotonic()
        t.join(timeout=180)
        drain_done = time.monotonic()
        after = handle.where.remote().result(timeout_s=60)
        print(json.dumps({"tokens": tokens, "error": error, "drain": result, "node_before": node, "node_after": after,
                          "drain_after_stream_s": round(drain_done - stream_done, 1),
                          "expected": list(range(STREAM_TOKENS))}), flush=True)
        return 0
    finally:
        stop_cluster(cluster)


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
