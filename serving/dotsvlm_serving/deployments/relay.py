"""The relay between the ingress and the pools: vision encode, enqueue, and the request's events.

For one validated request: encode its images on the vision pool (the embeddings stay in the object
store; only their reference travels on), enqueue a small work item in the tensor queue (429 when it
stays full), then long-poll the request's mailbox for the LLM replica's events, until the terminal
one. When the LLM replica reports that the embeddings were lost, the images are encoded once more.
A client that goes away cancels its request in the queue.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import ray
from PIL import Image

from ..api.errors import ApiError
from ..autoscaling.signals import IngressSignals
from ..events import Event, is_terminal
from ..metrics import IngressMetrics
from ..tensor_queue import QueueItem, RayObjectTransport, TensorHandle

log = logging.getLogger("ray.serve")


class Relay:
    """Used by the ingress; holds the vision and tensor-queue handles and the cancellations in flight."""

    def __init__(self, vision: Any, queue: Any, metrics: IngressMetrics, signals: IngressSignals, *, hidden_size: int,
                 pixels_per_token: int, enqueue_timeout_s: float, request_timeout_s: float) -> None:
        self.vision, self.queue, self.metrics, self.signals = vision, queue, metrics, signals
        self.hidden_size = hidden_size
        self.pixels_per_token = pixels_per_token
        self.enqueue_timeout_s = enqueue_timeout_s
        self.request_timeout_s = request_timeout_s
        self._background: set[asyncio.Task[Any]] = set()

    async def encode(self, images: list[Image.Image], counts: list[int], deadline: float) -> TensorHandle:
        """Encode on the vision pool; the embeddings stay in the object store (owned by this process, so
        they outlive the vision replica) and only their reference travels on."""
        t = time.monotonic()
        self.metrics.vision_backlog.inc(len(images))
        # The autoscaler's view of the vision backlog: counted here, so it is known even while the
        # vision pool has no replica (the call then waits at the handle until Serve starts one).
        pixels = sum(counts) * self.pixels_per_token
        self.signals.vision_started(len(images), pixels)
        encoded = None
        try:
            ref = await self.vision.encode.remote(images)._to_object_ref()
            # Readiness without fetching the bytes here (fetch_local=False); a short poll keeps the
            # event loop free for other requests.
            delay = 0.001
            while not ray.wait([ref], timeout=0, fetch_local=False)[0]:
                if time.monotonic() > deadline:
                    raise ApiError(504, "the vision encoder did not finish this request's images before the request "
                                        "timeout: the vision pool may be starting a replica (it scales to zero when "
                                        "vision.minReplicas is 0) or be out of GPUs; retry, or keep a vision replica "
                                        "warm with vision.minReplicas: 1")
                await asyncio.sleep(delay)
                delay = min(0.01, delay * 2)
            encoded = time.monotonic() - t
        finally:
            self.metrics.vision_backlog.dec(len(images))
            self.signals.vision_finished(len(images), pixels, time.monotonic(), encoded)
        self.metrics.encode_seconds.observe(encoded)
        return RayObjectTransport.from_ref(ref, shape=(sum(counts), self.hidden_size), dtype=np.float32)

    async def submit(self, cid: str, ids: list[int], images: list[Image.Image], counts: list[int],
                     params: dict[str, Any], stream: bool, deadline: float) -> AsyncIterator[Event]:
        """Encode + enqueue, and return the request's event iterator; retries once from the vision step
        when the LLM replica reports that the embeddings were lost."""
        attempts = 2 if images else 1
        for attempt in range(attempts):
            rid = f"{cid}-{attempt}"
            handle = await self.encode(images, counts, deadline) if images else None
            nbytes = (handle.nbytes if handle else 0) + 8 * len(ids)
            item = QueueItem(request_id=rid, nbytes=nbytes, reserved_tokens=len(ids) + params["max_tokens"],
                             payload={"ids": ids, "embeds": handle, "params": params}, stream=stream)
            timeout = max(0.0, min(self.enqueue_timeout_s, deadline - time.monotonic()))
            res = await self.queue.put.remote(item, timeout)
            if not res["ok"]:
                if res["reason"] == "full":
                    raise ApiError(429, res["message"], code="queue_full",
                                   headers={"Retry-After": str(int(res["retry_after_s"]))})
                raise ApiError(400, res["message"], code="request_too_large")
            events = self._events(rid, deadline, until_done=not stream)
            try:
                first = await events.__anext__()
            except BaseException:
                self.cancel_later(rid)
                raise
            if first["type"] == "error" and first.get("stage") == "vision" and attempt + 1 < attempts:
                log.warning("request %s: embeddings lost, encoding again", rid)
                self.metrics.vision_retries.inc()
                continue
            return self._prepend(first, events, rid)
        raise AssertionError("unreachable")

    async def _prepend(self, first: Event, rest: AsyncIterator[Event], rid: str) -> AsyncIterator[Event]:
        finished = is_terminal(first)
        try:
            yield first
            if finished:
                return
            async for ev in rest:
                finished = is_terminal(ev)
                yield ev
                if finished:
                    return
        finally:
            if not finished:
                self.cancel_later(rid)

    async def _events(self, rid: str, deadline: float, *, until_done: bool = False) -> AsyncIterator[Event]:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.cancel_later(rid)
                raise ApiError(504, f"the request did not finish within {self.request_timeout_s:g} s")
            try:
                evs = await self.queue.next_events.remote(rid, min(5.0, remaining), until_done)
            except Exception as exc:
                raise ApiError(503, f"the tensor queue is unavailable ({type(exc).__name__}); retry the request") from None
            if evs is None:
                raise ApiError(503, "the request was lost by the tensor queue (did it restart?); retry the request")
            for ev in evs:
                yield ev

    def cancel_later(self, rid: str) -> None:
        """Cancel without awaiting (we may be inside a cancelled task or a closing generator)."""
        async def go() -> None:
            try:
                await self.queue.cancel.remote(rid)
            except Exception:
                log.warning("could not cancel %s", rid)
        # A fresh context: Serve cancels calls made in the context of a cancelled request, and this
        # call must outlive the request that is being cancelled.
        task = asyncio.get_running_loop().create_task(go(), context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
