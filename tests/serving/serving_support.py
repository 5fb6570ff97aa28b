"""Helpers shared by the serving tests and their fixtures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from support.ports import free_port

API_KEY = "test-key-1"
KEYS_ENV = "DOTSVLM_TEST_API_KEYS"
IMAGE_HOST = "127.0.0.2"  # the allow-listed image server; 127.0.0.1 stays refused


# What the operator sets on every Ray pod; the metrics carry them as dotsvlm_namespace/dotsvlm_deployment.
TEST_NAMESPACE = "obs-test"
TEST_DEPLOYMENT = "dots-test"


@dataclass
class Served:
    url: str
    model_dir: Path
    config: dict
    image_server: str
    metrics_port: int  # the local Ray node's metrics export port

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=120)

    def queue_stats(self) -> dict:
        """The tensor queue's own stats() (what its metrics are published from), read directly."""
        return queue_stats()


def queue_stats() -> dict:
    """The tensor queue's own stats(), from the Serve application on the Ray this process is connected to."""
    from ray import serve

    from dotsvlm_serving.serve_config import APP_NAME

    return serve.get_deployment_handle("TensorQueue", APP_NAME).stats.remote().result(timeout_s=30)


def chat_deltas(lines) -> Iterator[tuple[str | None, str | None, object]]:
    """(content, finish_reason, error) for each event of a streamed chat answer (its `data: ...` lines)."""
    for line in lines:
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        if "error" in event:
            yield None, None, event["error"]
            continue
        choice = event["choices"][0]
        yield choice.get("delta", {}).get("content"), choice.get("finish_reason"), None


def wait_healthy(url: str, timeout_s: float) -> None:
    """The wait `dotsvlm serve` does (embedded.wait_healthy: its error names what the application still
    waits for), quiet, and failing as an assertion, which the tests' retry loops catch."""
    from dotsvlm_serving.embedded import wait_healthy as wait

    try:
        wait(url, timeout_s, progress_every_s=float("inf"))
    except TimeoutError as exc:
        raise AssertionError(str(exc)) from exc


def _startup_timeout(exc: Exception) -> bool:
    # Ray gives a new raylet a fixed 30 s to register; a very busy 2-core machine can miss it.
    return "timed out during startup" in str(exc)


def start_cluster(head: dict, workers: list[dict], attempts: int = 5):
    """A `ray.cluster_utils.Cluster` with a head and worker raylets (add_node arguments), all registered.
    A raylet that misses its start-up window gets a fresh cluster (up to `attempts`); other errors raise."""
    from ray.cluster_utils import Cluster

    for attempt in range(attempts):
        cluster = Cluster(initialize_head=False)
        try:
            cluster.add_node(**head)
            for worker in workers:
                cluster.add_node(**worker)
            cluster.wait_for_nodes()
            return cluster
        except Exception as exc:  # noqa: BLE001
            cluster.shutdown()
            if attempt == attempts - 1 or not _startup_timeout(exc):
                raise
            print("a raylet start timed out (busy machine): starting the cluster again", flush=True)
    raise AssertionError("unreachable")


def add_node_with_retry(cluster, attempts: int = 3, **node_args):
    """`cluster.add_node(**node_args)` on a running cluster, tried again when the raylet misses its start-up
    window; other errors raise at once."""
    for attempt in range(attempts):
        try:
            node = cluster.add_node(**node_args)
            cluster.wait_for_nodes()
            return node
        except Exception as exc:  # noqa: BLE001
            if attempt == attempts - 1 or not _startup_timeout(exc):
                raise
            print("a raylet start timed out (busy machine): trying again", flush=True)


def serve_app_on_cluster(cluster, port: int, config: dict, env: dict[str, str],
                         proxy_location: str = "HeadOnly") -> str:
    """Connect to a test cluster, start Serve's HTTP proxies (on the head only, or "EveryNode": also on each
    node with a replica, where a worker node's proxy binds that node's RAY_SERVE_WORKER_PROXY_HTTP_PORT if
    it has one) and deploy the dotsvlm application from `config` (a ServeAppConfig) the way the operator
    does; the head proxy's URL once /health answers (on `port`, or on another free one if `port` was taken by
    the time the proxy bound it)."""
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from dotsvlm_serving.serve_config import ServeAppConfig

    ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False, runtime_env={"env_vars": env})
    attempts = 3
    for attempt in range(attempts):
        try:
            serve.start(proxy_location=proxy_location, http_options={"host": "127.0.0.1", "port": port})
            break
        except Exception as exc:  # noqa: BLE001 - Ray wraps the proxy's error in a RayTaskError
            # The port was free when chosen; one of the cluster's own processes may have taken it since
            # (a clean-clone CI run on 2026-12-02: "Failed to bind to address"). Another port then, not a failed test.
            if "Failed to bind" not in str(exc) or attempt == attempts - 1:
                raise
            serve.shutdown()
            port = free_port()
    body = ServeAppConfig.model_validate(config).deploy_body(http_port=port, http_host="127.0.0.1")
    body["proxy_location"] = proxy_location  # what Serve runs with: started above (a deploy does not change it)
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(body))
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 600)
    return url


def stop_cluster(cluster) -> None:
    """Serve (if it started), this process's Ray connection, then every raylet of the test cluster."""
    import ray
    from ray import serve

    try:
        serve.shutdown()
    except Exception:  # noqa: BLE001 - Serve may never have started
        pass
    ray.shutdown()
    cluster.shutdown()


def run_driver(tmp_path: Path, driver: str, *args: str, timeout: float) -> dict:
    """Run a driver script of this folder in its own process (its own Ray cluster), with a free port as its
    first argument; the JSON line it printed last."""
    tests_dir = str(Path(__file__).resolve().parents[1])  # for `support.*`, as under pytest
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name(driver)), str(free_port()), *args], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert proc.returncode == 0 and lines, f"driver failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(lines[-1])


def pool_app_config(model: str, *, request_timeout_s: float, vision_min: int = 1, context_length: int = 1024,
                    max_running_requests: int = 4) -> dict:
    """The application as the operator configures it on Kubernetes, for a test cluster whose nodes carry the
    pools' resources: one vision and one LLM replica on pool nodes, the API and the queue on the control node."""
    from dotsvlm_serving.serve_config import CONTROL_RESOURCE, LLM_POOL_RESOURCE, VISION_POOL_RESOURCE

    return {"model_path": str(model), "control_resource": CONTROL_RESOURCE,
            "vision": {"pool_resource": VISION_POOL_RESOURCE,
                       "autoscaling": {"min_replicas": vision_min, "max_replicas": 1}},
            "llm": {"pool_resource": LLM_POOL_RESOURCE, "context_length": context_length,
                    "max_running_requests": max_running_requests, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
            "api": {"api_keys_env": None, "request_timeout_s": request_timeout_s}}


def live_replicas(detail: str) -> dict[str, list[tuple[str, object]]]:
    """(actor id, the actor's `detail`: "Pid" or "NodeID") of each live replica of the application, by
    deployment (this process must be connected to the cluster)."""
    from ray._private import state

    from dotsvlm_serving.serve_config import APP_NAME

    out: dict[str, list[tuple[str, object]]] = {}
    for aid, a in state.actors().items():
        name = a.get("ActorClassName") or ""
        if a.get("State") == "ALIVE" and name.startswith(f"ServeReplica:{APP_NAME}:"):
            value = a["Address"]["NodeID"] if detail == "NodeID" else a[detail]
            out.setdefault(name.rsplit(":", 1)[1], []).append((aid, value))
    return out
