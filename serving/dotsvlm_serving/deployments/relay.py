"""The relay between the ingress and the pools: vision encode, enqueue, and the request's events.

For one validated request: encode its images on the vision pool (sent as their file bytes: the vision
replicas decode them; the embeddings stay in the object store; only their reference travels on), enqueue a small work item in the tensor queue (429 when it
stays full), then long-poll the request's mailbox for the LLM replica's events, until the terminal
one. When the LLM replica reports that the embeddings were lost, the images are encoded once more.
A client that goes away cancels its request in the queue.

The relay holds each request's work item until the terminal event, so the tensor queue's state can be
rebuilt from the ingresses: when the queue replica is lost, each request is enqueued again on its
replacement (streaming requests that already sent tokens fail with 503 instead; docs/serving.md).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
from dataclasses import dataclass
from collections.abc import AsyncIterator
from typing import Any

import ray

from ..admission import QUEUE_FULL
from ..api.errors import ApiError
from ..autoscaling.signals import IngressSignals
from . import ref_watch
from .backpressure import IngressAdmission
from ..events import EventBatch, RestartEvent, is_terminal
from ..metrics.publish import ReplicaMetrics
from ..tensor_queue import QueueItem, RayObjectTransport, TensorHandle

log = logging.getLogger("ray.serve")

# How long a request waits for the tensor queue to come back (Serve replaces a lost replica in seconds)
# before it fails with 503, how often it retries meanwhile, and how many times it may be enqueued again.
QUEUE_RECOVERY_S = 30.0
QUEUE_RETRY_S = 0.25
MAX_REQUEUES = 3
# What a call to a lost (or not yet replaced) queue replica raises; anything else is a real error.
_UNREACHABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError, asyncio.TimeoutError)
# A stream's tokens after the first are fetched at most this often (in batches).
STREAM_BATCH_S = 0.02
# Slack over a queue call's own wait before the call counts as unanswered.
CALL_MARGIN_S = 10.0
# How long one shared long-poll for the ingress's streams waits when none of them has events: a stream
# that comes back for more while the poll is out joins the next one, so this bounds its extra wait.
STREAMS_POLL_S = 0.05


class StreamPoller:
    """One long-poll to the tensor queue for all of this ingress's streams that already had their first
    event, instead of one call per stream per batch (`TensorQueue.next_events_many`): under load the
    queue and the ingress handle one call per cadence rather than one per open stream. A stream asks
    with `next_events(rid)` and gets its events ([] when it has none yet; None when the queue does not
    know it), or the call's exception; the next shared call starts as soon as the last one answered."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue
        self._waiting: dict[str, asyncio.Future[list | None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.calls = 0  # shared calls made (tests and benchmarks compare with the streams served)

    async def next_events(self, rid: str) -> list | None:
        fut: asyncio.Future[list | None] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        if self._task is None or self._task.done():
            # A fresh context: Serve cancels what a request's context started when that request ends.
            self._task = asyncio.get_running_loop().create_task(self._run(), context=contextvars.Context())
        try:
            return await fut
        finally:
            if self._waiting.get(rid) is fut:  # cancelled before the shared call took it
                del self._waiting[rid]

    async def _run(self) -> None:
        while self._waiting:
            await asyncio.sleep(0)  # the streams answered by the last call ask again together
            batch, self._waiting = self._waiting, {}
            if not batch:  # the only stream waiting went away meanwhile
                continue
            self.calls += 1
            try:
                got = await asyncio.wait_for(
                    self.queue.next_events_many.remote(list(batch), STREAMS_POLL_S, STREAM_BATCH_S),
                    STREAMS_POLL_S + STREAM_BATCH_S + CALL_MARGIN_S)
                answers = {rid: got.get(rid, []) for rid in batch}
            except BaseException as exc:  # each stream handles it as its own call's failure
                for fut in batch.values():
                    if not fut.done():
                        fut.set_exception(exc if isinstance(exc, Exception) else RuntimeError("the poll stopped"))
                if not isinstance(exc, Exception):
                    raise
                continue
            for rid, fut in batch.items():
                if not fut.done():
                    fut.set_result(answers[rid])


@dataclass
class _Held:
    """A request this ingress holds until its terminal event: enough to enqueue it again when the queue
    replica is lost. Each enqueue uses a fresh id, so events of an earlier copy cannot mix in."""

    base_id: str
    item: QueueItem
    requeues: int = 0
    tokens_seen: bool = False
    events_seen: bool = False
    next_i: int = 0  # the numbered event (`i`) of the current delivery that comes next (`_fresh`)
    delivery: int = 0  # the current delivery (`d`), 0 until one is known (`_fresh`)
    _n: int = 0

    @property
    def rid(self) -> str:
        return self.item.request_id

    def renew(self) -> None:
        self._n += 1
        self.item = dataclasses.replace(self.item, request_id=f"{self.base_id}-q{self._n}", deliveries=0)
        self.next_i = self.delivery = 0


def _fresh(req: _Held, evs: EventBatch) -> EventBatch:
    """The events the client has not had yet. While the tensor queue moves, both of its replicas may hand out
    one numbered event (an LLM replica whose publish reached the old one but whose reply was lost sends it
    again, to the new one; each hands out in order, so a repeat is one below the number expected next), each
    may make the restart of a redelivery, and the one that did not redeliver may still hold events of the
    earlier delivery (`d`)."""
    out: EventBatch = []
    for ev in evs:
        i, d = ev.get("i"), ev.get("d")  # type: ignore[union-attr]
        if d is not None:
            if d < req.delivery or (d == req.delivery and ev["type"] == "restart"):
                continue  # an earlier delivery's, or the restart the other replica made too
            req.delivery = d
        if ev["type"] == "restart":  # the next delivery numbers its events from 0 again
            if req.item.stream and (req.tokens_seen or any(e["type"] == "token" for e in out)):
                # The queue redelivers only answers none of whose tokens it holds; during a hand-over the other
                # replica may have streamed some all the same: the new delivery's text would follow them.
                raise ApiError(503, "the LLM replica generating this answer stopped while it was streaming (the "
                                    "tensor queue was moving); retry the request")
            req.next_i = 0
        elif i is not None:
            if i < req.next_i:
                continue
            req.next_i = i + 1
        out.append(ev)
    return out


VISION_TIMEOUT = ("the vision encoder did not finish this request's images before the request timeout "
                  "(api.requestTimeoutSeconds): the vision pool may be starting a replica (it scales to zero when "
                  "vision.minReplicas is 0) or have none that can start (no free GPU: see the resource's status); "
                  "retry, or keep a vision replica warm with vision.minReplicas: 1")


class Relay:
    """Used by the ingress; holds the vision and tensor-queue handles and the cancellations in flight."""

    def __init__(self, vision: Any, queue: Any, metrics: ReplicaMetrics, signals: IngressSignals,
                 admission: IngressAdmission, *, hidden_size: int, pixels_per_token: int, enqueue_timeout_s: float,
                 request_timeout_s: float, embed_dtype: str = "float32") -> None:
        self.vision, self.queue, self.metrics, self.signals = vision, queue, metrics, signals
        self.admission = admission
        self.hidden_size = hidden_size
        self.embed_dtype = embed_dtype  # what the vision tower computes (ServeAppConfig.dtype)
        self.pixels_per_token = pixels_per_token
        self.enqueue_timeout_s = enqueue_timeout_s
        self.request_timeout_s = request_timeout_s
        self._background: set[asyncio.Task[Any]] = set()
        self.streams = StreamPoller(queue)
        self.requeued_total = 0  # requests enqueued again after the queue lost them

    async def encode(self, images: list[bytes], counts: list[int], deadline: float, *, admit: bool = True) -> TensorHandle:
        """Encode on the vision pool; the embeddings stay in the object store (owned by this process, so
        they outlive the vision replica) and only their reference travels on. With `admit`, a request
        whose images do not fit in the vision stage's backlog limit gets 429 first (backpressure)."""
        t = time.monotonic()
        # The autoscaler's view of the vision backlog: counted here, so it is known even while the
        # vision pool has no replica (the call then waits at the handle until Serve starts one). The
        # admission limit is on the same number.
        pixels = sum(counts) * self.pixels_per_token
        if admit:
            self.admission.check_pixels(pixels, self.signals.pending_pixels, t)
        self.signals.vision_started(len(images), pixels)
        self.metrics.inc("dotsvlm_vision_admitted_pixels", pixels)
        encoded = None
        try:
            response = self.vision.encode.remote(images, pixels)
            # Serve hands out the reference only once a replica has taken the call: while the pool has no
            # replica that can run (scaled to zero, or its new replica waits for a GPU) that wait has no
            # end of its own, so the request's deadline bounds it.
            try:
                ref = await asyncio.wait_for(response._to_object_ref(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                response.cancel()
                raise ApiError(504, VISION_TIMEOUT) from None
            # Readiness without fetching the bytes here (they go to the LLM replica): one thread of this
            # process waits on every request's embeddings (`ref_watch`), instead of each polling Ray.
            try:
                ready = await ref_watch.ready(ref, deadline - time.monotonic())
            except BaseException:  # the client went away, or Ray cannot say: the encode is not wanted
                response.cancel()
                raise
            if not ready:
                response.cancel()  # the vision replica drops a cancelled caller's images from its batches
                raise ApiError(504, VISION_TIMEOUT)
            encoded = time.monotonic() - t
            self.admission.pixels_drained.add(t + encoded, pixels)
        finally:
            self.signals.vision_finished(len(images), pixels, time.monotonic(), encoded)
        self.metrics.observe("dotsvlm_vision_request_seconds", encoded)
        return RayObjectTransport.from_ref(ref, shape=(sum(counts), self.hidden_size), dtype=self.embed_dtype)

    async def submit(self, cid: str, ids: list[int], images: list[bytes], counts: list[int],
                     params: dict[str, Any], stream: bool, deadline: float) -> AsyncIterator[EventBatch]:
        """Encode + enqueue, and return the request's events, in the batches they arrived in (the ingress
        sends a batch's text as one chunk); retries once from the vision step when the LLM replica
        reports that the embeddings were lost."""
        attempts = 2 if images else 1
        for attempt in range(attempts):
            # Admitted once: encoding again (embeddings lost) is not refused.
            handle = await self.encode(images, counts, deadline, admit=attempt == 0) if images else None
            nbytes = (handle.nbytes if handle else 0) + 8 * len(ids)
            item = QueueItem(request_id=f"{cid}-{attempt}", nbytes=nbytes,
                             reserved_tokens=len(ids) + params["max_tokens"],
                             payload={"ids": ids, "embeds": handle, "params": params}, stream=stream)
            req = _Held(f"{cid}-{attempt}", item)
            await self._enqueue(req, deadline)
            events = self._events(req, deadline, until_done=not stream)
            try:
                first = await events.__anext__()
            except BaseException:
                self.cancel_later(req.rid)
                raise
            if first[0]["type"] == "error" and first[0].get("stage") == "vision" and attempt + 1 < attempts:
                log.warning("request %s: embeddings lost, encoding again", req.rid)
                self.metrics.inc("dotsvlm_vision_retries")
                continue
            return self._prepend(first, events, req)
        raise AssertionError("unreachable")

    async def _enqueue(self, req: _Held, deadline: float) -> None:
        """Put the request's item in the queue: 429 when it stays full, 400 when it can never fit. While
        the queue replica is unreachable (lost, being replaced by Serve), retry for up to
        QUEUE_RECOVERY_S, each time under a fresh id, then fail with 503; one that is being replaced and
        answers "moved" is retried the same way (under the same id: it did not take the request)."""
        give_up = min(deadline, time.monotonic() + QUEUE_RECOVERY_S)
        while True:
            timeout = max(0.0, min(self.enqueue_timeout_s, deadline - time.monotonic()))
            unreachable: BaseException | None = None
            try:
                res = await asyncio.wait_for(self.queue.put.remote(req.item, timeout), timeout + CALL_MARGIN_S)
                if res["ok"] or res["reason"] != "moved":
                    break
                # The replica that answered is being replaced: its successor takes the request.
            except _UNREACHABLE as exc:
                unreachable = exc
                self.cancel_later(req.rid)  # in case it did arrive
            except BaseException:  # the client went away (CancelledError) while the put was out: the queue
                self.cancel_later(req.rid)  # may have taken it, and an LLM replica would answer it for nobody
                raise
            if time.monotonic() + QUEUE_RETRY_S >= give_up:
                why = ("the tensor queue was moving and its new replica did not take the request"
                       if unreachable is None else
                       f"the tensor queue is unavailable ({type(unreachable).__name__}) and no replacement answered")
                raise ApiError(503, f"{why} within {QUEUE_RECOVERY_S:g} s; retry the request") from None
            if unreachable is not None:
                log.warning("request %s: the tensor queue did not take it (%s); trying again", req.rid,
                            type(unreachable).__name__)
                req.renew()
            await asyncio.sleep(QUEUE_RETRY_S)
        if not res["ok"]:
            if res["reason"] == "full":
                raise ApiError(429, res["message"], code=QUEUE_FULL,
                               headers={"Retry-After": str(int(res["retry_after_s"]))})
            raise ApiError(400, res["message"], code="request_too_large")

    async def _prepend(self, first: EventBatch, rest: AsyncIterator[EventBatch],
                       req: _Held) -> AsyncIterator[EventBatch]:
        finished = any(is_terminal(ev) for ev in first)
        try:
            yield first
            if finished:
                return
            async for batch in rest:
                finished = any(is_terminal(ev) for ev in batch)
                yield batch
                if finished:
                    return
        finally:
            if not finished:
                self.cancel_later(req.rid)

    async def _events(self, req: _Held, deadline: float, *, until_done: bool = False) -> AsyncIterator[EventBatch]:
        """The request's events until its terminal one, a non-empty batch per answer of the queue. When
        the queue no longer knows the request (its replica died and Serve replaced it: the queued and
        leased items died with it), the request is enqueued again from what this ingress holds, unless
        tokens already reached a streaming client (then 503, as when an LLM replica dies mid-stream)."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.cancel_later(req.rid)
                raise ApiError(504, f"the request did not finish within {self.request_timeout_s:g} s")
            wait_s = min(5.0, remaining)
            try:
                # After the first event (time to first token stays untouched: its own call), a stream's
                # tokens are fetched in batches, with the ingress's other streams in one shared call.
                # A non-streaming answer is fetched whole (`until_done`) only after its first events: the
                # ingress times the first token when they arrive (the TTFT metric and the autoscaler's TTFT
                # p90), which a first poll waiting for the whole answer would put at the last token.
                if req.events_seen and not until_done:
                    evs = await self.streams.next_events(req.rid)
                else:
                    whole = until_done and req.events_seen
                    evs = await asyncio.wait_for(self.queue.next_events.remote(req.rid, wait_s, whole),
                                                 wait_s + CALL_MARGIN_S)
                lost = "it restarted" if evs is None else ""
            except _UNREACHABLE as exc:
                evs, lost = None, type(exc).__name__
            except Exception as exc:
                raise ApiError(503, f"the tensor queue failed ({type(exc).__name__}); retry the request") from None
            if evs is None:
                had_tokens = req.tokens_seen
                await self._requeue(req, deadline, lost)
                if had_tokens:  # a non-streaming answer: drop what was buffered
                    yield [RestartEvent(request_id=req.rid, type="restart")]
                continue
            evs = _fresh(req, evs)
            if not evs:
                continue
            req.events_seen = True
            if any(ev["type"] == "token" for ev in evs):
                req.tokens_seen = True
            end = next((i for i, ev in enumerate(evs) if is_terminal(ev)), len(evs) - 1)
            yield evs[:end + 1]

    async def _requeue(self, req: _Held, deadline: float, why: str) -> None:
        if req.item.stream and req.tokens_seen:
            raise ApiError(503, f"the tensor queue lost this request while its answer was streaming ({why}); "
                                "retry the request")
        if req.requeues >= MAX_REQUEUES:
            raise ApiError(503, f"the tensor queue lost this request {req.requeues + 1} times ({why}); retry the request")
        req.requeues += 1
        self.requeued_total += 1
        log.warning("request %s: the tensor queue lost it (%s); enqueueing it again", req.rid, why)
        self.cancel_later(req.rid)  # if the old queue is in fact alive, it must not run twice
        req.renew()
        req.tokens_seen = False
        await self._enqueue(req, deadline)

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
