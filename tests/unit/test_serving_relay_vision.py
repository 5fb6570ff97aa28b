"""The relay's vision half, without Ray: a request whose embeddings were lost is encoded again once (not
forever), and a vision call no replica takes before the request's deadline is a 504 whose call is cancelled."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from dotsvlm_serving.api.errors import ApiError
from dotsvlm_serving.autoscaling.signals import IngressSignals
from dotsvlm_serving.deployments import relay as relay_mod
from dotsvlm_serving.deployments.backpressure import IngressAdmission
from dotsvlm_serving.deployments.relay import Relay
from dotsvlm_serving.serve_config import ServeAppConfig


class _Metrics:
    def __init__(self) -> None:
        self.incs: list[str] = []

    def inc(self, name: str, *_a: Any, **_k: Any) -> None:
        self.incs.append(name)

    def observe(self, *_a: Any, **_k: Any) -> None: ...


class _Response:
    """What `vision.encode.remote(...)` returns: Serve hands out the ref once a replica took the call."""

    def __init__(self, n: int, taken: bool) -> None:
        self.n, self.taken, self.cancelled = n, taken, False

    async def _to_object_ref(self) -> str:
        if not self.taken:
            await asyncio.Event().wait()  # no replica can run it (scaled to zero, waiting for a GPU)
        return f"embeddings-{self.n}"

    def cancel(self) -> None:
        self.cancelled = True


class _Vision:
    def __init__(self, taken: bool = True) -> None:
        self.taken, self.calls = taken, []
        self.encode = self

    def remote(self, images: list[bytes], pixels: int) -> _Response:
        self.calls.append(_Response(len(self.calls) + 1, self.taken))
        return self.calls[-1]


class _Call:
    def __init__(self, fn) -> None:
        self.remote = fn


class _Queue:
    """Answers each request id with `answer(rid)` as its events."""

    def __init__(self, answer) -> None:
        self.put_ids: list[str] = []
        self.cancelled: list[str] = []

        async def put(item, _timeout):
            self.put_ids.append(item.request_id)
            return {"ok": True}

        async def next_events(rid, _wait_s, _whole=False):
            return answer(rid)

        async def cancel(rid):
            self.cancelled.append(rid)

        self.put, self.next_events, self.cancel = _Call(put), _Call(next_events), _Call(cancel)


def _relay(vision: _Vision, queue: _Queue, monkeypatch) -> Relay:
    async def ready(_ref, _timeout_s):
        return True

    monkeypatch.setattr(relay_mod.ref_watch, "ready", ready)
    cfg = ServeAppConfig.model_validate({"model_path": "/m"}).ingress_config()
    return Relay(vision, queue, _Metrics(), IngressSignals(), IngressAdmission(cfg), hidden_size=8,
                 pixels_per_token=784, enqueue_timeout_s=5, request_timeout_s=60)


def _lost(rid: str) -> list[dict]:
    return [{"request_id": rid, "type": "error", "code": 503, "stage": "vision", "message": "embeddings lost"}]


def _finish(rid: str) -> list[dict]:
    return [{"request_id": rid, "type": "finish", "finish_reason": "stop", "text": "", "i": 0}]


async def _answer(relay: Relay) -> list:
    events = await relay.submit("c", [1, 2], [b"png"], [4], {"max_tokens": 4}, False, time.monotonic() + 30)
    return [ev for batch in [b async for b in events] for ev in batch]


def test_lost_embeddings_are_encoded_again_once_and_the_second_answer_reaches_the_client(monkeypatch) -> None:
    vision, queue = _Vision(), _Queue(lambda rid: _lost(rid) if rid == "c-0" else _finish(rid))
    relay = _relay(vision, queue, monkeypatch)
    got = asyncio.run(_answer(relay))
    assert [ev["type"] for ev in got] == ["finish"] and got[0]["request_id"] == "c-1"
    assert len(vision.calls) == 2 and queue.put_ids == ["c-0", "c-1"]
    assert relay.metrics.incs.count("dotsvlm_vision_retries") == 1
    assert relay.signals.pending_pixels == 0 and relay.signals.pending_images == 0  # both encodes counted back


def test_embeddings_lost_again_reach_the_client_as_the_error_instead_of_encoding_forever(monkeypatch) -> None:
    vision, queue = _Vision(), _Queue(_lost)
    got = asyncio.run(_answer(_relay(vision, queue, monkeypatch)))
    assert [(ev["type"], ev["code"]) for ev in got] == [("error", 503)]
    assert len(vision.calls) == 2


def test_a_vision_call_no_replica_takes_before_the_deadline_is_a_504_and_is_cancelled(monkeypatch) -> None:
    vision, queue = _Vision(taken=False), _Queue(_finish)
    relay = _relay(vision, queue, monkeypatch)
    with pytest.raises(ApiError) as err:
        asyncio.run(relay.encode([b"png"], [4], time.monotonic() + 0.2))
    assert err.value.status == 504 and "vision.minReplicas" in str(err.value)
    assert vision.calls[0].cancelled and not queue.put_ids
    assert relay.signals.pending_pixels == 0
