"""dotsvlm's autoscaling policy running inside Ray Serve, end to end on a local Ray (CPU, tiny model).

`dotsvlm serve --config` runs the stack in its own process, deployed the way the operator deploys it
(a Serve config with the application-level policy). The vision pool starts at zero. Bursts of text and
of images go in; the decisions the policy publishes (`/-/autoscaler`) and every request's outcome are
checked: the text burst never wakes the vision pool, the image burst wakes it and grows the LLM pool,
both pools come back down after their windows while streams keep running, and every request ends in
200 or a clear 429/503, none hangs.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from serving_support import free_port, wait_healthy
from test_serving_app import image_part, png

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONFIG = {
    # One running request per LLM replica, so that two long streams sit on two replicas; a target of 4
    # requests per replica then asks for one replica while both stream: the scale-down must drain one.
    "llm": {"context_length": 1024, "max_running_requests": 1, "max_new_tokens_default": 16,
            "autoscaling": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4,
                            "upscale_delay_s": 1, "downscale_delay_s": 6, "scale_down_interval_s": 2,
                            "replica_startup_s": 10}},
    "vision": {"max_batch_pixels": 1_000_000, "max_batch_wait_ms": 5,
               "autoscaling": {"min_replicas": 0, "max_replicas": 2, "target_ongoing_requests": 2,
                               "upscale_delay_s": 1, "downscale_delay_s": 6, "scale_down_interval_s": 2,
                               "idle_to_zero_s": 8, "replica_startup_s": 10}},
    "queue": {"max_items": 64, "enqueue_timeout_s": 30},
    "api": {"request_timeout_s": 180},
    "slo": {"image_ttft_s": 120, "text_ttft_s": 60, "inter_token_s": 10},
}


class Stack:
    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[dict] = []  # every decision record polled, in order

    def decisions(self) -> dict:
        r = httpx.get(self.url + "/-/autoscaler", timeout=10)
        r.raise_for_status()
        body = r.json()
        if body.get("decisions"):
            self.seen.append(body["decisions"])
        return body

    def wait_for(self, what: str, check: Callable[[dict], bool], timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        last: dict = {}
        while time.monotonic() < deadline:
            last = self.decisions()
            if last.get("decisions") and check(last["decisions"]):
                return last
            time.sleep(0.5)
        raise AssertionError(f"{what}: not within {timeout_s} s; last: {last}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint

    tmp = tmp_path_factory.mktemp("autoscale")
    model = ensure_tiny_checkpoint(tmp / "tiny")
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    port = free_port()
    exe = Path(sys.executable).with_name("dotsvlm")
    log = (tmp / "serve.log").open("w")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("DOTSVLM_API_KEYS", None)
    proc = subprocess.Popen([str(exe), "serve", "--model", str(model), "--config", str(cfg), "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:  # healthy, or the command ended (its log says why), or the deadline
            assert proc.poll() is None, f"dotsvlm serve exited: {(tmp / 'serve.log').read_text()[-2000:]}"
            try:
                wait_healthy(url, 5)
                break
            except AssertionError:
                assert time.monotonic() < deadline, f"not healthy in 300 s: {(tmp / 'serve.log').read_text()[-2000:]}"
        yield Stack(url)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
        print((tmp / "serve.log").read_text()[-3000:])


def _body(i: int, image: bool, max_tokens: int = 8, stream: bool = False) -> dict:
    content: list | str = f"request {i}"
    if image:
        content = [image_part(png(220 + 7 * i, 180)), {"type": "text", "text": f"image request {i}"}]
    return {"model": "dots.vlm1", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "ignore_eos": True, "stream": stream}


async def _send(url: str, bodies: list[dict], outcomes: Counter) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=240) as client:
        async def one(body: dict) -> None:
            r = await client.post("/v1/chat/completions", json=body)
            if r.status_code == 200:
                if body.get("stream"):
                    assert r.text.rstrip().endswith("data: [DONE]") and '"finish_reason"' in r.text, r.text[-500:]
            else:
                assert r.status_code in (429, 503), r.text
                assert r.json()["error"]["message"], r.text
            outcomes[r.status_code] += 1
        await asyncio.gather(*(one(b) for b in bodies))


def test_text_burst_never_wakes_the_vision_pool(stack: Stack) -> None:
    first = stack.wait_for("first decision", lambda d: "vision" in d, 60)["decisions"]
    assert first["vision"]["desired"] == 0, "minReplicas 0 and no image yet: the vision pool starts at zero"
    outcomes: Counter = Counter()
    asyncio.run(_send(stack.url, [_body(i, image=False) for i in range(16)], outcomes))
    assert sum(outcomes.values()) == 16 and outcomes[200] >= 1, outcomes
    stack.decisions()
    assert all(d["vision"]["desired"] == 0 for d in stack.seen), "text-only traffic woke the vision pool"


def test_image_burst_wakes_vision_then_grows_llm_and_nothing_is_lost(stack: Stack) -> None:
    """Image requests keep coming (twelve at a time, a new one as soon as one ends) until the LLM pool has
    grown and the vision pool is sized from the encode rate its replica measured (the signal VisionBacklog:
    the live rate reached the policy through Serve), so the check does not depend on how fast this machine
    serves a fixed burst."""
    # The text burst before may have grown the LLM pool: start from one replica, so "vision first" is seen.
    stack.wait_for("the LLM pool back to one replica before the image burst", lambda d: d["llm"]["desired"] == 1, 120)
    stack.seen.clear()
    outcomes: Counter = Counter()
    sent: list[int] = []

    async def burst_and_watch() -> None:
        grown = asyncio.Event()

        async def sender(worker: int) -> None:
            i = 0
            while not grown.is_set():
                n = 12 * i + worker
                sent.append(n)
                served = outcomes[200]
                await _send(stack.url, [_body(n, image=True)], outcomes)
                if outcomes[200] == served:  # pushed back (429/503): wait as a polite client would
                    await asyncio.sleep(1.0)
                i += 1

        load = [asyncio.create_task(sender(w)) for w in range(12)]
        deadline = time.monotonic() + 240
        llm_grown = rate_seen = False
        while time.monotonic() < deadline and not grown.is_set():
            d = (await asyncio.to_thread(stack.decisions)).get("decisions") or {}
            llm_grown = llm_grown or (d.get("llm") or {}).get("desired", 0) >= 2
            rate_seen = rate_seen or (d.get("vision") or {}).get("signal") == "VisionBacklog"
            if llm_grown and rate_seen:
                grown.set()
            await asyncio.sleep(0.5)
        grown.set()
        await asyncio.gather(*load)

    asyncio.run(burst_and_watch())
    assert sum(outcomes.values()) == len(sent) and outcomes[200] >= len(sent) // 2, (len(sent), outcomes)
    vision_up = [i for i, d in enumerate(stack.seen) if d["vision"]["desired"] >= 1]
    llm_up = [i for i, d in enumerate(stack.seen) if d["llm"]["desired"] >= 2]
    assert vision_up, f"the vision pool never woke: {stack.seen[-3:]}"
    assert llm_up, f"the LLM pool never grew under {len(sent)} image requests: {stack.seen[-3:]}"
    assert vision_up[0] <= llm_up[0], "the vision pool scales first, the LLM pool as its work arrives"
    assert stack.seen[vision_up[0]]["vision"]["last_change"]["reason"] == "WakeUp", stack.seen[vision_up[0]]
    backlog = [d["vision"] for d in stack.seen if d["vision"].get("signal") == "VisionBacklog"]
    assert backlog, f"the vision replica's measured encode rate never sized the pool: {stack.seen[-3:]}"
    assert "MP/s" in backlog[-1]["message"], backlog[-1]
    reasons = {d["llm"]["reason"] for d in stack.seen[llm_up[0]:llm_up[0] + 1]} | {
        d["llm"]["last_change"]["reason"] for d in stack.seen if d["llm"]["desired"] >= 2}
    assert reasons & {"VisionLeadingSignal", "LLMDemand", "QueueAge"}, reasons


def _stream_tokens(url: str, body: dict) -> tuple[int, float]:
    """Stream one request; the completion tokens its usage reports, and when it finished."""
    import json

    body = {**body, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=240) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]" and any('"finish_reason":"length"' in x for x in lines), lines[-3:]
    usage = json.loads(lines[-2])["usage"]
    return usage["completion_tokens"], time.time()


def test_llm_scale_down_drains_the_replica_while_it_streams(stack: Stack) -> None:
    """A text burst grows the LLM pool to two replicas; two streams run at all times (one running request
    per replica, so one on each); when the burst is served the policy asks for one replica while both
    stream: the replica that goes finishes its stream before it leaves (no token lost, every stream ends).
    The burst's requests keep coming (eight at a time) until both replicas serve, so the check does not
    depend on how fast this machine starts a replica against how fast it serves a fixed burst."""
    stack.seen.clear()
    max_tokens = 300
    body = _body(7, image=False, max_tokens=max_tokens, stream=True)
    results: list[tuple[int, float]] = []
    outcomes: Counter = Counter()
    sent: list[int] = []

    async def scenario() -> tuple[float, bool]:
        down_at: list[float] = []
        both_up = asyncio.Event()  # two LLM replicas served (/health): the burst stops

        async def slot() -> None:
            while not down_at:  # a new stream as soon as the last ended, until the scale-down was seen
                results.append(await asyncio.to_thread(_stream_tokens, stack.url, body))

        async def sender(worker: int) -> None:
            i = 0
            while not both_up.is_set():
                sent.append(n := 2000 + 8 * i + worker)
                await _send(stack.url, [_body(n, image=False, max_tokens=64)], outcomes)
                i += 1

        burst = [asyncio.create_task(sender(w)) for w in range(8)]
        slots = [asyncio.create_task(slot()) for _ in range(2)]
        deadline = time.monotonic() + 240
        while not down_at and time.monotonic() < deadline:
            if not both_up.is_set():
                health = await asyncio.to_thread(lambda: httpx.get(stack.url + "/health", timeout=10).json())
                if health.get("llm_replicas", 0) >= 2:
                    both_up.set()
            d = (await asyncio.to_thread(stack.decisions))["decisions"]["llm"]
            if both_up.is_set() and all(t.done() for t in burst) and d["desired"] == 1:
                down_at.append(time.time())
            await asyncio.sleep(0.5)
        down_at.append(time.time())
        two_served = both_up.is_set()
        both_up.set()
        await asyncio.gather(*burst, *slots)
        return down_at[0], two_served

    down_at, two_served = asyncio.run(scenario())
    assert two_served, f"the text burst did not bring the LLM pool to two serving replicas: {stack.seen[-2:]}"
    assert any(d["llm"]["desired"] >= 2 for d in stack.seen), f"the text burst did not grow the LLM pool: {stack.seen[-2:]}"
    assert stack.seen[-1]["llm"]["desired"] == 1, f"the LLM pool did not scale down under two streams: {stack.seen[-2:]}"
    assert any(t > down_at for _, t in results), "no stream was running when the pool scaled down"
    assert [n for n, _ in results] == [max_tokens] * len(results), "a stream lost tokens while its replica drained"
    assert sum(outcomes.values()) == len(sent) and set(outcomes) <= {200, 429, 503}, (len(sent), outcomes)


def test_both_pools_scale_down_after_their_windows_while_streams_complete(stack: Stack) -> None:
    """A trickle of streaming text requests runs through the scale-down: none is lost."""
    outcomes: Counter = Counter()

    async def trickle_until_down() -> None:
        stop = asyncio.Event()

        async def streams() -> None:
            i = 0
            while not stop.is_set():
                await _send(stack.url, [_body(1000 + i, image=False, max_tokens=24, stream=True)], outcomes)
                i += 1

        task = asyncio.create_task(streams())
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            d = (await asyncio.to_thread(stack.decisions))["decisions"]
            if d["vision"]["desired"] == 0 and d["llm"]["desired"] == 1:
                break
            await asyncio.sleep(1)
        stop.set()
        await task

    asyncio.run(trickle_until_down())
    last = stack.seen[-1]
    assert last["vision"]["desired"] == 0 and last["vision"]["reason"] in ("IdleToZero", "Stable", "LowLoad"), last
    assert last["llm"]["desired"] == 1, last
    assert outcomes and set(outcomes) == {200}, f"streams lost during scale-down: {outcomes}"
