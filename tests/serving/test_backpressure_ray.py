"""Backpressure and placement on a real local Ray of two nodes (ray.cluster_utils.Cluster, CPU, tiny model).

The head node advertises the control resource (as the operator's Ray head does), the worker node the
two pool resources (as the pool pods do). The application is deployed the way the operator deploys it
(a Serve config with dotsvlm's autoscaling policy), with small backpressure limits, and a vision pool
that starts at zero replicas:
- the first image request waits for the vision pool to wake up (it is not refused);
- the Ingress and TensorQueue replicas run on the head, the pool replicas on the worker;
- a burst of large images far over the vision stage's limit: the excess gets 429 with Retry-After and
  an OpenAI error body, the rest completes, the ingress's and the vision replica's memory stay far
  below what holding the whole burst would take, the report counts the refusals, and the service
  answers normally afterwards;
- a burst of requests whose images are http(s) URLs on a slow server: each download holds its room
  (the image size limit) from its start, so at most the ingress's byte budget downloads at once and the
  rest get 429 before a byte is fetched;
- deleting an application whose queue replica holds work takes seconds: the replica does not wait for a
  successor that cannot come;
- with the vision pool at zero and no node where a vision replica can start (no free GPU), an image
  request ends at its deadline with a 504 that says what to do, and text requests are answered meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import numpy as np
import psutil
import pytest
from serving_support import IMAGE_HOST, free_port, wait_healthy

from dotsvlm_serving.admission import IMAGE_BYTES_FULL, VISION_BACKLOG_FULL
from dotsvlm_serving.serve_config import (APP_NAME, CONTROL_RESOURCE, CONTROL_RESOURCE_CAPACITY, INGRESS_DEPLOYMENT,
                                          LLM_DEPLOYMENT, LLM_POOL_RESOURCE, POOL_RESOURCE_CAPACITY, QUEUE_DEPLOYMENT,
                                          VISION_DEPLOYMENT, VISION_POOL_RESOURCE, ServeAppConfig)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

SIDE = 800  # a burst image: 800 x 800 noise (PNG does not compress it: ~1.9 MB), ~0.65 Mpx after resize
PER_REPLICA_PIXELS = 2_000_000  # about three burst images per vision replica
INGRESS_BYTES = 16 * 1024 * 1024  # about six burst bodies in one ingress replica
BURST = 40
DECODED_BYTES_PER_PIXEL = 12  # float32 x 3 channels after normalisation (PIL's 3 bytes/pixel come on top)


def _config(model_path: str, **changes: dict) -> ServeAppConfig:
    """The stack's application; `changes` update its sections (e.g. vision={...})."""
    body = {
        "model_path": model_path,
        "control_resource": CONTROL_RESOURCE,
        "vision": {"pool_resource": VISION_POOL_RESOURCE, "max_batch_pixels": 1_000_000, "max_batch_wait_ms": 5,
                   "max_pending_pixels_per_replica": PER_REPLICA_PIXELS,
                   "autoscaling": {"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0,
                                   "downscale_delay_s": 3600, "idle_to_zero_s": 3600, "replica_startup_s": 10}},
        "llm": {"pool_resource": LLM_POOL_RESOURCE, "context_length": 2048, "max_running_requests": 4,
                "max_new_tokens_default": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
        "queue": {"max_items": 64, "enqueue_timeout_s": 120},
        "api": {"api_keys_env": None, "request_timeout_s": 240, "max_image_bytes_in_flight": INGRESS_BYTES,
                "images": {"max_image_bytes": 4_000_000, "fetch_allow": [f"{IMAGE_HOST}/32"]}},
        "slo": {"image_ttft_s": 120, "text_ttft_s": 60, "inter_token_s": 10},
    }
    for section, values in changes.items():
        body[section] = {**body[section], **values}
    return ServeAppConfig.model_validate(body)


@dataclass
class Stack:
    url: str
    port: int
    model: str
    head_node: str
    worker_node: str


def _start_cluster():
    from ray.cluster_utils import Cluster

    for attempt in range(3):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={
                "num_cpus": 2, "include_dashboard": False,
                "resources": {CONTROL_RESOURCE: CONTROL_RESOURCE_CAPACITY}})
            worker = cluster.add_node(num_cpus=2, resources={VISION_POOL_RESOURCE: POOL_RESOURCE_CAPACITY,
                                                             LLM_POOL_RESOURCE: POOL_RESOURCE_CAPACITY})
            return cluster, worker
        except Exception as exc:  # Ray gives its raylet a fixed 30 s: a very busy machine can miss it
            if cluster is not None:
                cluster.shutdown()
            if attempt == 2 or "timed out during startup" not in str(exc):
                raise
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint

    assert not ray.is_initialized(), "this module starts its own two-node Ray"
    model = ensure_tiny_checkpoint(tmp_path_factory.mktemp("backpressure") / "tiny")
    cluster, worker = _start_cluster()
    try:
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False,
                 runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
        port = free_port()
        # Both nodes share this machine's address: one HTTP proxy (on the head) takes the port.
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
        body = _config(str(model)).deploy_body(http_port=port, http_host="127.0.0.1")
        _get_global_client().deploy_apps(ServeDeploySchema.model_validate(body))
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, 300)
        yield Stack(url=url, port=port, model=str(model), head_node=cluster.head_node.node_id,
                    worker_node=worker.node_id)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def _png(side: int, seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _image_body(png: bytes, max_tokens: int = 2) -> dict:
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    return {"model": "dots.vlm1", "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "describe"}]}]}


def _replicas(deployment: str) -> list[dict]:
    """The deployment's live replica actors, with their node and process (Ray's actor table)."""
    from ray._private import state

    name = f"ServeReplica:{APP_NAME}:{deployment}"
    return [a for a in state.actors().values() if a["ActorClassName"] == name and a["State"] == "ALIVE"]


def _running(deployment: str) -> int:
    from dotsvlm_serving.deployments.backpressure import running_replicas

    return running_replicas(deployment) or 0


def test_first_image_request_waits_for_a_vision_pool_at_zero(stack: Stack) -> None:
    assert _running(VISION_DEPLOYMENT) == 0, "the vision pool should start at zero replicas"
    r = httpx.post(stack.url + "/v1/chat/completions", json=_image_body(_png(224, 1)), timeout=240)
    assert r.status_code == 200, r.text  # waited for the wake-up, not refused
    assert _running(VISION_DEPLOYMENT) == 1


def test_ingress_and_queue_run_on_the_control_node_and_pools_on_their_workers(stack: Stack) -> None:
    """Where each replica runs, and what its actor asks Ray for: a 0-CPU replica with no resource of its own
    could land on the head by chance (one node in two), so the request for the control resource is checked
    in what Serve runs, not only its outcome."""
    from ray.serve.context import _get_global_client

    deployments = _get_global_client().get_serve_details()["applications"][APP_NAME]["deployments"]
    asked = {d: deployments[d]["deployment_config"]["ray_actor_options"].get("resources") or {}
             for d in (INGRESS_DEPLOYMENT, QUEUE_DEPLOYMENT, VISION_DEPLOYMENT, LLM_DEPLOYMENT)}
    assert asked[INGRESS_DEPLOYMENT].get(CONTROL_RESOURCE) == 1, asked
    assert asked[QUEUE_DEPLOYMENT].get(CONTROL_RESOURCE) == 1, asked
    assert asked[VISION_DEPLOYMENT].get(VISION_POOL_RESOURCE) == 1 and CONTROL_RESOURCE not in asked[VISION_DEPLOYMENT]
    assert asked[LLM_DEPLOYMENT].get(LLM_POOL_RESOURCE) == 1 and CONTROL_RESOURCE not in asked[LLM_DEPLOYMENT]
    nodes = {d: {a["Address"]["NodeID"] for a in _replicas(d)}
             for d in (INGRESS_DEPLOYMENT, QUEUE_DEPLOYMENT, VISION_DEPLOYMENT, LLM_DEPLOYMENT)}
    assert nodes[INGRESS_DEPLOYMENT] == {stack.head_node}
    assert nodes[QUEUE_DEPLOYMENT] == {stack.head_node}
    assert nodes[VISION_DEPLOYMENT] == {stack.worker_node}
    assert nodes[LLM_DEPLOYMENT] == {stack.worker_node}


class PeakRSS:
    """Samples the RSS of some processes in a thread, keeping each one's peak."""

    def __init__(self, pids: dict[str, int], base: dict[str, int] | None = None) -> None:
        self.procs = {k: psutil.Process(p) for k, p in pids.items()}
        now = {k: p.memory_info().rss for k, p in self.procs.items()}
        self.base = dict(base or now)  # growth is counted from here
        self.peak = now
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for k, p in self.procs.items():
                self.peak[k] = max(self.peak[k], p.memory_info().rss)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def growth(self, key: str) -> int:
        return self.peak[key] - self.base[key]


def test_burst_far_over_the_vision_capacity_is_refused_with_429_and_memory_stays_bounded(stack: Stack) -> None:
    images = [_png(SIDE, 100 + i) for i in range(4)]
    bodies = [_image_body(images[i % len(images)]) for i in range(BURST)]
    (ingress,), (vision,) = _replicas(INGRESS_DEPLOYMENT), _replicas(VISION_DEPLOYMENT)
    pids = {"ingress": ingress["Pid"], "vision": vision["Pid"]}
    # The baseline: the peak of serving burst-sized images one at a time (the vision tower's activations
    # for such a batch, the ingress's work for one request), so the burst's growth over it is what the
    # burst holds at once.
    with PeakRSS(pids) as alone:
        for png in images[:2]:
            r = httpx.post(stack.url + "/v1/chat/completions", json=_image_body(png), timeout=240)
            assert r.status_code == 200, r.text
    results: list[tuple[int, dict, dict]] = []

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=stack.url, timeout=240,
                                     limits=httpx.Limits(max_connections=BURST)) as client:
            async def one(body: dict) -> None:
                r = await client.post("/v1/chat/completions", json=body)
                results.append((r.status_code, dict(r.headers), r.json()))
            await asyncio.gather(*(one(b) for b in bodies))

    with PeakRSS(pids, base=alone.peak) as rss:
        asyncio.run(burst())

    codes = Counter(code for code, _, _ in results)
    assert set(codes) <= {200, 429} and sum(codes.values()) == BURST, codes
    assert codes[429] >= BURST // 2, f"a burst far over capacity should be mostly refused: {codes}"
    assert codes[200] >= 1, codes
    reasons = Counter()
    for code, headers, body in results:
        if code == 429:
            assert int(headers["retry-after"]) >= 1
            err = body["error"]
            assert err["type"] == "rate_limit_exceeded" and err["code"] in (VISION_BACKLOG_FULL, IMAGE_BYTES_FULL)
            assert "retry after" in err["message"]
            reasons[err["code"]] += 1
        else:
            assert body["choices"][0]["message"]["content"] is not None
    # Memory: far below what holding the whole burst would take.
    resized = (SIDE // 28 * 28) ** 2
    unbounded_vision = BURST * resized * DECODED_BYTES_PER_PIXEL
    # Serve hands a request's raw body to the ingress replica as soon as it routes the request (not ours to
    # hold back; a refused request frees it at once); without the bound, the ingress would also hold the
    # parsed body and the decoded image bytes of every request of the burst at once.
    unbounded_ingress = sum(2 * len(json.dumps(b)) + len(images[0]) for b in bodies)
    print(f"outcomes {dict(codes)}, reasons {dict(reasons)}; RSS growth over serving one at a time: ingress {rss.growth('ingress') / 1e6:.0f} MB "
          f"(holding the burst: {unbounded_ingress / 1e6:.0f} MB), vision {rss.growth('vision') / 1e6:.0f} MB "
          f"(decoding the burst: {unbounded_vision / 1e6:.0f} MB)")
    assert rss.growth("vision") < unbounded_vision * 0.4
    assert rss.growth("ingress") < unbounded_ingress * 0.5
    # The refusals are in the report the operator reads (one ingress replica: its counts are all).
    # Each ingress replica writes its figures every 2 s: poll until the last write after the burst.
    deadline = time.monotonic() + 30
    while True:
        report = httpx.get(stack.url + "/-/autoscaler", timeout=10).json()["admission"]
        settled = report["rejected_total"] == codes[429] and report["image_bytes"] == report["pending_pixels"] == 0
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert report["rejected"] == dict(reasons) and report["rejected_total"] == codes[429], report
    assert report["image_bytes"] == 0 and report["pending_pixels"] == 0, report  # everything released
    assert report["pending_pixels_limit"] == PER_REPLICA_PIXELS and report["image_bytes_limit"] == INGRESS_BYTES
    assert report["vision_replicas"] == 1  # read from Serve's status by the ingress (it started at 0)


class SlowImageServer:
    """Serves one PNG at /img-N.png slowly (in 64 KiB pieces), counting the downloads running at once."""

    def __init__(self, png: bytes, seconds: float) -> None:
        import http.server

        self.png, self.pause = png, seconds / max(1, len(png) // 65536)
        self.lock = threading.Lock()
        self.running = self.most = self.served = 0
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a) -> None:
                pass

            def do_GET(self) -> None:
                with outer.lock:
                    outer.running += 1
                    outer.most = max(outer.most, outer.running)
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(outer.png)))
                    self.end_headers()
                    for i in range(0, len(outer.png), 65536):
                        self.wfile.write(outer.png[i:i + 65536])
                        time.sleep(outer.pause)
                finally:
                    with outer.lock:
                        outer.running -= 1
                        outer.served += 1

        self.server = http.server.ThreadingHTTPServer((IMAGE_HOST, 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://{IMAGE_HOST}:{self.server.server_address[1]}"

    def __enter__(self) -> "SlowImageServer":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_burst_of_image_urls_downloads_no_more_than_the_byte_budget_at_once(stack: Stack) -> None:
    """Each http(s) image holds api.images.maxImageBytes (4 MB here) of the ingress's 16 MiB from the
    moment its download starts (its size is unknown until it ends): four downloads at once. A burst of
    BURST such requests against a server that takes ~2 s per image: the rest are refused with 429
    (image_bytes_full, Retry-After) before anything is fetched, so the server sees at most four downloads
    at once, and the ingress's memory grows by far less than the burst's images."""
    png = _png(SIDE, 300)
    (ingress,) = _replicas(INGRESS_DEPLOYMENT)
    budget = INGRESS_BYTES // 4_000_000
    results: list[tuple[int, dict, dict]] = []
    with SlowImageServer(png, seconds=2.0) as server:
        def body(i: int) -> dict:
            return {"model": "dots.vlm1", "max_tokens": 2, "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": f"{server.url}/img-{i}.png"}},
                {"type": "text", "text": "describe"}]}]}

        async def burst() -> None:
            async with httpx.AsyncClient(base_url=stack.url, timeout=240,
                                         limits=httpx.Limits(max_connections=BURST)) as client:
                async def one(i: int) -> None:
                    r = await client.post("/v1/chat/completions", json=body(i))
                    results.append((r.status_code, dict(r.headers), r.json()))
                await asyncio.gather(*(one(i) for i in range(BURST)))

        # The baseline: the peak of one such request alone, so the burst's growth over it is what it holds at once.
        with PeakRSS({"ingress": ingress["Pid"]}) as alone:
            r = httpx.post(stack.url + "/v1/chat/completions", json=body(BURST), timeout=240)
            assert r.status_code == 200, r.text
        server.most = server.served = 0
        with PeakRSS({"ingress": ingress["Pid"]}, base=alone.peak) as rss:
            asyncio.run(burst())
        most, served = server.most, server.served
    codes = Counter(code for code, _, _ in results)
    refused = [(h, b) for c, h, b in results if c == 429]
    print(f"URL burst: outcomes {dict(codes)}; downloads {served}, at most {most} at once (budget {budget}); "
          f"ingress RSS growth over one request alone {rss.growth('ingress') / 1e6:.0f} MB (the burst's images: "
          f"{BURST * len(png) / 1e6:.0f} MB)")
    assert set(codes) <= {200, 429} and sum(codes.values()) == BURST, codes
    assert codes[200] >= 1 and codes[429] >= BURST // 2, codes
    assert most <= budget, f"{most} downloads ran at once; the ingress's byte budget holds {budget}"
    assert served <= BURST - sum(1 for _, b in refused if b["error"]["code"] == IMAGE_BYTES_FULL), \
        "a request refused for image bytes was downloaded anyway"
    for headers, b in refused:
        assert int(headers["retry-after"]) >= 1 and b["error"]["code"] in (IMAGE_BYTES_FULL, VISION_BACKLOG_FULL), b
    assert any(b["error"]["code"] == IMAGE_BYTES_FULL for _, b in refused), refused[:2]
    assert rss.growth("ingress") < BURST * len(png) * 0.5
    deadline = time.monotonic() + 30  # everything released once the burst is over (written every 2 s)
    while (report := httpx.get(stack.url + "/-/autoscaler", timeout=10).json()["admission"])["image_bytes"]:
        assert time.monotonic() < deadline, report
        time.sleep(0.5)


def test_service_answers_normally_after_the_burst(stack: Stack) -> None:
    wait_healthy(stack.url, 60)
    r = httpx.post(stack.url + "/v1/chat/completions", json=_image_body(_png(320, 7)), timeout=120)
    assert r.status_code == 200, r.text
    r = httpx.post(stack.url + "/v1/chat/completions", timeout=120,
                   json={"model": "dots.vlm1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_deleting_an_application_whose_queue_holds_work_does_not_wait_for_a_successor(stack: Stack) -> None:
    """A stopping queue replica that holds work waits up to SUCCESSOR_WAIT_S for the replica that replaces it
    (a rolling update of its options); when the application is being deleted none will come, and the
    deletion (and so `serve.shutdown()`, and Ctrl-C on `dotsvlm serve`) must not take that long. A queue of
    its own, in an application of its own, so the stack's queue is left alone."""
    from ray import serve

    from dotsvlm_serving.deployments.queue import SUCCESSOR_WAIT_S, TensorQueueDeployment
    from dotsvlm_serving.tensor_queue import QueueItem

    app = "queue-delete-check"
    handle = serve.run(TensorQueueDeployment.options(ray_actor_options={"num_cpus": 0}).bind(),
                       name=app, route_prefix=None)
    res = handle.put.remote(QueueItem(request_id="nobody-takes-it", nbytes=0, reserved_tokens=1,
                                      payload={})).result(timeout_s=30)
    assert res["ok"], res
    assert handle.stats.remote().result(timeout_s=30)["depth"] == 1  # nothing consumes it: the replica holds work
    started = time.monotonic()
    serve.delete(app)  # blocks until the application is gone
    took = time.monotonic() - started
    print(f"deleting an application whose queue held an item took {took:.1f} s (successor wait: {SUCCESSOR_WAIT_S:g} s)")
    assert took < SUCCESSOR_WAIT_S / 2


def test_an_image_request_ends_with_a_504_at_its_deadline_when_no_vision_replica_can_start(stack: Stack) -> None:
    """Serve gives the ingress a vision call's result only once a replica has taken the call: with the pool
    at zero and its woken replica unable to start (here: no node has the vision pool's resource, as when no
    GPU is free), that wait had no end. Text-only requests never wait for the vision pool. Last in this
    module: it replaces the stack's application."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    timeout_s = 8.0
    serve.delete(APP_NAME)
    cfg = _config(stack.model, vision={"pool_resource": "dotsvlm-no-node-has-this"},
                  api={"request_timeout_s": timeout_s})
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(
        cfg.deploy_body(http_port=stack.port, http_host="127.0.0.1")))
    wait_healthy(stack.url, 300)
    started = time.monotonic()
    r = httpx.post(stack.url + "/v1/chat/completions", json=_image_body(_png(224, 3)), timeout=120)
    took = time.monotonic() - started
    assert r.status_code == 504, r.text
    assert "vision.minReplicas" in r.json()["error"]["message"], r.text
    assert took < timeout_s + 20, f"the 504 came {took:.1f} s after the request, its timeout is {timeout_s:g} s"
    assert _running(VISION_DEPLOYMENT) == 0
    r = httpx.post(stack.url + "/v1/chat/completions", timeout=60,
                   json={"model": "dots.vlm1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
