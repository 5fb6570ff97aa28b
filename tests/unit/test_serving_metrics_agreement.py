"""The numbers the metrics show and the autoscaler reads are the numbers they say they are: time to first
token of a non-streaming request, requests in flight while streams run, the alerts' inputs when a pool
has no replica."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

from dotsvlm_serving.autoscaling.signals import IngressSignals
from dotsvlm_serving.tensor_queue import TensorQueueCore


class _Method:
    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class _QueueHandle:
    """The tensor queue deployment's handle over a core in this process (the calls the relay makes)."""

    def __init__(self, core: TensorQueueCore) -> None:
        self.core = core
        self.put = _Method(self._put)
        self.next_events = _Method(lambda rid, wait_s, until_done=False: core.next_events(rid, wait_s,
                                                                                         until_done=until_done))
        self.next_events_many = _Method(lambda rids, wait_s, linger_s=0.0: core.next_events_many(rids, wait_s,
                                                                                                  linger_s=linger_s))
        self.cancel = _Method(self._cancel)

    async def _put(self, item: Any, timeout: float) -> dict:
        await self.core.put(item, timeout)
        return {"ok": True}

    async def _cancel(self, rid: str) -> bool:
        return self.core.cancel(rid)


def test_a_non_streaming_requests_first_token_is_timed_when_it_comes_not_when_the_answer_ends() -> None:
    """The ingress times the first token (the TTFT histogram and the autoscaler's TTFT p90, one sample) when
    the request's first events reach it. A non-streaming request's first long-poll waited for the whole
    answer, so its 'first token' came at its last: a text answer of a few seconds read as a TextTTFTMiss
    (scaling the LLM pool) and fired DotsVLMTimeToFirstTokenHigh while its first token took 50 ms."""
    from dotsvlm_serving.deployments.relay import Relay

    core = TensorQueueCore(max_items=8, max_bytes=10**9)
    metrics = SimpleNamespace(inc=lambda *a, **k: None, observe=lambda *a, **k: None)
    relay = Relay(None, _QueueHandle(core), metrics, IngressSignals(), None,  # type: ignore[arg-type]
                  hidden_size=8, pixels_per_token=1, enqueue_timeout_s=5, request_timeout_s=60)

    async def llm_replica() -> None:
        (item,) = await core.take("llm-1", max_items=1, token_budget=10**6, wait_s=5)
        rid = item.request_id
        await asyncio.sleep(0.05)
        core.publish("llm-1", [{"request_id": rid, "i": 0, "type": "token", "text": "Hello"}])
        await asyncio.sleep(1.5)  # the rest of a long answer
        core.publish("llm-1", [{"request_id": rid, "i": 1, "type": "finish", "finish_reason": "stop", "text": "",
                                "usage": {"prompt_tokens": 3, "completion_tokens": 40}}])

    async def main() -> tuple[float, list, list]:
        serving = asyncio.create_task(llm_replica())
        t0 = time.monotonic()
        events = await relay.submit("chatcmpl-1", [1, 2, 3], [], [], {"max_tokens": 40}, False, t0 + 30)
        first = await events.__anext__()
        first_at = time.monotonic() - t0
        rest = [b async for b in events]
        await serving
        return first_at, first, rest

    first_at, first, rest = asyncio.run(main())
    assert first[0]["type"] == "token" and first_at < 0.8, f"the first token reached the ingress after {first_at:.2f} s"
    assert rest and rest[-1][-1]["type"] == "finish", "the rest of the answer still comes"


def _bare_ingress() -> Any:
    from dotsvlm_serving.deployments.backpressure import IngressAdmission
    from dotsvlm_serving.deployments.ingress import Ingress
    from dotsvlm_serving.serve_config import ServeAppConfig

    cfg = ServeAppConfig.model_validate({"model_path": "/m", "api": {"api_keys_env": None}}).ingress_config()
    ing = object.__new__(Ingress)
    ing.cfg, ing.admission = cfg, IngressAdmission(cfg)
    ing.metrics = SimpleNamespace(inc=lambda *a, **k: None)
    ing._in_flight = ing._open = 0
    ing._draining_head = lambda: None
    return ing


def _streaming_handler(chunks: int):
    from fastapi.responses import StreamingResponse

    async def handler(request, t0, info):
        async def body():
            for _ in range(chunks):
                await asyncio.sleep(0.01)
                yield b"data: x\n\n"
        return StreamingResponse(body(), media_type="text/event-stream")
    return handler


def test_a_stream_counts_in_flight_until_its_last_byte() -> None:
    """`ray_dotsvlm_requests_in_flight` ("requests being served") dropped a stream as soon as its headers were
    ready, while its tokens still flowed for seconds or minutes: under a streaming load it read ~0."""
    ing = _bare_ingress()
    seen: list[int] = []

    async def main() -> None:
        response = await ing._counted(_streaming_handler(3), None)
        seen.append(ing._in_flight)

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("more_body"):
                seen.append(ing._in_flight)

        async def receive() -> dict:
            await asyncio.Event().wait()
            return {}

        await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)

    asyncio.run(main())
    assert seen == [1, 1, 1, 1], seen
    assert ing._in_flight == 0 and ing._open == 0


def test_a_stream_whose_client_left_before_its_body_started_is_no_longer_counted_open() -> None:
    """The stream was counted open until its body generator's `finally`; a client gone before the body's first
    chunk (Starlette stops at the response's start) never started that generator, so the request stayed
    open (and in flight) for the replica's life: a head drain waited for it until its deadline."""
    from starlette.requests import ClientDisconnect

    ing = _bare_ingress()

    async def main() -> None:
        response = await ing._counted(_streaming_handler(3), None)

        async def send(message: dict) -> None:
            raise OSError("the client went away")

        async def receive() -> dict:
            return {"type": "http.disconnect"}

        try:
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        except ClientDisconnect:
            pass

    asyncio.run(main())
    assert ing._in_flight == 0 and ing._open == 0, (ing._in_flight, ing._open)


def test_the_vllm_engine_reports_the_kv_cache_tokens_its_replica_publishes() -> None:
    """The LLM replica publishes `kv_tokens_used` (ray_dotsvlm_llm_kv_cache_used_tokens, the LLM pool dashboard's
    KV-cache use) and `tokens_generated_total` from its engine's stats(), a missing key as 0. The vLLM engine
    (production) had no `kv_tokens_used`: KV-cache use read 0 whatever ran. Every engine has them now."""
    from dotsvlm_serving.engine import STATS_KEYS
    from dotsvlm_serving.engine.base import EngineInput, RequestBudget
    from dotsvlm_serving.engine.sampling import SamplingParams
    from dotsvlm_serving.engine.vllm_engine import VLLMEngine, _Req

    assert {"kv_tokens_used", "tokens_generated_total"} <= set(STATS_KEYS)
    eng = object.__new__(VLLMEngine)
    eng.budget = RequestBudget(context_length=4096, kv_tokens=8192, max_running=4)

    def req(rid: str, prompt: int, max_tokens: int, generated: int, started: bool) -> _Req:
        inp = EngineInput(rid, list(range(prompt)), None, SamplingParams(max_tokens=max_tokens))
        return _Req(inp, {}, completion_tokens=generated, started=started)

    eng._reqs = {"a": req("a", 100, 50, 20, True), "b": req("b", 30, 10, 0, False)}
    eng.tokens_generated = 20
    stats = eng.stats()
    assert set(STATS_KEYS) <= set(stats)
    assert stats["kv_tokens_used"] == 120.0  # the running request's prompt and tokens so far
    assert stats["kv_tokens_reserved"] == 190.0 and stats["tokens_generated_total"] == 20.0


def _stream_through_counted(batches: list[list[dict]], *, client_leaves_after: int | None = None) -> list[tuple]:
    """One streamed chat answer of these event batches through the ingress's `_counted` and `_stream`, served to
    a client that reads it all (or leaves after `client_leaves_after` body chunks); the requests counted."""
    ing = _bare_ingress()
    counted: list[tuple] = []
    ing.metrics = SimpleNamespace(inc=lambda name, value=1.0, **labels: counted.append((name, labels)),
                                  observe=lambda *a, **k: None)
    ing.signals = IngressSignals()
    ing.model = SimpleNamespace(served_model_name="dots")

    async def events():
        for batch in batches:
            await asyncio.sleep(0.01)
            yield batch

    async def handler(request, t0, info):
        info["modality"] = "text"
        req = SimpleNamespace(stream_options=None)
        return await ing._stream("chat", "chatcmpl-1", req, events(), t0, 0)

    async def main() -> None:
        response = await ing._counted(handler, None)
        sent = 0
        gone = asyncio.Event()

        async def send(message: dict) -> None:
            nonlocal sent
            if message["type"] == "http.response.body":
                sent += 1
                if client_leaves_after is not None and sent > client_leaves_after:
                    gone.set()
                    raise OSError("the client went away")

        async def receive() -> dict:
            await gone.wait()
            return {"type": "http.disconnect"}

        try:
            await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)
        except (OSError, Exception):
            pass

    asyncio.run(main())
    return [labels for name, labels in counted if name == "dotsvlm_requests"]


def test_a_stream_that_fails_midway_counts_as_the_error_it_sent() -> None:
    """A stream was counted 200 when its headers went out, so an answer cut by a 503 mid-stream (its LLM replica
    died holding it) or a 504 (the request timeout) counted as a success: with most chat clients streaming,
    DotsVLMHighErrorRate and the Overview's 5xx ratio missed the failures they are for. A stream now counts when
    it ends: with the code of the error it sent, 200 when it finished, 499 when its client left first."""
    tok = {"request_id": "r", "type": "token", "text": "Hi"}
    fin = {"request_id": "r", "type": "finish", "finish_reason": "stop", "text": "",
           "usage": {"prompt_tokens": 1, "completion_tokens": 2}}
    err = {"request_id": "r", "type": "error", "code": 503, "message": "the LLM replica stopped responding"}
    assert _stream_through_counted([[tok], [err]]) == [{"code": "503", "modality": "text"}]
    assert _stream_through_counted([[tok], [tok], [fin]]) == [{"code": "200", "modality": "text"}]
    assert _stream_through_counted([[tok]] * 20 + [[fin]], client_leaves_after=3) == [
        {"code": "499", "modality": "text"}]
