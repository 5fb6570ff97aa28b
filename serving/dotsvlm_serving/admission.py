"""Backpressure before the vision stage: whether an image request goes on or gets 429 (no torch, no ray).

Two bounds, checked by each ingress replica before a request's images go to the vision pool:

- **pixels** (after resize) sent to the vision stage and not yet back: the backlog the autoscaler reads
  (`signals.VISION_PENDING_PIXELS`, counted by the ingress so it is known even while the pool has no
  replica). The stage's limit is `VisionPoolConfig.pending_pixels_limit(running replicas)`; each ingress
  replica admits against its share of it (Serve's proxy spreads requests over the ingress replicas), so
  the stage in all never holds more than the limit.
- **bytes** of images one ingress replica holds (`ApiConfig.max_image_bytes_in_flight`): request bodies
  being read and image files until the request's first token (they are kept until then to encode again
  when embeddings are lost).

A request alone always goes in (nothing else holds room), so every request the API accepts as valid can
be served, also by a vision pool that is waking up from zero. Retry-After is the time the work ahead
needs to make room, at the rate this replica measured the stage draining; a fixed guess until it has.

A refused request takes the **next turn** for its pixels (`turn_pixels`): until its Retry-After has passed
and a grace after it, smaller requests go in only while they leave that room free. Without it, a large
request (one larger than the share goes in only when nothing is pending) could be refused forever by a
steady flow of small ones that never let the backlog empty. The largest refused request holds the turn;
one as large (the refused client, retrying) takes it.
"""

from __future__ import annotations

import math
import asyncio
from collections import deque
from dataclasses import dataclass

# Reasons of a backpressure rejection (a metric label, the error's `code`) and the stage each bounds.
VISION_BACKLOG_FULL = "vision_backlog_full"
IMAGE_BYTES_FULL = "image_bytes_full"
QUEUE_FULL = "queue_full"
STAGE_OF = {VISION_BACKLOG_FULL: "vision", IMAGE_BYTES_FULL: "ingress", QUEUE_FULL: "queue"}

DEFAULT_RETRY_AFTER_S = 5  # before any drain was measured
MAX_RETRY_AFTER_S = 300
TURN_GRACE_S = 10.0  # a refused request's next turn lasts its Retry-After and this much more


@dataclass(frozen=True)
class Rejection:
    reason: str  # VISION_BACKLOG_FULL or IMAGE_BYTES_FULL
    message: str  # for the person who sent the request: what happened and what to do
    retry_after_s: int

    @property
    def stage(self) -> str:
        return STAGE_OF[self.reason]


def share(limit: int, ingress_replicas: int) -> int:
    """One ingress replica's share of a limit of the whole stage."""
    return max(1, math.ceil(limit / max(1, ingress_replicas)))


def retry_after_s(excess: float, rate_per_s: float | None) -> int:
    """Seconds until `excess` units of the work ahead have drained at `rate_per_s` (whole seconds, as the
    Retry-After header wants them; at least 1, at most MAX_RETRY_AFTER_S)."""
    if not rate_per_s or rate_per_s <= 0:
        return DEFAULT_RETRY_AFTER_S
    return int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(excess / rate_per_s))))


def _excess(request: int, ahead: int, limit: int) -> int:
    """What must drain before a refused request goes in: its excess over the limit, or all the work ahead when
    that comes first (a request larger than the limit goes in alone)."""
    return min(ahead + request - limit, ahead)


def _mpx(pixels: float) -> str:
    return f"{pixels / 1e6:.1f} Mpx"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def admit_pixels(*, request_pixels: int, pending_pixels: int, limit: int, running_replicas: int,
                 drain_pixels_per_s: float | None, turn_pixels: int = 0, turn_left_s: float = 0.0) -> Rejection | None:
    """None: the request's images may go to the vision stage. `pending_pixels` and `limit` are this
    ingress replica's backlog and share; `turn_pixels` the room a larger request refused lately has the next
    turn for, for `turn_left_s` more seconds."""
    replicas = f"{running_replicas} vision replica{'s' if running_replicas != 1 else ''} running"
    if 0 < request_pixels < turn_pixels and turn_left_s > 0:
        if pending_pixels + request_pixels + turn_pixels <= limit:
            return None
        wait = int(min(MAX_RETRY_AFTER_S, max(1, math.ceil(turn_left_s))))
        return Rejection(VISION_BACKLOG_FULL, (
            f"the vision encoder is overloaded: {_mpx(pending_pixels)} of images already wait to be encoded on "
            f"this API replica (its share of the limit is {_mpx(limit)}, {replicas}), and a larger request "
            f"refused before this one has the next turn for {_mpx(turn_pixels)}. Nothing was processed: retry "
            f"after {wait} s. The vision pool grows with its backlog up to vision.maxReplicas."), wait)
    if pending_pixels <= 0 or pending_pixels + request_pixels <= limit:
        return None
    wait = retry_after_s(_excess(request_pixels, pending_pixels, limit), drain_pixels_per_s)
    return Rejection(VISION_BACKLOG_FULL, (
        f"the vision encoder is overloaded: {_mpx(pending_pixels)} of images already wait to be encoded on this "
        f"API replica, its share of the limit is {_mpx(limit)} ({replicas}), and this request's images add "
        f"{_mpx(request_pixels)}. Nothing was processed: retry after {wait} s, or send fewer or smaller images. "
        "The vision pool grows with its backlog up to vision.maxReplicas; the limits are "
        "vision.maxPendingPixelsPerReplica and vision.maxPendingPixels."), wait)


def admit_bytes(*, request_bytes: int, held_bytes: int, limit: int,
                release_bytes_per_s: float | None) -> Rejection | None:
    """None: this ingress replica may hold the request's image bytes too."""
    if held_bytes <= 0 or held_bytes + request_bytes <= limit:
        return None
    wait = retry_after_s(_excess(request_bytes, held_bytes, limit), release_bytes_per_s)
    return Rejection(IMAGE_BYTES_FULL, (
        f"the API is overloaded with large requests: this API replica already holds {_mb(held_bytes)} of images "
        f"and large bodies of other requests (limit {_mb(limit)}, api.maxImageBytesInFlight) and this request brings "
        f"{_mb(request_bytes)}. Nothing was processed: retry after {wait} s, or send smaller images or prompts."), wait)


class DrainRate:
    """Units (pixels, bytes) that left a stage recently, per second: the measured drain rate behind
    Retry-After. Over the last `window_s`, from the first sample in it (a burst that began a moment ago
    is not diluted by the quiet before it), at least one second."""

    def __init__(self, window_s: float = 30.0, max_samples: int = 4096) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, now: float, amount: float) -> None:
        if amount > 0:
            self._samples.append((now, amount))

    def rate(self, now: float) -> float | None:
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        if not self._samples:
            return None
        span = max(1.0, now - self._samples[0][0])
        return sum(a for _, a in self._samples) / span


class ByteBudget:
    """Bytes one ingress replica holds for requests, against its limit (single event loop: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self.released = DrainRate()

    def reserve(self, nbytes: int, now: float, own: int = 0) -> Rejection | None:
        """Take `nbytes` more for a request that holds `own` already, or say why not (nothing taken then)."""
        rejection = admit_bytes(request_bytes=own + nbytes, held_bytes=self.held - own, limit=self.limit,
                                release_bytes_per_s=self.released.rate(now))
        if rejection is None:
            self.held += nbytes
        return rejection

    def release(self, nbytes: int, now: float) -> None:
        self.held = max(0, self.held - nbytes)
        self.released.add(now, nbytes)


class AmountGate:
    """First come, first served admission by amount (a vision replica's decoded pixels): `acquire(n)`
    waits until `n` fits under the limit, or nothing is held (a request larger than the limit runs
    alone). Single event loop, no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        """Amount asked for by callers still waiting."""
        return sum(n for n, f in self._waiters if not f.done())

    def _fits(self, n: int) -> bool:
        return self.held <= 0 or self.held + n <= self.limit

    async def acquire(self, n: int) -> None:
        if not self._waiters and self._fits(n):
            self.held += n
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (n, fut)
        self._waiters.append(entry)
        try:
            await fut
        except BaseException:
            if fut.done() and not fut.cancelled():  # granted, then the caller went away
                self.release(n)
            else:
                try:
                    self._waiters.remove(entry)
                except ValueError:
                    pass
                self._grant()
            raise

    def release(self, n: int) -> None:
        self.held = max(0, self.held - n)
        self._grant()

    def set_limit(self, limit: int) -> None:
        """A new limit, in place: what is held stays; a raised limit lets waiting callers in at once."""
        self.limit = limit
        self._grant()

    def _grant(self) -> None:
        while self._waiters and (self._waiters[0][1].done() or self._fits(self._waiters[0][0])):
            n, fut = self._waiters.popleft()
            if fut.done():
                continue
            self.held += n
            fut.set_result(None)
