"""The per-pool autoscaling policy: metrics snapshot + spec + state + now -> desired replicas per pool.

One pure function, `decide`, used unchanged by the live system (Ray Serve calls it through
`serve_policy.DotsVLMAutoscalingPolicy`, the application-level autoscaling hook) and by the simulator
in `bench/autoscale_sim.py`. No torch, no ray: the operator and the simulator import it.

Each pool first computes a *raw* recommendation from its own signals, then the recommendation is
stabilised the way Kubernetes' HPA does it: a scale-up happens only when every recommendation of the
last `upscale_delay_s` asked for more (the minimum over the window), a scale-down only when every
recommendation of the last `downscale_delay_s` asked for less (the maximum over the window). Flapping
input therefore moves nothing. Steps are limited (`max_scale_up_step` over the replicas that are
actually running, so replicas that cannot be placed do not make the policy ask for ever more;
`max_scale_down_step` per `scale_down_interval_s`).

Vision pool: encode backlog (pixels waiting, against the measured encode rate, must drain within a
share of the image-TTFT target), encode latency against that share, image requests in the stage per
replica; to zero after `idle_to_zero_s` without image work when `min_replicas` is 0, and back to one at
once when image work arrives. LLM pool: demand (running + waiting + tensor-queue depth + producers
waiting for room) per replica, the queue's oldest item age, KV-cache use, TTFT per modality and
inter-token latency against the SLO; and the coupling: image requests in the vision stage now will be
in the queue in seconds, so they count as LLM demand already (`vision_lead_weight`).

Missing or stale signals hold the pool at its current size, and the decision says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from ..serve_config import LLMAutoscaling, SLOConfig, VisionAutoscaling
from .signals import P90_WINDOW_S

Pool = Literal["vision", "llm"]
POOLS: tuple[Pool, ...] = ("vision", "llm")

# Reasons (CamelCase, bounded set: they become a metric label and an Event reason).
VISION_BACKLOG = "VisionBacklog"
ENCODE_LATENCY = "EncodeLatency"
VISION_REQUESTS = "VisionRequests"
WAKE_UP = "WakeUp"
IDLE_TO_ZERO = "IdleToZero"
LLM_DEMAND = "LLMDemand"
DEMAND_TREND = "DemandTrend"
VISION_LEAD = "VisionLeadingSignal"
QUEUE_AGE = "QueueAge"
KV_CACHE = "KVCache"
TTFT_IMAGE = "ImageTTFTMiss"
TTFT_TEXT = "TextTTFTMiss"
ITL = "InterTokenLatencyMiss"
LOW_LOAD = "LowLoad"
STABLE = "Stable"
STABILIZING = "Stabilizing"
METRICS_MISSING = "MetricsMissing"
METRICS_STALE = "MetricsStale"
# The (direction, reason) pairs a pool's scaling actions carry (a step down is always LowLoad or IdleToZero).
ACTIONS: dict[Pool, tuple[tuple[str, str], ...]] = {
    "vision": tuple(("up", r) for r in (WAKE_UP, VISION_REQUESTS, VISION_BACKLOG, ENCODE_LATENCY))
    + (("down", LOW_LOAD), ("down", IDLE_TO_ZERO)),
    "llm": tuple(("up", r) for r in (LLM_DEMAND, DEMAND_TREND, VISION_LEAD, QUEUE_AGE, KV_CACHE, TTFT_IMAGE, TTFT_TEXT,
                                     ITL)) + (("down", LOW_LOAD),),
}
REASONS = (VISION_BACKLOG, ENCODE_LATENCY, VISION_REQUESTS, WAKE_UP, IDLE_TO_ZERO, LLM_DEMAND, DEMAND_TREND, VISION_LEAD,
           QUEUE_AGE, KV_CACHE, TTFT_IMAGE, TTFT_TEXT, ITL, LOW_LOAD, STABLE, STABILIZING, METRICS_MISSING,
           METRICS_STALE)


@dataclass(frozen=True)
class VisionSignals:
    """What the vision stage looks like now. Counts are sums over replicas (ingress-side backlog counts
    each request once, whichever vision replica holds it, and also while no vision replica exists)."""

    running_replicas: int
    pending_requests: float  # image requests sent to the vision stage and not yet answered
    pending_images: float
    pending_pixels: float
    encode_pixels_per_s: float | None = None  # busy throughput of one replica (None: not measured yet)
    encode_latency_s: float | None = None  # recent p90 of encode time as the ingress sees it (queueing included)
    age_s: float = 0.0  # how old the newest sample is
    # pixels the ingresses have sent to the vision stage (cumulative; None: not reported): the arrival rate
    admitted_pixels_total: float | None = None


@dataclass(frozen=True)
class LLMSignals:
    running_replicas: int
    queue_depth: float
    queue_oldest_age_s: float
    waiting_producers: float  # requests waiting for room in a full queue
    running: float  # requests decoding, all replicas
    waiting: float  # requests taken by a replica and not yet prefilled
    kv_used_fraction: float  # KV-cache tokens reserved / capacity, mean over replicas
    ttft_image_s: float | None = None  # recent p90 time to first token, requests with images
    ttft_text_s: float | None = None
    inter_token_s: float | None = None  # recent p90 inter-token latency
    age_s: float = 0.0  # the queue's and LLM replicas' newest sample
    # the ingress's newest sample (the latency figures above come from it); stale, they are left out
    latency_age_s: float = 0.0
    completed_total: float | None = None  # requests the pool has finished (the queue's counter; None: not reported)


@dataclass(frozen=True)
class Snapshot:
    vision: VisionSignals | None
    llm: LLMSignals | None


@dataclass(frozen=True)
class PolicySpec:
    """The bounds, targets and knobs of both pools: a slice of the Serve config, rendered from the spec."""

    slo: SLOConfig
    vision: VisionAutoscaling
    llm: LLMAutoscaling


@dataclass
class PoolState:
    """What a pool's decision remembers between calls (JSON-friendly: Serve keeps it in its controller)."""

    target: int | None = None  # last decided replica count (None: not decided yet; take the running count)
    # Raw recommendations inside the windows, one bucket per second: (second, lowest, highest). Serve calls
    # the policy several times a second; buckets keep the state small.
    recommendations: list[tuple[float, int, int]] = field(default_factory=list)
    last_scale_down_at: float | None = None
    last_scale_up_at: float | None = None
    last_work_at: float | None = None  # vision: last time image work was seen (idle-to-zero)
    learned_rate: float | None = None  # vision: pixels/s of one replica, kept while the pool is at zero
    last_reason: str = STABLE
    last_message: str = ""
    last_change_at: float | None = None
    observed_since: float | None = None  # first decision on signals: windows count from here
    demand: list[tuple[float, float]] = field(default_factory=list)  # LLM: (second, demand) for the trend
    flow: list[tuple[float, float, float]] = field(default_factory=list)  # LLM: (second, completed, demand)
    running_seen: int | None = None  # running replicas at the last decision
    # when replicas last joined (LLM: the flow is measured from here; vision: the encode p90 from here)
    running_rose_at: float | None = None
    drained_at: float | None = None  # LLM: last time the queue was seen draining by itself
    arrivals: list[tuple[float, float]] = field(default_factory=list)  # vision: (second, pixels admitted so far)
    # vision: the ingresses' admitted-pixels counter at the last decision (its growth is image work, also work
    # that came and went between two stats samples)
    admitted_seen: float | None = None
    clock: float | None = None  # `now` of the last decision: a clock that stepped back is found by it

    def to_json(self) -> dict:
        return {"target": self.target, "recommendations": [list(r) for r in self.recommendations],
                "last_scale_down_at": self.last_scale_down_at, "last_scale_up_at": self.last_scale_up_at,
                "last_work_at": self.last_work_at, "learned_rate": self.learned_rate,
                "last_reason": self.last_reason, "last_message": self.last_message,
                "last_change_at": self.last_change_at, "observed_since": self.observed_since,
                "demand": [list(d) for d in self.demand], "flow": [list(f) for f in self.flow],
                "running_seen": self.running_seen, "running_rose_at": self.running_rose_at,
                "drained_at": self.drained_at, "arrivals": [list(a) for a in self.arrivals],
                "admitted_seen": self.admitted_seen, "clock": self.clock}

    @classmethod
    def from_json(cls, raw: dict | None) -> "PoolState":
        if not raw:
            return cls()
        return cls(target=raw.get("target"), recommendations=[(float(t), int(lo), int(hi)) for t, lo, hi in raw.get("recommendations", [])],
                   last_scale_down_at=raw.get("last_scale_down_at"), last_scale_up_at=raw.get("last_scale_up_at"),
                   last_work_at=raw.get("last_work_at"), learned_rate=raw.get("learned_rate"),
                   last_reason=raw.get("last_reason", STABLE), last_message=raw.get("last_message", ""),
                   last_change_at=raw.get("last_change_at"), observed_since=raw.get("observed_since"),
                   demand=[(float(t), float(d)) for t, d in raw.get("demand", [])],
                   flow=[(float(t), float(c), float(d)) for t, c, d in raw.get("flow", [])],
                   running_seen=raw.get("running_seen"), running_rose_at=raw.get("running_rose_at"),
                   drained_at=raw.get("drained_at"),
                   arrivals=[(float(t), float(p)) for t, p in raw.get("arrivals", [])],
                   admitted_seen=raw.get("admitted_seen"), clock=raw.get("clock"))


@dataclass
class PolicyState:
    vision: PoolState = field(default_factory=PoolState)
    llm: PoolState = field(default_factory=PoolState)

    def pool(self, pool: Pool) -> PoolState:
        return self.vision if pool == "vision" else self.llm


@dataclass(frozen=True)
class Decision:
    pool: Pool
    desired: int  # replicas the pool should have now
    raw: int  # what the signals alone asked for (before windows and steps)
    current: int  # the target before this decision
    reason: str  # one of REASONS: the signal that set `raw` (or why the pool holds)
    message: str  # for a person: the numbers behind the decision
    signal: str = ""  # the signal that set `raw` even when `reason` says the pool holds (Stable, Stabilizing)

    @property
    def direction(self) -> Literal["up", "down", "hold"]:
        return "up" if self.desired > self.current else "down" if self.desired < self.current else "hold"


@dataclass(frozen=True)
class _Recommendation:
    replicas: int
    reason: str
    message: str


def _ceil(x: float) -> int:
    # 2.0000001 replicas is 2: float noise must not add a GPU node.
    return math.ceil(round(x, 6))


def _strongest(candidates: list[_Recommendation]) -> _Recommendation:
    return max(candidates, key=lambda c: c.replicas)  # first of equals wins: candidates are in priority order


def _add_counter_sample(hist: list, sample: tuple, window_s: float, since: float = -math.inf) -> list:
    """A cumulative counter's history, one sample per second (`sample` = (second, total, ...)): the samples of
    the last `window_s` seconds taken at or after `since`, then `sample`. It starts over when the counter went
    back (the replica that counted left, or a new one counts from zero)."""
    second = sample[0]
    kept = [h for h in hist if second - h[0] <= window_s and h[0] != second and h[0] >= since]
    if kept and sample[1] < kept[-1][1]:
        kept = []
    kept.append(sample)
    return kept


ARRIVAL_WINDOW_S = 30.0
ARRIVAL_MIN_S = 10.0


def measure_arrivals(state: PoolState, admitted_total: float | None, now: float) -> float | None:
    """Pixels per second sent to the vision stage over the last ARRIVAL_WINDOW_S, from the ingresses'
    cumulative counter (one sample per second). None until ARRIVAL_MIN_S have been seen, and again after the
    counter went back (an ingress replica left and took its count with it)."""
    if admitted_total is None:
        state.arrivals = []
        return None
    second = math.floor(now)
    state.arrivals = hist = _add_counter_sample(state.arrivals, (second, admitted_total), ARRIVAL_WINDOW_S)
    span = second - hist[0][0]
    if span < ARRIVAL_MIN_S:
        return None
    # The last ARRIVAL_MIN_S too: a burst that ramps up shows there first (the whole window lags it); the pool
    # shrinks only once both have been low for its down window.
    recent = [a for a in hist if second - a[0] <= ARRIVAL_MIN_S]
    recent_rate = (admitted_total - recent[0][1]) / (second - recent[0][0]) if second > recent[0][0] else 0.0
    return max((admitted_total - hist[0][1]) / span, recent_rate)


def _note_running(state: PoolState, running: int, now: float) -> float:
    """Seconds since replicas last joined the pool (inf: none joined while the policy watched)."""
    if state.running_seen is not None and running > state.running_seen:
        state.running_rose_at = now
    state.running_seen = running
    return now - state.running_rose_at if state.running_rose_at is not None else math.inf


def recommend_vision(s: VisionSignals, cfg: VisionAutoscaling, slo: SLOConfig, state: PoolState,
                     now: float, target: int | None = None) -> _Recommendation:
    """Raw replica count for the vision pool from its own signals.

    Once a replica has measured its encode rate, the pool is sized for the work: the pixels arriving per
    second (at `encode_utilization` of that rate), plus the backlog drained within the encode budget. A count of requests in
    the stage (Serve's own rule) is only the first guess: it scaled on every momentary queue a single
    replica could absorb, and flapped (bench/results/autoscale_sim.md, shifting mix: 32 vision actions
    where one fixed replica met the SLO)."""
    busy = s.pending_requests > 0 or s.pending_images > 0
    # Work waiting at a stats sample, or images admitted since the last one: the ingress records its stats every
    # ~2 s and a warm replica encodes a small image in a fraction of that, so most images are never seen
    # waiting; the admitted counter counts each one.
    admitted = s.admitted_pixels_total
    if busy or (admitted is not None and state.admitted_seen is not None and admitted > state.admitted_seen):
        state.last_work_at = now
    state.admitted_seen = admitted
    if s.encode_pixels_per_s:
        state.learned_rate = s.encode_pixels_per_s
    arriving = measure_arrivals(state, s.admitted_pixels_total, now)
    joined_s = _note_running(state, s.running_replicas, now)
    budget_s = cfg.encode_budget_s(slo)
    current = max(s.running_replicas, 0)
    rate = s.encode_pixels_per_s or state.learned_rate
    # Arrivals keep a busy pool's size between bursts of queueing; with no work and no arrivals it may shrink.
    if not busy and not (rate and arriving):
        # The idle timer is the scale-to-zero's window (it is exempt from the down window): with no work seen
        # yet it counts from when the policy started watching fresh signals, so that a restart is no idle time.
        idle_since = state.last_work_at if state.last_work_at is not None else state.observed_since
        idle_for = now - idle_since if idle_since is not None else 0.0
        if cfg.min_replicas == 0 and idle_for >= cfg.idle_to_zero_s:
            since = (f"for {idle_for:.0f} s" if state.last_work_at is not None
                     else f"in the {idle_for:.0f} s since the autoscaler started watching")
            return _Recommendation(0, IDLE_TO_ZERO, f"no image work {since} "
                                   f"(idleToZeroSeconds {cfg.idle_to_zero_s:g}): scale to zero")
        # Below the idle window a pool allowed to reach zero keeps one warm replica: the one it has (`target`),
        # also while that one is not running (starting, restarting, waiting for a GPU); a pool at zero stays there.
        size = current if target is None else max(target, current)
        return _Recommendation(max(cfg.min_replicas, min(size, 1)), LOW_LOAD, "no image work waiting")
    candidates = []
    # Work waiting always keeps one replica. From zero that is the story (WakeUp); with replicas running, a
    # sizing from the measured signals that also asks for one says more, so it wins the tie.
    wake = _Recommendation(1, WAKE_UP, f"{s.pending_requests:.0f} image request(s) waiting and "
                                       f"{current} vision replica(s) running")
    if busy and current == 0:
        candidates.append(wake)
    if rate:
        backlog_s = s.pending_pixels / rate
        arriving_s = (arriving or 0.0) / (rate * cfg.encode_utilization)  # replicas for the new work
        candidates.append(_Recommendation(
            _ceil(arriving_s + backlog_s / budget_s), VISION_BACKLOG,
            f"{(arriving or 0.0) / 1e6:.1f} MP/s of images arriving (each replica taking at most "
            f"{cfg.encode_utilization:g} of its {rate / 1e6:.2f} MP/s) and an encode backlog of "
            f"{s.pending_pixels / 1e6:.1f} MP to clear within {budget_s:.1f} s ({cfg.encode_budget_fraction:g} of "
            f"the {slo.image_ttft_s:g} s image TTFT target)"))
    else:
        candidates.append(_Recommendation(
            _ceil(s.pending_requests / cfg.target_ongoing_requests), VISION_REQUESTS,
            f"{s.pending_requests:.0f} image requests in the vision stage, target {cfg.target_ongoing_requests:g} "
            f"per replica (no encode rate measured yet)"))
    if busy and current > 0:
        candidates.append(wake)
    # The p90 covers the last P90_WINDOW_S: until that long after replicas joined, it still shows the queue
    # they were asked for, and each reading would multiply the pool again.
    if s.encode_latency_s is not None and current and s.encode_latency_s > budget_s and joined_s >= P90_WINDOW_S:
        ratio = min(s.encode_latency_s / budget_s, 2.0)
        candidates.append(_Recommendation(
            _ceil(current * ratio), ENCODE_LATENCY,
            f"encode latency p90 {s.encode_latency_s:.2f} s is over its budget {budget_s:.2f} s "
            f"({cfg.encode_budget_fraction:g} of the image TTFT target)"))
    return _strongest(candidates)


TREND_MIN_WINDOW_S = 60.0
TREND_MAX_WINDOW_S = 600.0


def _slope(hist: list[tuple[float, float]]) -> float:
    """Least-squares slope of (second, demand) points."""
    n = len(hist)
    mt = sum(t for t, _ in hist) / n
    md = sum(d for _, d in hist) / n
    var = sum((t - mt) ** 2 for t, _ in hist)
    return sum((t - mt) * (d - md) for t, d in hist) / var if var else 0.0


def demand_slope(state: PoolState, demand: float, now: float, lead_s: float) -> tuple[float, float]:
    """Requests per second by which demand has grown over the recent window (least squares over one sample
    per second; the window is the replica start-up time, 60-600 s), and the least it grew by from one
    quarter of the window to the next (mean against mean, per second). A ramp grows from every quarter to
    the next; a step, however steep, leaves a quarter to quarter change near zero once it is older than a
    quarter window or before it. (0, 0) until half the window is seen."""
    window = min(max(lead_s, TREND_MIN_WINDOW_S), TREND_MAX_WINDOW_S)
    second = math.floor(now)
    hist = [(t, d) for t, d in state.demand if second - t <= window and t != second] + [(second, demand)]
    state.demand = hist
    if hist[-1][0] - hist[0][0] < window / 2 or len(hist) < 10:
        return 0.0, 0.0
    t0, quarter = hist[0][0], (hist[-1][0] - hist[0][0]) / 4
    parts = [[d for t, d in hist if k * quarter <= t - t0 <= (k + 1) * quarter] for k in range(4)]
    means = [sum(part) / len(part) for part in parts if part]
    least = min((b - a for a, b in zip(means, means[1:])), default=0.0)
    return _slope(hist), least / quarter


FLOW_WINDOW_S = 30.0
FLOW_MIN_S = 10.0


@dataclass(frozen=True)
class Flow:
    """How work moves through the LLM pool over the last FLOW_WINDOW_S."""

    completion_rate: float  # requests per second the pool finishes
    growth: float  # requests per second by which the work in the system (running, waiting, queued) grows

    @property
    def arrival_rate(self) -> float:
        return max(self.completion_rate + self.growth, 0.0)


def measure_flow(state: PoolState, completed: float, demand: float, now: float) -> Flow | None:
    """The pool's completion rate (from the queue's cumulative counter) and the growth of its work
    (least-squares slope, one sample per second), since replicas last joined: a window that predates them
    says nothing of how fast the pool drains now. None until FLOW_MIN_S have been seen, and again after the
    counter went back (a new queue replica counts from zero)."""
    second = math.floor(now)
    since = state.running_rose_at if state.running_rose_at is not None else -math.inf
    state.flow = hist = _add_counter_sample(state.flow, (second, completed, demand), FLOW_WINDOW_S, since)
    span = second - hist[0][0]
    if span < FLOW_MIN_S or len(hist) < 5:
        return None
    return Flow(completion_rate=(completed - hist[0][1]) / span, growth=_slope([(t, d) for t, _, d in hist]))


@dataclass(frozen=True)
class _Drain:
    """A backlog the running replicas empty before a replica asked for now could serve."""

    backlog: float
    empty_in_s: float
    flow: Flow
    in_service_s: float  # how long a request spends in service now (Little's law: in service / completion rate)

    @property
    def sustained(self) -> float:
        """Requests in service at the arrival rate (Little's law: arrival rate x time in service)."""
        return self.flow.arrival_rate * self.in_service_s


def draining_backlog(backlog: float, in_service: float, flow: Flow | None, startup_s: float) -> _Drain | None:
    """Queued requests count as demand only while the queue is not about to empty by itself.

    A backlog that built up while replicas were starting (an image burst meets a pool that needs minutes to
    grow) is still there when they arrive; counted one request per slot, it bought replicas that came up
    after the grown pool had emptied the queue (bench/results/autoscale_sim.md, image_burst: LLM 6 -> 10,
    the last four after the burst). While the work in the system falls fast enough that the queue empties
    within replicaStartupSeconds, the pool is sized for what keeps arriving instead. `backlog`: queued and
    waiting for room; `in_service`: running and waiting (taken by a replica)."""
    if flow is None or backlog <= 0 or flow.growth >= 0 or flow.completion_rate <= 0 or startup_s <= 0:
        return None
    empty_in = backlog / -flow.growth
    if empty_in >= startup_s:
        return None
    return _Drain(backlog=backlog, empty_in_s=empty_in, flow=flow, in_service_s=in_service / flow.completion_rate)


def recommend_llm(s: LLMSignals, v: VisionSignals | None, cfg: LLMAutoscaling, slo: SLOConfig,
                  state: PoolState, now: float = 0.0, target: int | None = None) -> _Recommendation:
    """Raw replica count for the LLM pool, including the vision pool's backlog as a leading signal."""
    current = max(s.running_replicas, 0)
    in_service, backlog = s.running + s.waiting, s.queue_depth + s.waiting_producers
    demand = in_service + backlog
    lead = (v.pending_requests * cfg.vision_lead_weight) if v is not None else 0.0
    per = cfg.target_ongoing_requests
    joined_s = _note_running(state, current, now)
    flow = measure_flow(state, s.completed_total, demand, now) if s.completed_total is not None else None
    trend = demand_slope(state, demand, now, cfg.replica_startup_s) if cfg.replica_startup_s > 0 else None
    if flow is None and s.completed_total is not None and backlog > 0 and joined_s < FLOW_MIN_S and target:
        # Replicas that joined a moment ago have not touched the backlog yet: asking for more on it now buys
        # replicas for work that they are about to take (HPA's readiness delay has the same reason).
        return _Recommendation(max(target, current), LLM_DEMAND, (
            f"replicas joined {joined_s:.0f} s ago with {backlog:.0f} requests queued: measuring how fast the pool "
            f"empties the queue with them ({FLOW_MIN_S:g} s) before asking for more"))
    drain = draining_backlog(backlog, in_service, flow, cfg.replica_startup_s)
    if drain is not None:
        state.drained_at = now
        sized = drain.sustained
        described = (f"the tensor queue drains by itself ({drain.backlog:.0f} queued, falling by "
                     f"{-drain.flow.growth:.1f}/s: empty in {drain.empty_in_s:.0f} s, before a replica asked for now "
                     f"would serve, replicaStartupSeconds {cfg.replica_startup_s:g}); sized for what keeps arriving: "
                     f"{drain.flow.arrival_rate:.1f} requests/s x {drain.in_service_s:.1f} s "
                     f"in service = {sized:.0f} requests; target {per:g} per replica")
    else:
        sized = demand
        described = f"{demand:.0f} requests running, waiting or queued; target {per:g} per replica"
    base = _ceil(sized / per)
    candidates = [_Recommendation(base, LLM_DEMAND if demand else LOW_LOAD, described if demand else "no LLM work")]
    if trend is not None:
        slope, least = trend
        # Noise on a steady load has a small slope too: a trend counts once it adds half a replica's worth,
        # and only while demand grew from every quarter of the window to the next by at least half the
        # window's slope. A step (a burst that arrives within a minute, then holds) keeps the window's slope
        # steep for a whole start-up time after it stopped growing; extrapolating it bought replicas that
        # arrived after the demand rule had met the step (bench/results/autoscale_frontier.md).
        if slope * cfg.replica_startup_s >= per / 2 and least >= slope / 2:
            ahead = demand + slope * cfg.replica_startup_s
            candidates.append(_Recommendation(
                _ceil(ahead / per), DEMAND_TREND,
                f"demand {demand:.0f} is growing by {slope * 60:.1f} requests a minute: {ahead:.0f} expected in "
                f"{cfg.replica_startup_s:g} s (replicaStartupSeconds), target {per:g} per replica"))
    if lead > 0:
        candidates.append(_Recommendation(
            _ceil((sized + lead) / per), VISION_LEAD,
            f"{v.pending_requests:.0f} image requests being encoded now will reach the tensor queue in seconds: "
            f"{sized:.0f} + {lead:.0f} requests, target {per:g} per replica"))
    # The waits of requests in a draining backlog (queue age, TTFT) are the past, and KV use and inter-token
    # latency peak while replicas run full on it: a replica asked for now comes up after the backlog is gone
    # and helps none of them.
    if current and drain is None:
        age_target = slo.text_ttft_s * cfg.queue_age_fraction
        if s.queue_depth > 0 and s.queue_oldest_age_s > age_target:
            candidates.append(_Recommendation(
                current + 1, QUEUE_AGE, f"oldest tensor-queue item waited {s.queue_oldest_age_s:.1f} s, over "
                f"{age_target:.1f} s ({cfg.queue_age_fraction:g} of the text TTFT target)"))
        if s.kv_used_fraction > cfg.kv_cache_target:
            candidates.append(_Recommendation(
                _ceil(current * s.kv_used_fraction / cfg.kv_cache_target), KV_CACHE,
                f"KV cache {s.kv_used_fraction:.0%} reserved by admitted requests, target {cfg.kv_cache_target:.0%}"))
        # The p90s cover the last P90_WINDOW_S: just after a backlog drained, they are its waits still.
        latencies = [] if state.drained_at is not None and now - state.drained_at < P90_WINDOW_S else [
            (s.ttft_image_s, slo.image_ttft_s, TTFT_IMAGE, "image TTFT"), (s.ttft_text_s, slo.text_ttft_s, TTFT_TEXT, "text TTFT"),
            (s.inter_token_s, slo.inter_token_s, ITL, "inter-token latency")]
        for value, target, reason, what in latencies:
            if value is not None and value > target and demand > 0:
                candidates.append(_Recommendation(
                    _ceil(current * min(value / target, 2.0)), reason,
                    f"{what} p90 {value:.2f} s is over its target {target:g} s"))
    return _strongest(candidates)


def _stabilise(pool: Pool, raw: _Recommendation, current: int, running: int, lo: int, hi: int,
               cfg: VisionAutoscaling | LLMAutoscaling, state: PoolState, now: float) -> Decision:
    raw_n = max(lo, min(hi, raw.replicas))
    window = max(cfg.upscale_delay_s, cfg.downscale_delay_s)
    second = math.floor(now)
    recs = [r for r in state.recommendations if now - r[0] <= window + 1]
    if recs and recs[-1][0] == second:
        _, lo_, hi_ = recs[-1]
        recs[-1] = (second, min(lo_, raw_n), max(hi_, raw_n))
    else:
        recs.append((second, raw_n, raw_n))
    state.recommendations = recs
    if state.observed_since is None:
        state.observed_since = now
    observed = now - state.observed_since
    up_window = [lo_ for t, lo_, _ in recs if second - t <= cfg.upscale_delay_s]
    down_window = [hi_ for t, _, hi_ in recs if second - t <= cfg.downscale_delay_s]
    desired, reason, message = current, raw.reason, raw.message
    wake_up = current == 0 and raw_n > 0
    # A window counts only once it has been watched in full (after a restart, too); from zero there is
    # no waiting: a request is already waiting for the replica.
    up_to = raw_n if wake_up else (min(up_window) if observed >= cfg.upscale_delay_s else current)
    # IdleToZero is asked for only after idleToZeroSeconds without image work: that is its window already
    # (with the down window on top, the pool went to zero idleToZeroSeconds + downscaleDelaySeconds after the
    # last image).
    if raw.reason == IDLE_TO_ZERO:
        down_to = raw_n
    else:
        down_to = max(down_window) if observed >= cfg.downscale_delay_s else current
    if up_to > current:
        # Step from what actually runs: replicas that could not be placed do not earn more replicas.
        desired = max(current, min(up_to, running + cfg.max_scale_up_step, hi))
    elif down_to < current:
        since = now - state.last_scale_down_at if state.last_scale_down_at is not None else math.inf
        starting = running < current and state.last_scale_up_at is not None and \
            now - state.last_scale_up_at < cfg.replica_startup_s
        if since >= cfg.scale_down_interval_s and not starting:
            desired = max(down_to, current - cfg.max_scale_down_step, lo)
            if raw.reason != IDLE_TO_ZERO:
                reason = LOW_LOAD
                message = (f"signals asked for {down_to} or fewer replicas for the last {cfg.downscale_delay_s:g} s "
                           f"(now: {raw.message})")
    if desired == current and raw_n == current:
        reason, message = STABLE, f"{current} replica(s) fit the load ({raw.message})"
    elif desired == current:
        reason, message = STABILIZING, (f"signals ask for {raw_n} replica(s) ({raw.reason}: {raw.message}); "
                                        f"{_why_waiting(raw_n, current, running, cfg, state, now)}")
    if desired > current:
        state.last_scale_up_at = now
    elif desired < current:
        state.last_scale_down_at = now
    if desired != current:
        state.last_change_at = now
        state.last_reason, state.last_message = reason, message
    state.target = desired
    return Decision(pool=pool, desired=desired, raw=raw_n, current=current, reason=reason, message=message,
                    signal=raw.reason)


def _why_waiting(raw_n: int, current: int, running: int, cfg: VisionAutoscaling | LLMAutoscaling,
                 state: PoolState, now: float) -> str:
    if raw_n > current:
        if running < current:
            return f"only {running} of {current} replica(s) run yet: waiting for them before adding more"
        return f"waiting until the signals hold for upscaleDelaySeconds ({cfg.upscale_delay_s:g} s)"
    if running < current and state.last_scale_up_at is not None and now - state.last_scale_up_at < cfg.replica_startup_s:
        return (f"{current - running} replica(s) asked for {now - state.last_scale_up_at:.0f} s ago are still starting "
                f"(replicaStartupSeconds {cfg.replica_startup_s:g}): not cancelling them")
    if state.last_scale_down_at is not None and now - state.last_scale_down_at < cfg.scale_down_interval_s:
        return f"the last scale-down was under scaleDownIntervalSeconds ({cfg.scale_down_interval_s:g} s) ago"
    return f"waiting until the signals hold for downscaleDelaySeconds ({cfg.downscale_delay_s:g} s)"


def _hold(pool: Pool, current: int, reason: str, message: str, state: PoolState) -> Decision:
    state.target = current
    # Nothing was watched while the signals were missing or stale: the windows start again with the next
    # fresh reading (a window counts only once watched in full), not on recommendations from before the gap.
    state.observed_since = None
    state.recommendations = []
    return Decision(pool=pool, desired=current, raw=current, current=current, reason=reason, message=message,
                    signal=reason)


def _note_outside_change(pool: Pool, st: PoolState, cur: int, now: float,
                         cfg: VisionAutoscaling | LLMAutoscaling | None = None) -> None:
    """The target moved without this policy (Serve starting a replica for a request that waits on a pool
    at zero, new bounds, or a redeploy): the status and the Event must still say why the pool changed. With `cfg`
    (the pool's bounds now): a last target outside them that Serve moved to the nearest bound is the bounds' doing
    (a minReplicas raised above a pool at zero is no request waking it)."""
    if cfg is not None and st.target is not None and cur == max(cfg.min_replicas, min(cfg.max_replicas, st.target)):
        _note_new_bounds(pool, st, st.target, cur, cfg, now)
        return
    if st.target == 0 and cur > 0:
        st.last_reason, st.last_message = WAKE_UP, (
            f"a request arrived while the {pool} pool was at zero: Ray Serve started {cur} replica(s) for it at once")
    else:
        st.last_reason, st.last_message = STABLE, f"the target was set to {cur} outside the autoscaler (a redeploy)"
    st.last_change_at = now
    if cur > st.target:  # type: ignore[operator]
        st.last_scale_up_at = now


def _note_new_bounds(pool: Pool, st: PoolState, cur: int, bounded: int, cfg: VisionAutoscaling | LLMAutoscaling,
                     now: float) -> None:
    """Serve's target lies outside the pool's bounds (the user has just changed them): Serve keeps a pool within
    its bounds whatever the policy returns, so the pool's target is the nearest bound now. The decision starts
    from there, so that what is published (desired, current) lies within the bounds published with it, and the
    move is the bounds' doing, not a scaling action of the autoscaler."""
    bound = "maxReplicas" if bounded < cur else "minReplicas"
    st.last_reason, st.last_message = STABLE, (
        f"{bound} of the {pool} pool is now {bounded} (bounds {cfg.min_replicas}..{cfg.max_replicas}): the target "
        f"moves from {cur} to {bounded} replica(s)")
    st.last_change_at = now
    if bounded > cur:
        st.last_scale_up_at = now


def follow_clock(state: PolicyState, now: float, spec: PolicySpec | None = None) -> None:
    """The live policy runs on the wall clock (Serve calls it with time.time()). When that clock steps back
    (NTP, a VM resumed), every time the state holds lies in the future: no window counted as watched, no
    scale-down interval or idle time passed, and the pools froze for as long as the step. The step counts as
    no time passing: every time in the state moves back by as much (the one-per-second samples by whole
    seconds), so the windows and timers go on where they were.

    With `spec`: when no decision was made for longer than a pool's `metrics_stale_s` (the controller stalled,
    or the clock stepped forward), nothing was watched in between, as with stale signals: the windows start
    again (a single reading after the gap shrank the pool at once). Neither the gap nor the time since a decision
    that held the pool on missing or stale signals counts as idle time for scale-to-zero: the idle timer moves
    forward by it, so a vision pool goes to zero only after idleToZeroSeconds of idleness actually watched (the
    first decision after a clock stepped forward by more than idleToZeroSeconds took it to zero at once).
    Nor does the gap count as start-up time of the replicas asked for before it: the replicaStartupSeconds guard
    (a scale-down does not cancel replicas still starting) moves forward by it too (a clock stepped forward by more
    than replicaStartupSeconds ended the guard at once, and the first down window after it cancelled them), and so
    does the scaleDownIntervalSeconds since the last scale-down (the next one came a down window after the step).
    Called by `decide`; idempotent."""
    for pool, st in (("vision", state.vision), ("llm", state.llm)):
        cfg = getattr(spec, pool) if spec is not None else None
        unwatched = st.clock is not None and now > st.clock and (
            st.observed_since is None or (cfg is not None and now - st.clock > cfg.metrics_stale_s))
        if unwatched and st.last_work_at is not None:
            # `observed_since` is None only after a hold (`_hold`) or a gap: the decision before this one watched
            # nothing. Idle time watched before it still counts.
            st.last_work_at += now - st.clock  # type: ignore[operator]
        if st.clock is not None and cfg is not None and now - st.clock > cfg.metrics_stale_s:
            st.observed_since, st.recommendations = None, []
            # Not the hold's time (replicas start meanwhile, and the clock measured it): only the gap's, which the
            # wall clock alone cannot tell from a step forward. A stalled controller keeps its starting replicas up
            # to replicaStartupSeconds longer and waits up to scaleDownIntervalSeconds more for its next scale-down;
            # a step no longer cancels them nor shortens the interval.
            if st.last_scale_up_at is not None:
                st.last_scale_up_at += now - st.clock
            if st.last_scale_down_at is not None:
                st.last_scale_down_at += now - st.clock
        if st.clock is not None and now < st.clock:
            back, back_s = now - st.clock, math.floor(now) - math.floor(st.clock)
            for name in ("last_scale_down_at", "last_scale_up_at", "last_work_at", "last_change_at", "observed_since",
                         "running_rose_at", "drained_at"):
                if getattr(st, name) is not None:
                    setattr(st, name, getattr(st, name) + back)
            st.recommendations = [(t + back_s, lo, hi) for t, lo, hi in st.recommendations]
            st.demand = [(t + back_s, d) for t, d in st.demand]
            st.flow = [(t + back_s, c, d) for t, c, d in st.flow]
            st.arrivals = [(t + back_s, a) for t, a in st.arrivals]
        st.clock = now


def _fresh_latencies(llm: LLMSignals, stale_s: float) -> LLMSignals:
    """The LLM pool's signals without the ingress's latency figures once those are stale: the queue and the LLM
    replicas still say how loaded the pool is (as when no ingress reports at all), so a stalled ingress does not
    freeze the pool under load; only the TTFT and inter-token rules wait for fresh figures."""
    if llm.latency_age_s <= stale_s:
        return llm
    return replace(llm, ttft_image_s=None, ttft_text_s=None, inter_token_s=None)


def decide(snapshot: Snapshot, spec: PolicySpec, state: PolicyState, now: float,
           current: dict[Pool, int] | None = None) -> dict[Pool, Decision]:
    """One decision per pool. `state` is updated in place; `current` is each pool's present target
    (Serve's target replica count; defaults to the state's last decision, then the running count)."""
    out: dict[Pool, Decision] = {}
    v, llm = snapshot.vision, snapshot.llm
    follow_clock(state, now, spec)
    for pool in POOLS:
        cfg = spec.vision if pool == "vision" else spec.llm
        st = state.pool(pool)
        sig = v if pool == "vision" else llm
        cur = (current or {}).get(pool)
        if cur is None:
            cur = st.target if st.target is not None else (sig.running_replicas if sig is not None else cfg.min_replicas)
        if st.target is not None and cur != st.target:
            _note_outside_change(pool, st, cur, now, cfg)
        bounded = max(cfg.min_replicas, min(cfg.max_replicas, cur))
        if bounded != cur:
            _note_new_bounds(pool, st, cur, bounded, cfg, now)
            cur = bounded
        if sig is None:
            out[pool] = _hold(pool, cur, METRICS_MISSING,
                              f"no {pool} metrics reached the autoscaler: holding {cur} replica(s)", st)
            continue
        if sig.age_s > cfg.metrics_stale_s:
            out[pool] = _hold(pool, cur, METRICS_STALE,
                              f"the newest {pool} metrics are {sig.age_s:.0f} s old (over {cfg.metrics_stale_s:g} s): "
                              f"holding {cur} replica(s)", st)
            continue
        if pool == "vision":
            raw = recommend_vision(v, spec.vision, spec.slo, st, now, target=cur)  # type: ignore[arg-type]
        else:
            fresh_v = v if v is not None and v.age_s <= spec.vision.metrics_stale_s else None
            raw = recommend_llm(_fresh_latencies(llm, cfg.metrics_stale_s), fresh_v, spec.llm, spec.slo, st, now,  # type: ignore[arg-type]
                                target=cur)
        out[pool] = _stabilise(pool, raw, cur, sig.running_replicas, cfg.min_replicas, cfg.max_replicas, cfg, st, now)
    return out
