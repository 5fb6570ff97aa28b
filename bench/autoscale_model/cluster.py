"""Discrete-time simulator of the serving path: vision pool -> tensor queue -> LLM pool (disaggregated),
or one pool of replicas that encode and decode (co-located).

Time advances in ticks of `dt` seconds. Within a tick every stage is a fluid server:
- vision replica: FIFO of image requests; works `dt` seconds per tick, each request costing its
  `encode_seconds`; Serve's router sends a request to the least-loaded running replica while that one
  holds fewer than `vision_max_ongoing`, else it waits at the ingress (it does not move later);
- tensor queue: bounded FIFO (`queue_max_items`); a producer that finds it full waits, and after
  `enqueue_timeout_s` the request is rejected (HTTP 429);
- LLM replica: continuous batching. It pulls from the queue while it runs fewer than `max_running` and has
  KV room; prefills (at most `prefill_share_of_step` of the tick while others decode: chunked prefill),
  then decodes for the rest of the tick at `decode_step_s(batch)` per token. The first token comes when
  the request's prefill ends; each running request gets the same tokens per tick (a token clock per
  replica, so the cost per tick does not grow with the tokens).
Replicas asked for start after their start-up time; removed ones stop taking work, drain, then leave.
GPU-seconds count from the moment a replica is asked for until it has left.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from typing import Literal

from dotsvlm_serving.autoscaling.signals import P90_WINDOW_S

from .costs import CostModel
from .traces import Request, Trace

Mode = Literal["disaggregated", "colocated"]


@dataclass
class Outcome:
    """What happened to one request."""

    req: Request
    encoded_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    rejected: bool = False
    queued_at: float = 0.0  # entered the tensor queue (or the co-located replica's queue)
    overhead_s: float = 0.0  # fixed path overhead added to its TTFT

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.req.t + self.overhead_s

    @property
    def itl(self) -> float | None:
        if self.finished_at is None or self.first_token_at is None:
            return None
        n = self.req.output_tokens - 1
        return (self.finished_at - self.first_token_at) / n if n > 0 else 0.0


@dataclass
class VisionReplica:
    ready_at: float
    asked_at: float
    draining: bool = False
    fifo: deque = field(default_factory=deque)  # [outcome, remaining busy seconds]

    def ready(self, now: float) -> bool:
        return now >= self.ready_at


@dataclass
class LLMReplica:
    ready_at: float
    asked_at: float
    draining: bool = False
    waiting: deque = field(default_factory=deque)  # outcomes pulled, not yet prefilled
    running: list = field(default_factory=list)  # heap of (target clock, id, outcome)
    clock: float = 0.0  # tokens each running request has received so far (fluid)
    kv_reserved: int = 0

    def ready(self, now: float) -> bool:
        return now >= self.ready_at

    def load(self) -> int:
        return len(self.running) + len(self.waiting)


class RecentValues:
    """(time, value) samples of the last `window_s` seconds; p90 like the replicas report it."""

    def __init__(self, window_s: float = P90_WINDOW_S) -> None:
        self.window_s = window_s
        self.times: deque = deque()
        self.values: deque = deque()

    def add(self, t: float, v: float) -> None:
        self.times.append(t)
        self.values.append(v)

    def p90(self, now: float) -> float | None:
        while self.times and now - self.times[0] > self.window_s:
            self.times.popleft()
            self.values.popleft()
        if not self.values:
            return None
        vals = sorted(self.values)
        k = 0.9 * (len(vals) - 1)  # linear interpolation, as numpy.percentile
        lo = int(k)
        hi = min(lo + 1, len(vals) - 1)
        return vals[lo] + (vals[hi] - vals[lo]) * (k - lo)


class Cluster:
    def __init__(self, trace: Trace, costs: CostModel, mode: Mode, *, vision: int, llm: int, dt: float = 0.5) -> None:
        self.trace, self.c, self.mode, self.dt = trace, costs, mode, dt
        self.now = 0.0
        self.outcomes = [Outcome(r) for r in trace.requests]
        self._next = 0  # next arrival
        self.vision: list[VisionReplica] = []
        self.llm: list[LLMReplica] = []
        self.ingress_wait: deque = deque()  # image requests waiting for a vision replica slot
        self.queue: deque = deque()  # (outcome, enqueued_at)
        self.producers: deque = deque()  # (outcome, waiting since): queue full
        self.gpu_s = {"vision": 0.0, "llm": 0.0}
        self.actions = {"vision": 0, "llm": 0}
        self.targets = {"vision": 0, "llm": 0}
        self.encode_lat = RecentValues()
        self.ttft = {"image": RecentValues(), "text": RecentValues()}
        self.itl = RecentValues()
        self.encode_work = deque()  # (t, pixels, busy seconds) of finished encodes, for the measured rate
        self._seq = 0
        self.completed = 0  # requests the LLM pool finished (the tensor queue's `completed` counter)
        self.vision_admitted_pixels = 0  # pixels the ingress sent to the vision stage (its counter)
        self.timeline: list[dict] = []
        self.set_target("vision", vision if mode == "disaggregated" else 0, initial=True)
        self.set_target("llm", llm, initial=True)

    # ---- scaling -----------------------------------------------------------------------------------
    def set_target(self, pool: str, n: int, initial: bool = False) -> None:
        """Ask for `n` replicas: new ones start after their start-up time (at once when `initial`); extra
        ones are cancelled if still starting, else drain (the least loaded first)."""
        n = max(0, int(n))
        if n != self.targets[pool] and not initial:
            self.actions[pool] += 1
        self.targets[pool] = n
        reps = self.vision if pool == "vision" else self.llm
        live = [r for r in reps if not r.draining]
        start = 0.0 if initial else (self.c.vision_start_s if pool == "vision" else self.c.llm_start_s)
        for _ in range(n - len(live)):
            rep = (VisionReplica if pool == "vision" else LLMReplica)(ready_at=self.now + start, asked_at=self.now)
            reps.append(rep)
        extra = len(live) - n
        if extra > 0:
            starting = [r for r in live if not r.ready(self.now)]
            for r in sorted(starting, key=lambda r: -r.asked_at)[:extra]:
                reps.remove(r)  # never started: nothing to drain
                extra -= 1
            ready = [r for r in live if r.ready(self.now) and r in reps]
            load = (lambda r: sum(x[1] for x in r.fifo)) if pool == "vision" else (lambda r: r.load())
            for r in sorted(ready, key=load)[:extra]:
                r.draining = True

    def running_replicas(self, pool: str) -> int:
        reps = self.vision if pool == "vision" else self.llm
        return sum(1 for r in reps if r.ready(self.now) and not r.draining)

    def replicas_asked(self, pool: str) -> int:
        reps = self.vision if pool == "vision" else self.llm
        return sum(1 for r in reps if not r.draining)

    # ---- one tick ----------------------------------------------------------------------------------
    def step(self) -> None:
        t0, t1 = self.now, self.now + self.dt
        reqs = self.trace.requests
        while self._next < len(reqs) and reqs[self._next].t < t1:
            o = self.outcomes[self._next]
            self._next += 1
            if self.mode == "disaggregated":
                o.overhead_s = self.c.path_overhead_s(o.req.pixels)
                if o.req.has_images:
                    self.ingress_wait.append(o)
                    self.vision_admitted_pixels += o.req.pixels
                else:
                    self._enqueue(o, o.req.t)
            else:
                self._enqueue(o, o.req.t)
        if self.mode == "disaggregated":
            self._vision_tick(t0)
        self._producers_tick(t1)
        self._llm_tick(t0)
        for pool, reps in (("vision", self.vision), ("llm", self.llm)):
            gpus = self.c.vision_gpus_per_replica if pool == "vision" else self.c.llm_gpus_per_replica
            self.gpu_s[pool] += len(reps) * gpus * self.dt
        self.vision = [r for r in self.vision if not (r.draining and not r.fifo)]
        self.llm = [r for r in self.llm if not (r.draining and not r.running and not r.waiting)]
        self.now = t1

    def _enqueue(self, o: Outcome, at: float) -> None:
        if len(self.queue) < self.c.queue_max_items and not self.producers:
            self.queue.append((o, at))
        else:
            self.producers.append((o, at))

    def _producers_tick(self, t1: float) -> None:
        while self.producers and len(self.queue) < self.c.queue_max_items:
            o, since = self.producers.popleft()
            if t1 - since > self.c.enqueue_timeout_s:
                o.rejected = True
                continue
            self.queue.append((o, max(since, self.now)))
        while self.producers and t1 - self.producers[0][1] > self.c.enqueue_timeout_s:
            o, _ = self.producers.popleft()  # waited out its enqueue timeout: 429 (FIFO: the oldest first)
            o.rejected = True

    def _vision_tick(self, t0: float) -> None:
        ready = [r for r in self.vision if r.ready(t0) and not r.draining]
        while self.ingress_wait and ready:
            r = min(ready, key=lambda r: len(r.fifo))
            if len(r.fifo) >= self.c.vision_max_ongoing:
                break
            o = self.ingress_wait.popleft()
            r.fifo.append([o, self.c.encode_seconds(o.req.image_pixels)])
        for r in self.vision:
            if not r.ready(t0):
                continue
            budget = self.dt
            start = max(t0, r.ready_at)
            used = 0.0
            while r.fifo and used < budget:
                item = r.fifo[0]
                o, remaining = item
                begin = max(start + used, o.req.t)
                if begin >= t0 + self.dt:
                    break
                take = min(remaining, t0 + self.dt - begin)
                item[1] -= take
                used = begin - start + take
                if item[1] <= 1e-12:
                    r.fifo.popleft()
                    o.encoded_at = begin + take
                    self.encode_lat.add(o.encoded_at, o.encoded_at - o.req.t)
                    self.encode_work.append((o.encoded_at, o.req.pixels, self.c.encode_seconds(o.req.image_pixels)))
                    self._enqueue(o, o.encoded_at)

    def _llm_tick(self, t0: float) -> None:
        c = self.c
        for r in self.llm:
            if not r.ready(t0):
                continue
            if not r.draining:
                while self.queue and r.load() < c.max_running:
                    o, _ = self.queue[0]
                    need = o.req.prefill_tokens + o.req.output_tokens
                    if r.kv_reserved + need > c.kv_tokens and r.load():
                        break
                    _, o.queued_at = self.queue.popleft()
                    r.kv_reserved += need
                    r.waiting.append(o)
            cap = self.dt * (c.prefill_share_of_step if r.running else 1.0)
            used = 0.0
            while r.waiting and used < cap:
                o = r.waiting.popleft()
                cost = c.prefill_s(o.req.prefill_tokens)
                if self.mode == "colocated" and o.req.has_images:
                    cost += c.encode_seconds(o.req.image_pixels) / c.colocated_vision_gpu_equiv
                    o.encoded_at = t0 + used + cost
                used += cost
                o.first_token_at = max(t0 + used, o.queued_at + cost)
                mod = "image" if o.req.has_images else "text"
                self.ttft[mod].add(o.first_token_at, o.ttft)
                self._seq += 1
                heapq.heappush(r.running, (r.clock + o.req.output_tokens - 1, self._seq, o))
            rest = self.dt - used
            if rest <= 0 or not r.running:
                continue
            step = c.decode_step_s(len(r.running))
            tokens = rest / step
            before = r.clock
            r.clock += tokens
            while r.running and r.running[0][0] <= r.clock + 1e-9:
                target, _, o = heapq.heappop(r.running)
                o.finished_at = max(t0 + used + max(target - before, 0.0) * step, o.first_token_at)
                self.completed += 1
                r.kv_reserved -= o.req.prefill_tokens + o.req.output_tokens
                if o.itl is not None and o.req.output_tokens > 1:
                    self.itl.add(o.finished_at, o.itl)

    # ---- what the pools report ---------------------------------------------------------------------
    def vision_pending(self) -> tuple[int, int, int]:
        reqs = list(self.ingress_wait) + [x[0] for r in self.vision for x in r.fifo]
        return len(reqs), sum(len(o.req.image_pixels) for o in reqs), sum(o.req.pixels for o in reqs)

    def encode_rate(self, window_s: float = 60.0) -> float | None:
        """Pixels per busy second of one replica over recent encodes (what a replica measures)."""
        while self.encode_work and self.now - self.encode_work[0][0] > window_s:
            self.encode_work.popleft()
        if not self.encode_work:
            return None
        px = sum(w[1] for w in self.encode_work)
        busy = sum(w[2] for w in self.encode_work)
        return px / busy if busy else None

    def record(self) -> None:
        pend, _, px = self.vision_pending() if self.mode == "disaggregated" else (0, 0, 0)
        self.timeline.append({
            "t": round(self.now, 2),
            "vision_target": self.targets["vision"], "vision_running": self.running_replicas("vision"),
            "llm_target": self.targets["llm"], "llm_running": self.running_replicas("llm"),
            "queue_depth": len(self.queue) + len(self.producers), "vision_backlog": pend,
            "llm_running_requests": sum(len(r.running) for r in self.llm),
        })

    def done(self) -> bool:
        return self._next >= len(self.trace.requests) and not self.ingress_wait and not self.queue \
            and not self.producers and all(not r.fifo for r in self.vision) \
            and all(not r.running and not r.waiting for r in self.llm)
