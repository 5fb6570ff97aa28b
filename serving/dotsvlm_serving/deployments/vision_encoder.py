"""VisionEncoder: runs the vision tower, batching work across requests by a pixel budget.

Requests wait in a FIFO; a batch takes requests from its head while their resized pixels fit
`max_batch_pixels` (a single larger request still runs alone), waiting up to `max_batch_wait_ms` for
company. All images of a batch go through the tower in one packed forward (block-diagonal attention
keeps them independent). The result of `encode` is the request's embeddings as one float32 array
[image tokens, hidden], which the ingress hands to the tensor queue by object reference.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from ray import serve

from .. import pipeline
from ..model.checkpoint import load_vision_tower
from ..model.config import load_config
from ..autoscaling.signals import vision_stats
from ..serve_config import VISION_DEPLOYMENT, ServeAppConfig

log = logging.getLogger("ray.serve")


@dataclass
class _Job:
    images: list[Image.Image]
    pixels: int
    future: asyncio.Future[np.ndarray]
    queued_at: float


class VisionEncoder:
    async def __init__(self, cfg: ServeAppConfig) -> None:
        self.cfg = cfg  # validated once, by the app builder
        self.model_config = load_config(self.cfg.model_path)
        dtype = getattr(torch, self.cfg.dtype)
        self.tower = load_vision_tower(self.cfg.model_path, device=self.cfg.device, dtype=dtype,
                                       config=self.model_config)
        self._jobs: list[_Job] = []
        self._wake = asyncio.Event()
        self._stats = {"batches": 0, "images": 0, "pixels_total": 0.0, "encode_seconds_total": 0.0}
        self._encoding_images = 0
        self._loop = asyncio.get_running_loop().create_task(self._batch_forever())

    async def encode(self, images: list[Image.Image]) -> np.ndarray:
        pixels = pipeline.resized_pixels(images, self.model_config, self.cfg.api.images)
        fut: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(images, pixels, fut, time.monotonic()))
        self._wake.set()
        return await fut

    def _next_batch(self) -> list[_Job]:
        self._jobs = [j for j in self._jobs if not j.future.done()]  # drop cancelled callers
        batch, pixels = [], 0
        budget = self.cfg.vision.max_batch_pixels
        while self._jobs and (not batch or pixels + self._jobs[0].pixels <= budget):
            job = self._jobs.pop(0)
            batch.append(job)
            pixels += job.pixels
        return batch

    async def _batch_forever(self) -> None:
        wait_s = self.cfg.vision.max_batch_wait_ms / 1000
        while True:
            await self._wake.wait()
            self._wake.clear()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            while self._jobs:
                batch = self._next_batch()
                if not batch:
                    break
                images = [im for j in batch for im in j.images]
                t0 = time.monotonic()
                self._encoding_images = len(images)
                try:
                    per_image = await asyncio.to_thread(pipeline.encode_images, self.tower, images,
                                                        self.model_config, self.cfg.api.images)
                except Exception as exc:  # give every caller the error instead of hanging them
                    log.exception("vision encode failed")
                    for j in batch:
                        if not j.future.done():
                            j.future.set_exception(RuntimeError(f"vision encoder failed: {exc}"))
                    continue
                finally:
                    self._encoding_images = 0
                self._stats["batches"] += 1
                self._stats["images"] += len(images)
                self._stats["pixels_total"] += sum(j.pixels for j in batch)
                self._stats["encode_seconds_total"] += time.monotonic() - t0
                i = 0
                for j in batch:
                    n = len(j.images)
                    if not j.future.done():
                        j.future.set_result(np.concatenate(per_image[i:i + n]) if n else
                                            np.zeros((0, self.model_config.vision.hidden_size), np.float32))
                    i += n

    async def stats(self) -> dict[str, float]:
        return dict(self._stats, backlog_images=float(sum(len(j.images) for j in self._jobs)),
                    encoding_images=float(self._encoding_images))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve's hook: this replica's measured encode rate for the autoscaling policy."""
        return vision_stats(self._stats)

    def check_health(self) -> None:
        if self._loop.done():
            raise RuntimeError("the vision batching loop stopped")


# This deployment's own Serve options; the app builder adds the pool's replicas, GPUs and pool resource.
VisionEncoderDeployment = serve.deployment(name=VISION_DEPLOYMENT, max_ongoing_requests=256)(VisionEncoder)
