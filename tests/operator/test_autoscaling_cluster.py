"""The autoscaler end to end on the test cluster with a real local Ray head, under load.

The operator reconciles a `DotsVLMDeployment` on the kwok control plane and deploys its Serve application
(with dotsvlm's application-level autoscaling policy) to a real local Ray head through the REST API, as
`test_operator_ray.py` does. kwok pods run no containers, so every replica runs on the local Ray node;
the pool Deployments' pods are what the operator sizes from Serve's targets.

One scenario, each step checked:
- at rest the vision pool is at zero (minReplicas 0): no vision pod;
- an image-heavy burst wakes the vision pool first, then the LLM pool grows as work reaches the queue;
  the pool Deployments follow Serve's targets; the status and one Event per decision say why;
- two long streams, one on each LLM replica, run while the load is gone and the LLM pool shrinks:
  both finish with every token (the replica that goes drains for real);
- both pools come back down after their windows, and so do their pods;
- every request the test sent is counted: 200, or a clear 429/503; none hangs.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Callable

import httpx
import pytest
import yaml
from dvlm_support import get_json, load_example, poll
from support.ports import free_port
from test_operator_ray import ray_head, tiny_model  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.slow, pytest.mark.cluster, pytest.mark.ray]

NAMESPACE_PREFIX = "ray-scale"  # the `ns` fixture (conftest.py) names test namespaces after it

FAST = {"upscaleDelaySeconds": 1, "downscaleDelaySeconds": 6, "scaleDownIntervalSeconds": 2, "replicaStartupSeconds": 10}


def _png(w: int, h: int) -> str:
    import base64
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (w % 255, h % 255, 90)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _body(i: int, *, image: bool, max_tokens: int, stream: bool = False) -> dict:
    content: list | str = f"request {i}"
    if image:
        content = [{"type": "image_url", "image_url": {"url": _png(220 + 7 * i, 180)}},
                   {"type": "text", "text": f"image request {i}"}]
    return {"model": "dots.vlm1", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}


async def _send(url: str, bodies: list[dict], outcomes: Counter, problems: list[str]) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        async def one(body: dict) -> None:
            try:
                r = await client.post("/v1/chat/completions", json=body)
            except httpx.HTTPError as exc:  # a hang ends here, at the client's timeout: counted, not lost
                outcomes["error"] += 1
                problems.append(f"{type(exc).__name__}: {exc}")
                return
            outcomes[r.status_code] += 1
            if r.status_code == 200:
                if body.get("stream"):
                    tokens = r.text.count('"delta":{"content"')
                    if not r.text.rstrip().endswith("data: [DONE]") or tokens < body["max_tokens"] - 1:
                        problems.append(f"stream ended early ({tokens} tokens): {r.text[-300:]}")
                elif r.json()["usage"]["completion_tokens"] != body["max_tokens"]:
                    problems.append(f"short answer: {r.json()['usage']}")
            elif r.status_code not in (429, 503) or not r.json().get("error", {}).get("message"):
                problems.append(f"{r.status_code}: {r.text[:300]}")
        await asyncio.gather(*(one(b) for b in bodies))


def _sustained(url: str, make_body: Callable[[int], dict], workers: int, stop: threading.Event,
               sent: list[int], outcomes: Counter, problems: list[str]) -> threading.Thread:
    """`workers` requests in flight at all times (a new one as soon as one ends) until `stop` is set: the load
    lasts until what the test waits for has happened, however fast this machine serves it."""
    async def worker(w: int) -> None:
        i = 0
        while not stop.is_set():
            n = workers * i + w + 1
            sent.append(n)
            served = outcomes[200]
            await _send(url, [make_body(n)], outcomes, problems)
            if outcomes[200] == served:  # pushed back (429/503): wait as a polite client would, then retry
                await asyncio.sleep(1.0)
            i += 1

    async def run() -> None:
        await asyncio.gather(*(worker(w) for w in range(workers)))

    t = threading.Thread(target=lambda: asyncio.run(run()), daemon=True)
    t.start()
    return t


class Watch:
    """Samples the pool Deployments and the status while load runs (one sample per poll)."""

    def __init__(self, kube, ns: str, name: str, api: str) -> None:
        self.kube, self.ns, self.name, self.api = kube, ns, name, api
        self.samples: list[dict] = []

    def sample(self) -> dict:
        got = get_json(self.kube, "dvlm", self.name, "-n", self.ns) or {}
        st = got.get("status") or {}
        try:  # the policy's own decisions, one consistent record for both pools
            dec = httpx.get(self.api + "/-/autoscaler", timeout=10).json().get("decisions") or {}
        except (httpx.HTTPError, ValueError):
            dec = {}
        row = {"t": time.monotonic(),
               "policy_vision": (dec.get("vision") or {}).get("desired"),
               "policy_llm": (dec.get("llm") or {}).get("desired"),
               "vision_pods": self._replicas("vision"), "llm_pods": self._replicas("llm"),
               "vision_desired": (st.get("vision") or {}).get("desiredReplicas"),
               "llm_desired": (st.get("llm") or {}).get("desiredReplicas"),
               "vision_current": (st.get("vision") or {}).get("currentReplicas"),
               "llm_current": (st.get("llm") or {}).get("currentReplicas"),
               "queue": (st.get("queue") or {}).get("depth")}
        self.samples.append(row)
        return row

    def _replicas(self, pool: str) -> int | None:
        d = get_json(self.kube, "deployment", f"{self.name}-{pool}", "-n", self.ns)
        return d["spec"].get("replicas") if d else None

    def first(self, key: str, check) -> float | None:
        return next((s["t"] for s in self.samples if s[key] is not None and check(s[key])), None)

    def table(self) -> str:
        t0 = self.samples[0]["t"] if self.samples else 0
        return "\n".join(f"{s['t'] - t0:6.1f}s " + " ".join(f"{k}={v}" for k, v in s.items() if k != "t")
                         for s in self.samples[-40:])


def test_image_burst_scales_vision_first_then_llm_pods_follow_streams_survive_the_scale_down(
        kube, ns, operator_factory, ray_head, tiny_model) -> None:  # noqa: F811
    url, token = ray_head
    name = "dots-scale"
    kube.apply(yaml.safe_dump({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": f"{name}-ray-token"},
                               "stringData": {"token": token}}), namespace=ns)
    api_port = free_port()
    api = f"http://127.0.0.1:{api_port}"
    cr = load_example("dotsvlm-small.yaml")
    cr["metadata"]["name"] = name
    cr["spec"]["model"] = {"path": str(tiny_model), "mountPath": str(tiny_model.parent), "quantization": "none",
                           "dtype": "float32", "volume": {"hostPath": {"path": str(tiny_model.parent)}}}
    cr["spec"]["vision"] = {"gpusPerReplica": 0, "minReplicas": 0, "maxReplicas": 2, "maxBatchPixels": 1_000_000,
                            "autoscaling": {**FAST, "targetOngoingRequests": 2, "idleToZeroSeconds": 8}}
    # One running request per LLM replica and a target of 4 per replica: a burst asks for the second
    # replica, and two streams alone ask for one, so the scale-down must drain a replica that streams.
    cr["spec"]["llm"] = {"gpusPerReplica": 0, "tensorParallel": 1, "contextLength": 1024, "maxRunningRequests": 1,
                         "maxNewTokensDefault": 16, "minReplicas": 1, "maxReplicas": 2,
                         "autoscaling": {**FAST, "targetOngoingRequests": 4}}
    cr["spec"]["api"] = {"port": api_port, "requestTimeoutSeconds": 240}
    cr["spec"]["slo"] = {"imageTTFTSeconds": 120, "textTTFTSeconds": 60, "interTokenSeconds": 10}
    op = operator_factory([ns], head_url=url, extra=["--api-url-override", api, "--pod-loop-seconds", "1"])
    kube.apply(yaml.safe_dump(cr), namespace=ns)
    watch = Watch(kube, ns, name, api)

    def diag() -> str:
        got = get_json(kube, "dvlm", name, "-n", ns) or {}
        return f"samples:\n{watch.table()}\nstatus: {got.get('status')}\n--- operator ---\n{op.log_tail()}"

    # At rest: the application runs, the vision pool is at zero and so are its pods; one LLM replica and pod.
    poll(lambda: (s := watch.sample())["llm_current"] == 1 and s["vision_desired"] == 0 and s["vision_pods"] == 0
         and s["llm_pods"] == 1, 420, "the application running with vision at 0 and LLM at 1 (pods too)", diag)
    # A text request is served while the vision pool is at zero.
    r = httpx.post(f"{api}/v1/chat/completions", json=_body(0, image=False, max_tokens=4), timeout=120)
    assert r.status_code == 200, r.text
    assert watch.sample()["vision_desired"] == 0, "a text request woke the vision pool"

    # 1. Image-heavy burst: vision wakes first, then the LLM pool grows; pods follow.
    outcomes: Counter = Counter()
    problems: list[str] = []
    sent: list[int] = []
    stop_burst = threading.Event()
    t_burst = time.monotonic()
    sender = _sustained(api, lambda n: _body(n, image=True, max_tokens=48), 24, stop_burst, sent, outcomes, problems)
    try:
        poll(lambda: (s := watch.sample())["vision_pods"] and s["vision_pods"] >= 1 and s["llm_pods"] == 2,
             300, "vision pods woken and a second LLM pod while the burst runs", diag)
        # The order of the policy's decisions: vision woke before the LLM pool grew (the pods of both may be
        # added in one pass, ahead of demand, so the order is read from the decisions).
        poll(lambda: (watch.sample()["policy_llm"] or 0) >= 2, 120, "the policy's LLM decision of 2", diag)
        t_vision = watch.first("policy_vision", lambda v: v >= 1)
        t_llm = watch.first("policy_llm", lambda v: v >= 2)
        assert t_vision is not None and t_llm is not None, diag()
        assert t_vision <= t_llm, f"the LLM pool grew before the vision pool woke:\n{watch.table()}"
        assert t_vision - t_burst < 120, diag()
        # Serve's second LLM replica runs (the status counts Serve's RUNNING replicas), so the streams below
        # can sit on two replicas.
        poll(lambda: watch.sample()["llm_current"] == 2, 240, "two running LLM replicas", diag)
    finally:
        stop_burst.set()
    sender.join(timeout=400)
    assert not sender.is_alive(), f"the burst did not finish: {outcomes}\n{diag()}"
    assert sum(outcomes.values()) == len(sent), (len(sent), outcomes)
    assert outcomes[200] >= len(sent) // 2, (outcomes, problems[:5])
    assert not problems, problems[:5]

    # 2. Streams keep both LLM replicas busy (one running request each; a new stream as soon as one ends)
    # while the load is gone and the LLM pool shrinks under them: every stream ends with all its tokens.
    stream_results: list[tuple[float, float, int | None]] = []  # (started, ended, completion tokens or None)
    stop = threading.Event()

    def slot() -> None:
        body = {**_body(100, image=False, max_tokens=200, stream=True), "stream_options": {"include_usage": True}}
        while not stop.is_set():
            started = time.monotonic()
            tokens = None
            try:
                with httpx.stream("POST", api + "/v1/chat/completions", json=body, timeout=300) as r:
                    lines = [x[6:] for x in r.iter_lines() if x.startswith("data: ")] if r.status_code == 200 else []
                if lines and lines[-1] == "[DONE]":
                    tokens = json.loads(lines[-2]).get("usage", {}).get("completion_tokens")
            except httpx.HTTPError:
                pass
            stream_results.append((started, time.monotonic(), tokens))

    slots = [threading.Thread(target=slot, daemon=True) for _ in range(2)]
    for t in slots:
        t.start()
    try:
        poll(lambda: (s := watch.sample())["policy_llm"] == 1 and s["llm_pods"] == 1, 300,
             "the LLM pool (and its pods) back to 1 while the streams run", diag)
        down_at = time.monotonic()
    finally:
        stop.set()
        for t in slots:
            t.join(timeout=300)
    assert not any(t.is_alive() for t in slots), "a stream hung"
    assert stream_results and all(n == 200 for _, _, n in stream_results), \
        f"a stream lost tokens or failed while its replica drained: {stream_results}"
    assert any(a < down_at < b for a, b, _ in stream_results), "no stream was running when the pool scaled down"

    # 3. Both pools back down after their windows, their pods too.
    poll(lambda: (s := watch.sample())["vision_desired"] == 0 and s["vision_pods"] == 0 and s["llm_pods"] == 1,
         240, "the vision pool (and its pods) back to zero", diag)

    # Every decision left an Event with its reason; the status names the last one.
    reasons = {e["reason"] for e in get_json(kube, "events", "-n", ns)["items"]
               if e["involvedObject"].get("name") == name}
    assert reasons & {"WakeUp", "VisionRequests", "VisionBacklog"}, reasons
    assert reasons & {"LLMDemand", "VisionLeadingSignal", "DemandTrend", "QueueAge"}, reasons
    assert reasons & {"LowLoad", "IdleToZero"}, reasons
    st = get_json(kube, "dvlm", name, "-n", ns)["status"]
    # The newest decision holds the pool ("Stable"); the last change says why it went to zero.
    assert st["vision"]["lastScale"]["reason"] in ("IdleToZero", "LowLoad"), st["vision"]
    assert st["llm"]["lastScale"]["reason"] == "LowLoad", st["llm"]
    # Nothing is left in the tensor queue (the status follows the ingress's report within a few seconds).
    poll(lambda: (get_json(kube, "dvlm", name, "-n", ns)["status"].get("queue") or {}).get("depth") == 0, 60,
         "an empty tensor queue in the status", diag)
