"""VisionEncoder: runs the vision tower, batching work across requests by a pixel budget.

A request's images arrive as their compressed bytes (the ingress only reads their headers) with
their pixel count after resize: each request is decoded, resized and patchified on this replica's
thread pool as soon as its pixels fit under `vision.max_pending_pixels_per_replica` with the pixels the
replica holds already (first come, first served; a larger request alone still goes; the rest wait
compressed, so a replica's memory stays bounded whatever Serve routes to it) (Pillow
and numpy release the GIL, so requests prepare in parallel, and overlap the running forward), then
waits in a FIFO; a batch takes requests from its head while their resized pixels fit
`max_batch_pixels` (a single larger request still runs alone), waiting up to `max_batch_wait_ms` for
company. All images of a batch go through the tower in one packed forward (block-diagonal attention
keeps them independent). The result of `encode` is the request's embeddings [image tokens, hidden]
in the tower's dtype, as the ndarray `tensor_queue.to_wire` makes of it (bf16 as an int16 view), which
the ingress hands to the tensor queue by object reference; with `queue.embedding_transport: nixl` it is
a `DirectTensorRef` instead: the tensor stays here, on the tower's device, until the LLM replica pulls it
with Ray's direct transport. An image that fails to decode fails the
call with `ImageError` ("image N: ..."), which the LLM replica reports to the client as a 400. A batch
whose forward fails is encoded again one request at a time, so a request the tower cannot take fails
only its own call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve

from .. import pipeline
from ..admission import AmountGate
from ..metrics.publish import ReplicaMetrics, StatsPublisher
from ..model.checkpoint import load_vision_tower
from ..model.config import load_config
from ..model.preprocess import ImageError, PreprocessedImages, decode_image, probe_image
from ..autoscaling.signals import vision_stats
from ..serve_config import VISION_DEPLOYMENT, ServedModel, VisionEncoderConfig
from ..tensor_queue import DirectTensorRef, check_direct_transport, to_wire

log = logging.getLogger("ray.serve")


@dataclass
class _Job:
    pre: PreprocessedImages
    pixels: int
    future: asyncio.Future[np.ndarray]
    queued_at: float
    n_images: int = 0


class VisionEncoder:
    """Its slice (`VisionEncoderConfig`: batch budget and wait, image limits) arrives through
    `reconfigure`, before the first request and whenever only the slice changes; it applies in place
    (to the next batch, and to requests that arrive after it), so the tower stays loaded."""

    MAX_FAILED_BATCHES = 3

    async def __init__(self, model: ServedModel) -> None:
        self.cfg: VisionEncoderConfig | None = None  # set by reconfigure before the first request
        self.model_config = load_config(model.model_path)
        self.tower = load_vision_tower(model.model_path, device=model.device, dtype=getattr(torch, model.dtype),
                                       config=self.model_config)
        self._jobs: list[_Job] = []
        self._wake = asyncio.Event()
        # answers_direct: answers whose embeddings went by Ray's direct transport (queue.embedding_transport)
        self._stats = {"batches": 0, "images": 0, "pixels_total": 0.0, "encode_seconds_total": 0.0, "answers_direct": 0}
        self._encoding_images = 0
        self._preparing_images = 0
        self._failed_batches = 0  # encode batches failed in a row (`check_health`)
        self._batch_error = ""
        # Decoded pixels this replica holds (preparing, waiting, encoding) stay within its share of the
        # vision stage's limit; further requests wait here still compressed, in arrival order.
        self._gate = AmountGate(0)  # its limit comes with the slice (reconfigure)
        self._gated_images = 0
        # Decode + resize + patchify, per request, in parallel with each other and with the forward.
        self._prepare_pool = concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2),
                                                thread_name_prefix="vision-prepare")
        self.metrics = ReplicaMetrics("vision")
        publisher = StatsPublisher(self.metrics, self.stats,
                                   gauges={"dotsvlm_vision_backlog_images": "backlog_images",
                                           "dotsvlm_vision_encoding_images": "encoding_images",
                                           "dotsvlm_vision_held_pixels": "held_pixels"},
                                   counters={"dotsvlm_vision_images_encoded": "images",
                                             "dotsvlm_vision_pixels_encoded": "pixels_total"})
        loop = asyncio.get_running_loop()
        self._loop = loop.create_task(self._batch_forever())
        self._publishing = loop.create_task(publisher.run_forever())

    async def reconfigure(self, user_config: dict) -> None:
        cfg = VisionEncoderConfig.model_validate(user_config)
        check_direct_transport(cfg.embedding_transport)  # refused here, before a request would fail on it
        self.cfg = cfg
        self._gate.set_limit(self.cfg.max_pending_pixels_per_replica)
        self._wake.set()  # a waiting batch re-reads its wait and budget
        log.info("VisionEncoder: config applied in place: batch budget %d pixels, wait %g ms", self.cfg.max_batch_pixels,
                 self.cfg.max_batch_wait_ms)

    def _prepare(self, images: list[bytes]) -> PreprocessedImages:
        lim = self.cfg.images
        decoded = []
        for i, data in enumerate(images):
            try:
                # Resized at once: the request holds one image at its original size at a time (a 13000x13000
                # PNG is 500 MB decoded), not all of them; `preprocess` then takes each at its size.
                decoded.append(pipeline.resized(decode_image(data, max_bytes=lim.max_image_bytes),
                                                self.model_config, lim))
            except ImageError as exc:
                raise ImageError(f"image {i + 1}: {exc}") from None
        return pipeline.preprocess(decoded, self.model_config, lim, resized=True)

    def _resized_pixels(self, images: list[bytes]) -> int:
        """Pixels after resize, from the images' headers (what the ingress counts)."""
        lim = self.cfg.images
        sizes = []
        for i, data in enumerate(images):
            try:
                sizes.append(probe_image(data, max_bytes=lim.max_image_bytes))
            except ImageError as exc:
                raise ImageError(f"image {i + 1}: {exc}") from None
        pre = self.model_config.preprocess
        return sum(pipeline.token_counts_for_sizes(sizes, self.model_config, lim)) * (pre.patch_size * pre.merge_size) ** 2

    async def encode(self, images: list[bytes], pixels: int | None = None) -> np.ndarray | DirectTensorRef:
        """The request's images (their file bytes, in order) -> embeddings [tokens, hidden] (wire form).
        `pixels`: their pixels after resize, as the ingress counted them (read from the headers if not
        given); the request is decoded once they fit under this replica's limit."""
        need = pixels if pixels is not None else self._resized_pixels(images)
        self._gated_images += len(images)
        try:
            await self._gate.acquire(need)
        finally:
            self._gated_images -= len(images)
        loop = asyncio.get_running_loop()
        prepared: concurrent.futures.Future[PreprocessedImages] | None = None
        job: _Job | None = None
        try:
            self._preparing_images += len(images)
            try:
                prepared = self._prepare_pool.submit(self._prepare, images)
                pre = await asyncio.wrap_future(prepared)
            finally:
                self._preparing_images -= len(images)
            pixels = int(pre.grid_thw.prod(dim=1).sum()) * self.model_config.preprocess.patch_size ** 2
            fut: asyncio.Future[np.ndarray] = loop.create_future()
            job = _Job(pre, pixels, fut, time.monotonic(), len(images))
            del pre
            self._jobs.append(job)
            self._wake.set()
            return await fut
        finally:
            # A caller that went away (the client left: Serve cancels the call) lets go of its decoded images at
            # once, not when the batching loop next looks; and its pixels stay held while a thread still decodes
            # them (a cancel does not stop the thread), so the replica's decoded memory stays within its limit.
            if job is not None:
                self._jobs = [j for j in self._jobs if j is not job]
            if prepared is None or prepared.done():
                self._gate.release(need)
            else:  # (the callback runs in the preparing thread)
                prepared.add_done_callback(lambda _: loop.call_soon_threadsafe(self._gate.release, need))

    def _next_batch(self) -> list[_Job]:
        self._jobs = [j for j in self._jobs if not j.future.done()]  # drop cancelled callers
        batch, pixels = [], 0
        budget = self.cfg.max_batch_pixels
        while self._jobs and (not batch or pixels + self._jobs[0].pixels <= budget):
            job = self._jobs.pop(0)
            batch.append(job)
            pixels += job.pixels
        return batch

    async def _batch_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            wait_s = self.cfg.max_batch_wait_ms / 1000
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            while self._jobs:
                batch = self._next_batch()
                if not batch:
                    break
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Job]) -> None:
        """One packed forward for the batch, and each caller's answer. When a batch of several requests fails,
        each request is encoded again alone, so that one request the tower cannot take (its input, or the
        memory of that batch) fails only its own caller, not the others batched with it by chance."""
        n_images = sum(j.n_images for j in batch)
        t0 = time.monotonic()
        self._encoding_images = n_images
        # read once per batch: a reconfigure while it runs applies to the next one
        transport = self.cfg.embedding_transport
        direct = transport != "object-store"
        pre = None
        try:
            pre = PreprocessedImages.concat([j.pre for j in batch])
            per_image = await asyncio.to_thread(pipeline.encode_preprocessed, self.tower, pre, to_cpu=not direct)
        except Exception as exc:  # give every caller the error instead of hanging them
            if len(batch) > 1:
                log.warning("vision encode of a batch of %d requests failed (%s: %s); encoding each alone", len(batch),
                            type(exc).__name__, exc)
                pre = None  # (the packed batch's memory goes before its requests are encoded again)
                failed_before = self._failed_batches
                for j in batch:
                    if not j.future.done():
                        await self._run_batch([j])
                # The health check counts this as one failed batch, however many of its requests failed alone:
                # a few inputs the tower cannot take, batched together by chance, do not get the replica replaced.
                self._failed_batches = min(self._failed_batches, failed_before + 1)
                return
            log.exception("vision encode failed")
            self._failed_batches += 1
            self._batch_error = f"{type(exc).__name__}: {exc}"
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(RuntimeError(f"vision encoder failed: {exc}"))
            return
        finally:
            self._encoding_images = 0
        self._failed_batches = 0
        self._stats["batches"] += 1
        self._stats["images"] += n_images
        took = time.monotonic() - t0
        self._stats["pixels_total"] += sum(j.pixels for j in batch)
        self._stats["encode_seconds_total"] += took
        self.metrics.observe("dotsvlm_vision_batch_images", n_images)
        self.metrics.observe("dotsvlm_vision_encode_seconds", took)
        i = 0
        for j in batch:
            part, i = per_image[i:i + j.n_images], i + j.n_images
            if j.future.done():
                continue
            out = torch.cat(part)
            try:
                answer = DirectTensorRef.put(out, transport) if direct else to_wire(out)
            except Exception as exc:  # (a failed put) fails this caller, not the batching loop
                log.exception("vision answer failed")
                j.future.set_exception(RuntimeError(f"vision encoder failed: {exc}"))
                continue
            j.future.set_result(answer)
            self._stats["answers_direct"] += direct

    async def stats(self) -> dict[str, float]:
        backlog = (self._gated_images + self._preparing_images
                   + sum(j.n_images for j in self._jobs if not j.future.done()))
        return dict(self._stats, backlog_images=float(backlog), encoding_images=float(self._encoding_images),
                    held_pixels=float(self._gate.held))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook: this replica's measured encode rate for the autoscaling policy."""
        return vision_stats(self._stats)

    def check_health(self) -> None:
        if self._loop.done():
            raise RuntimeError("the vision batching loop stopped")
        if self._failed_batches >= self.MAX_FAILED_BATCHES:
            # One failed batch can be a bad input; a run of them is a broken tower (a lost device, say): Serve
            # replaces the replica instead of it failing every image request sent to it.
            raise RuntimeError(f"the vision tower is broken: its last {self._failed_batches} batches failed, the last "
                               f"with {self._batch_error}; Serve replaces this replica. If its replacements fail the "
                               "same way, see their logs (a lost GPU, out of memory)")


# This deployment's own Serve options; its slice, replicas, GPUs and pool resource come from
# ServeAppConfig.deployment_options().
VisionEncoderDeployment = serve.deployment(name=VISION_DEPLOYMENT, max_ongoing_requests=256)(VisionEncoder)
