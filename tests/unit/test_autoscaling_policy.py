"""The pure autoscaling policy: each pool on its own signals, coupled, stabilised, bounded."""

from __future__ import annotations

import pytest

from dotsvlm_serving.autoscaling import policy as p
from dotsvlm_serving.serve_config import LLMAutoscaling, SLOConfig, VisionAutoscaling


def spec(vision: dict | None = None, llm: dict | None = None, slo: dict | None = None) -> p.PolicySpec:
    v = {"min_replicas": 1, "max_replicas": 8, "upscale_delay_s": 0, "downscale_delay_s": 60,
         "scale_down_interval_s": 0, "target_ongoing_requests": 4, **(vision or {})}
    m = {"min_replicas": 1, "max_replicas": 8, "upscale_delay_s": 0, "downscale_delay_s": 60,
         "scale_down_interval_s": 0, "target_ongoing_requests": 8, **(llm or {})}
    return p.PolicySpec(slo=SLOConfig(**(slo or {})), vision=VisionAutoscaling(**v), llm=LLMAutoscaling(**m))


def vision(replicas: int = 1, requests: float = 0, pixels: float = 0, rate: float | None = 1e6, **kw) -> p.VisionSignals:
    return p.VisionSignals(running_replicas=replicas, pending_requests=requests, pending_images=requests,
                           pending_pixels=pixels, encode_pixels_per_s=rate, **kw)


def llm(replicas: int = 1, depth: float = 0, running: float = 0, age: float = 0, **kw) -> p.LLMSignals:
    base = dict(running_replicas=replicas, queue_depth=depth, queue_oldest_age_s=age, waiting_producers=0,
                running=running, waiting=0, kv_used_fraction=0.0)
    base.update(kw)
    return p.LLMSignals(**base)


def run(snapshots, sp: p.PolicySpec, *, start: dict | None = None, dt: float = 1.0, state: p.PolicyState | None = None):
    """Feed snapshots one per `dt` seconds; the running replicas follow the decisions at once."""
    state = state or p.PolicyState()
    current = dict(start or {"vision": 1, "llm": 1})
    out = []
    for i, make in enumerate(snapshots):
        snap = make(current)
        d = p.decide(snap, sp, state, now=1000.0 + i * dt, current=current)
        current = {k: d[k].desired for k in d}
        out.append(d)
        for pool, dec in d.items():  # the metrics pre-create a series for each action a pool can take
            assert dec.direction == "hold" or (dec.direction, dec.reason) in p.ACTIONS[pool], (pool, dec)
    return out


def test_vision_backlog_scales_the_vision_pool_up_to_drain_within_its_budget() -> None:
    # 40 MP waiting at 1 MP/s per replica; image TTFT 10 s, half for encoding -> 5 s per replica -> 8.
    d = run([lambda c: p.Snapshot(vision(c["vision"], requests=4, pixels=40e6), llm(c["llm"]))],
            spec(vision={"max_scale_up_step": 16}))[0]
    assert d["vision"].desired == 8 and d["vision"].reason == p.VISION_BACKLOG
    assert "40.0 MP" in d["vision"].message


def _steady_images(sp: p.PolicySpec, *, seconds: int, mp_per_s: float, queued: callable, mp_each: float = 1.0,
                   start: int = 1, latency: float | None = None) -> list[int]:
    """Images arrive at `mp_per_s` (the ingresses' pixel counter grows by it); `queued(t, replicas)` is the
    number of image requests (`mp_each` MP each) in the stage at second t. The running replicas follow the
    decisions at once."""
    state, cur, out = p.PolicyState(), {"vision": start, "llm": 1}, []
    for t in range(seconds):
        n = queued(t, cur["vision"])
        snap = p.Snapshot(vision(cur["vision"], requests=n, pixels=n * mp_each * 1e6, admitted_pixels_total=t * mp_per_s * 1e6,
                                 encode_latency_s=latency), llm(1))
        cur = {k: d.desired for k, d in p.decide(snap, sp, state, float(t), current=cur).items()}
        out.append(cur["vision"])
    return out


def test_the_vision_pool_is_sized_for_the_pixels_arriving_not_for_momentary_queues() -> None:
    """1.5 replicas' worth of images arrive (0.75 MP/s at 1 MP/s per replica, each replica at most half busy
    with them): the pool holds 2 while the stage's queue comes and goes. Before, requests in the stage per
    replica set the size: a queue of 5 requests grew the pool, its absence shrank it, over and over (the
    shifting mix: 32 vision actions in an hour)."""
    sp = spec(vision={"downscale_delay_s": 30, "max_scale_up_step": 4, "encode_utilization": 0.5})
    flapping = lambda t, n: 6 if t % 7 == 0 else 0  # 6 small requests (target 4 per replica) every 7 s
    v = _steady_images(sp, seconds=200, mp_per_s=0.75, queued=flapping, mp_each=0.2)
    assert v[-1] == 2 and max(v[20:]) == 2, f"the pool should hold 2: {v}"
    assert sum(1 for a, b in zip(v[20:], v[21:]) if a != b) == 0, f"the pool kept moving: {v}"
    # The same queues with half a replica's worth arriving: one replica clears each in 1.2 s, well inside the
    # 5-s encode budget, so the pool stays at one (the request count alone asked for two each time).
    light = _steady_images(sp, seconds=200, mp_per_s=0.25, queued=flapping, mp_each=0.2)
    assert light[-1] == 1 and sum(1 for a, b in zip(light[20:], light[21:]) if a != b) == 0, light
    # The share of a replica that arrivals may take sets the headroom: all of it, and one replica suffices.
    full = _steady_images(spec(vision={"downscale_delay_s": 30, "encode_utilization": 1.0}), seconds=200,
                          mp_per_s=0.75, queued=flapping, mp_each=0.2)
    assert full[-1] == 1, full


def test_requests_in_the_stage_size_the_vision_pool_only_until_an_encode_rate_is_measured() -> None:
    d = run([lambda c: p.Snapshot(vision(c["vision"], requests=12, pixels=1e6, rate=None), llm(c["llm"]))], spec())[0]
    assert d["vision"].desired == 3 and d["vision"].reason == p.VISION_REQUESTS, d["vision"]
    assert "no encode rate measured yet" in d["vision"].message
    measured = run([lambda c: p.Snapshot(vision(c["vision"], requests=12, pixels=1e6), llm(c["llm"]))], spec())[0]
    assert measured["vision"].desired == 1, "1 MP at 1 MP/s clears well within the 5-s budget"


def test_an_encode_p90_from_before_replicas_joined_does_not_grow_the_pool_again() -> None:
    """The encode p90 covers 30 s: right after new replicas joined it still shows the queue they were asked
    for. Read then, it doubled the pool on every reading (image burst: 5 -> 12 replicas on a stale p90)."""
    sp = spec(vision={"max_scale_up_step": 8, "max_replicas": 16})
    backlog = lambda t, n: 30 if t < 3 else 0  # 30 MP at once, cleared once the pool has grown
    v = _steady_images(sp, seconds=25, mp_per_s=1.0, queued=backlog, latency=12.0)
    assert max(v) == 6, f"30 MP to clear within 5 s at 1 MP/s per replica = 6, once: {v}"
    later = _steady_images(sp, seconds=60, mp_per_s=1.0, queued=backlog, latency=12.0)
    assert later[45] > 6, "a p90 still over budget a full window after they joined grows the pool again"


def test_a_ramp_in_vision_arrivals_counts_as_soon_as_the_last_seconds_show_it() -> None:
    """A burst that ramps up within a minute: the last 10 s show it before the 30-s mean does (the image burst
    with an LLM floor of 4 lost 3.5 points of attainment while the pool waited for the mean)."""
    state, total = p.PoolState(), 0.0
    for t in range(31):
        total += 1e6 if t <= 20 else 5e6
        rate = p.measure_arrivals(state, total, float(t))
    assert rate == pytest.approx(5e6), "the last 10 s"
    for t in range(31, 62):  # the burst ends: both windows come down
        rate = p.measure_arrivals(state, total, float(t))
    assert rate == pytest.approx(0.0)


def test_a_vision_arrival_counter_that_went_back_is_measured_afresh() -> None:
    state = p.PoolState()
    assert p.measure_arrivals(state, 0.0, 0.0) is None
    assert p.measure_arrivals(state, 20e6, 10.0) == pytest.approx(2e6)
    assert p.measure_arrivals(state, 5e6, 11.0) is None, "an ingress replica left with its count"
    assert p.measure_arrivals(state, 25e6, 21.0) == pytest.approx(2e6)
    assert p.measure_arrivals(state, None, 22.0) is None and state.arrivals == []


def test_step_limit_and_bounds_are_respected() -> None:
    sp = spec(vision={"max_scale_up_step": 2, "max_replicas": 5})
    ds = run([lambda c: p.Snapshot(vision(c["vision"], requests=50, pixels=500e6), llm(c["llm"]))] * 4, sp)
    assert [d["vision"].desired for d in ds] == [3, 5, 5, 5]
    assert all(d["vision"].raw <= 5 for d in ds)


def test_replicas_that_do_not_start_earn_no_more() -> None:
    """Pending replicas (no GPU for their pod): the target stops at running + step, not beyond."""
    sp = spec(vision={"max_scale_up_step": 2})
    state = p.PolicyState()
    snap = p.Snapshot(vision(1, requests=50, pixels=500e6), llm(1))
    first = p.decide(snap, sp, state, 0.0, current={"vision": 1, "llm": 1})["vision"]
    assert first.desired == 3
    for t in range(1, 10):  # still only one replica running
        again = p.decide(snap, sp, state, float(t), current={"vision": 3, "llm": 1})["vision"]
        assert again.desired == 3 and again.reason == p.STABILIZING and "only 1 of 3" in again.message


def test_encode_latency_over_budget_scales_up() -> None:
    d = run([lambda c: p.Snapshot(vision(2, requests=2, pixels=1e6, encode_latency_s=9.0), llm(1))],
            spec(), start={"vision": 2, "llm": 1})[0]["vision"]
    assert d.desired == 4 and d.reason == p.ENCODE_LATENCY


def test_queue_age_scales_the_llm_pool() -> None:
    d = run([lambda c: p.Snapshot(vision(1), llm(2, depth=1, running=4, age=3.0))],
            spec(), start={"vision": 1, "llm": 2})[0]["llm"]
    assert d.desired == 3 and d.reason == p.QUEUE_AGE


@pytest.mark.parametrize("kw,reason", [({"ttft_text_s": 3.0}, p.TTFT_TEXT), ({"ttft_image_s": 15.0}, p.TTFT_IMAGE),
                                        ({"inter_token_s": 0.4}, p.ITL), ({"kv_used_fraction": 0.99}, p.KV_CACHE)])
def test_slo_misses_and_kv_pressure_scale_the_llm_pool(kw, reason) -> None:
    d = run([lambda c: p.Snapshot(vision(1), llm(2, running=6, **kw))], spec(), start={"vision": 1, "llm": 2})[0]["llm"]
    assert d.desired > 2 and d.reason == reason


def test_slo_reported_per_modality_image_budget_is_not_the_text_budget() -> None:
    # 5 s is a miss for text (2 s) but well inside the image budget (10 s).
    d = run([lambda c: p.Snapshot(vision(1), llm(2, running=6, ttft_image_s=5.0))], spec(),
            start={"vision": 1, "llm": 2})[0]["llm"]
    assert d.desired == 2


def test_coupling_vision_backlog_moves_the_llm_pool_before_the_queue_fills() -> None:
    """Images being encoded count as LLM demand already: the LLM pool grows while its queue is empty."""
    snap = lambda c: p.Snapshot(vision(c["vision"], requests=40, pixels=4e6), llm(c["llm"], depth=0, running=0))
    d = run([snap], spec())[0]
    assert d["llm"].desired == 5 and d["llm"].reason == p.VISION_LEAD
    off = run([snap], spec(llm={"vision_lead_weight": 0}))[0]
    assert off["llm"].desired == 1


def test_text_only_burst_never_scales_the_vision_pool() -> None:
    ds = run([lambda c: p.Snapshot(vision(c["vision"]), llm(c["llm"], depth=30, running=8))] * 20, spec())
    assert all(d["vision"].desired == 1 for d in ds)
    assert ds[-1]["llm"].desired > 1


def test_vision_scales_to_zero_after_the_idle_window_and_wakes_at_once() -> None:
    sp = spec(vision={"min_replicas": 0, "idle_to_zero_s": 30, "downscale_delay_s": 10})
    state = p.PolicyState()
    cur = {"vision": 2, "llm": 1}
    d = p.decide(p.Snapshot(vision(2, requests=1, pixels=1e5), llm(1)), sp, state, 0.0, current=cur)
    desired = []
    for t in range(1, 60):
        d = p.decide(p.Snapshot(vision(cur["vision"]), llm(1)), sp, state, float(t), current=cur)
        cur["vision"] = d["vision"].desired
        desired.append(cur["vision"])
    assert desired[20] == 1, "one warm replica until the idle window has passed"
    assert desired[-1] == 0 and state.vision.last_reason == p.IDLE_TO_ZERO
    # An image request arrives while no vision replica exists: no metrics from replicas, but the ingress
    # counts it; the learned encode rate survives the zero.
    d = p.decide(p.Snapshot(vision(0, requests=1, pixels=2e5, rate=None), llm(1)), sp, state, 61.0, current=cur)
    assert d["vision"].desired == 1 and d["vision"].direction == "up"


def test_from_zero_the_reason_is_wake_up_and_with_a_replica_running_the_measured_rate_names_the_size() -> None:
    """Image work waiting always keeps one replica. From zero that is a WakeUp; once a replica runs and has
    measured its encode rate, the backlog rule that asks for the same one replica is the decision's signal,
    so the status shows the pool sized from the measured rate (a person reads the MP/s behind it)."""
    sp = spec(vision={"min_replicas": 0, "idle_to_zero_s": 30})
    state = p.PolicyState()
    woken = p.decide(p.Snapshot(vision(0, requests=1, pixels=2e5), llm(1)), sp, state, 0.0,
                     current={"vision": 0, "llm": 1})["vision"]
    assert (woken.desired, woken.reason, woken.signal) == (1, p.WAKE_UP, p.WAKE_UP)
    held = p.decide(p.Snapshot(vision(1, requests=1, pixels=2e5), llm(1)), sp, state, 1.0,
                    current={"vision": 1, "llm": 1})["vision"]
    assert (held.desired, held.reason, held.signal) == (1, p.STABLE, p.VISION_BACKLOG), held
    assert "MP/s" in held.message
    # No rate measured yet: the request count sizes it, still not WakeUp.
    fresh = p.decide(p.Snapshot(vision(1, requests=1, pixels=2e5, rate=None), llm(1)), sp, p.PolicyState(), 0.0,
                     current={"vision": 1, "llm": 1})["vision"]
    assert fresh.signal == p.VISION_REQUESTS, fresh
    # Stale metrics: the hold's own reason is its signal.
    stale = p.decide(p.Snapshot(vision(1, requests=1, pixels=2e5, age_s=999), llm(1)), sp, p.PolicyState(), 0.0,
                     current={"vision": 1, "llm": 1})["vision"]
    assert stale.signal == stale.reason == p.METRICS_STALE


def test_a_wake_up_that_serve_made_is_recorded_as_one() -> None:
    """Serve may start a replica for a request waiting on a pool at zero before the policy runs: the
    status and the Event must still say WakeUp, not an empty Stable."""
    sp = spec(vision={"min_replicas": 0, "idle_to_zero_s": 30})
    state = p.PolicyState()
    p.decide(p.Snapshot(vision(0), llm(1)), sp, state, 0.0, current={"vision": 0, "llm": 1})
    assert state.vision.target == 0
    d = p.decide(p.Snapshot(vision(0, requests=1, pixels=2e5), llm(1)), sp, state, 1.0, current={"vision": 1, "llm": 1})
    assert d["vision"].desired == 1
    assert state.vision.last_reason == p.WAKE_UP and "at zero" in state.vision.last_message
    assert state.vision.last_change_at == 1.0


def test_flapping_input_gives_no_oscillation() -> None:
    heavy = lambda c: p.Snapshot(vision(c["vision"], requests=12, pixels=12e6), llm(c["llm"], running=20))
    light = lambda c: p.Snapshot(vision(c["vision"]), llm(c["llm"]))
    ds = run([heavy if i % 2 == 0 else light for i in range(60)],
             spec(vision={"upscale_delay_s": 5}, llm={"upscale_delay_s": 5}))
    for pool in ("vision", "llm"):
        assert {d[pool].desired for d in ds} == {1}, f"{pool} moved on flapping input"


def test_flapping_input_without_an_up_window_grows_once_and_holds_through_the_down_window() -> None:
    # The vision pool's default: no up window (as the HPA), the down window still holds it.
    heavy = lambda c: p.Snapshot(vision(c["vision"], requests=12, pixels=12e6), llm(c["llm"]))
    light = lambda c: p.Snapshot(vision(c["vision"]), llm(c["llm"]))
    ds = run([heavy if i % 2 == 0 else light for i in range(100)], spec(vision={"downscale_delay_s": 120}))
    v = [d["vision"].desired for d in ds]
    assert v[0] > 1, "no up window: the first backlog grows the pool"
    assert all(b >= a for a, b in zip(v, v[1:])), f"the pool went down on flapping input: {v}"
    assert sum(1 for a, b in zip(v, v[1:]) if a != b) <= 2, f"the pool kept moving: {v}"


def test_sustained_load_then_quiet_scales_up_then_down_after_the_window() -> None:
    heavy = lambda c: p.Snapshot(vision(c["vision"], requests=12, pixels=12e6), llm(c["llm"], running=20))
    light = lambda c: p.Snapshot(vision(c["vision"]), llm(c["llm"]))
    sp = spec(vision={"upscale_delay_s": 5, "downscale_delay_s": 30}, llm={"upscale_delay_s": 5, "downscale_delay_s": 30})
    ds = run([heavy] * 20 + [light] * 80, sp)
    v = [d["vision"].desired for d in ds]
    assert v[3] == 1 and v[10] == 3, "up only after the signal held for the up window"
    assert v[40] == 3, "no scale-down inside the down window"
    assert v[-1] == 1 and all(b - a >= -1 for a, b in zip(v, v[1:])), "down one step at a time"
    changes = sum(1 for a, b in zip(v, v[1:]) if a != b)
    assert changes <= 4


def test_missing_or_stale_metrics_hold_and_say_so() -> None:
    state = p.PolicyState()
    d = p.decide(p.Snapshot(None, llm(3, depth=50, running=40)), spec(), state, 0.0, current={"vision": 2, "llm": 3})
    assert d["vision"].desired == 2 and d["vision"].reason == p.METRICS_MISSING and "holding 2" in d["vision"].message
    assert d["llm"].desired > 3, "the LLM pool still scales on its own signals"
    d = p.decide(p.Snapshot(vision(2, requests=99, pixels=1e9), llm(3, age_s=300)), spec(), state, 1.0,
                 current={"vision": 2, "llm": 3})
    assert d["llm"].desired == 3 and d["llm"].reason == p.METRICS_STALE
    assert d["vision"].desired > 2


def test_state_round_trips_through_json() -> None:
    state = p.PolicyState()
    p.decide(p.Snapshot(vision(1, requests=3, pixels=3e6), llm(1, running=3)), spec(), state, 5.0)
    again = p.PoolState.from_json(state.vision.to_json())
    assert again == state.vision


def test_a_growing_demand_scales_the_llm_pool_ahead_by_the_replica_start_up_time() -> None:
    """Demand rising by 1 request per 2 s: with a 120 s start-up the pool sizes for 60 more requests."""
    sp = spec(llm={"replica_startup_s": 120, "max_scale_up_step": 8})
    off = spec(llm={"replica_startup_s": 0, "max_scale_up_step": 8})
    ramp = [lambda c, i=i: p.Snapshot(vision(c["vision"]), llm(c["llm"], running=i / 2)) for i in range(100)]
    with_trend = [d["llm"] for d in run(ramp, sp)]
    without = [d["llm"] for d in run(ramp, off)]
    assert without[-1].desired == 7  # 49.5 requests / 8 per replica
    assert with_trend[-1].desired == 8  # capped at max_replicas
    ahead = next(i for i, (a, b) in enumerate(zip(with_trend, without)) if a.desired > b.desired)
    assert with_trend[ahead].reason == p.DEMAND_TREND and "expected in 120 s" in with_trend[ahead].message
    assert ahead < 80, "the trend sizes the pool well before the demand itself needs it"


def test_a_step_in_demand_is_met_by_the_demand_rule_not_extrapolated_as_a_trend() -> None:
    """Flat at 8 requests for 60 s, then 40 more within 10 s, then flat: the window's slope stays steep for
    a start-up time after the step, but demand no longer grows, so the pool sizes for the 48 there are
    (6 replicas), not for a growth that has stopped (the image burst of bench/autoscale_frontier.py)."""
    sp = spec(llm={"replica_startup_s": 120, "max_scale_up_step": 8})
    level = [8.0] * 60 + [8.0 + 4 * k for k in range(1, 11)] + [48.0] * 60
    steps = [lambda c, r=r: p.Snapshot(vision(c["vision"]), llm(c["llm"], running=r)) for r in level]
    ds = [d["llm"] for d in run(steps, sp)]
    assert max(d.desired for d in ds) == 6, [d.desired for d in ds]
    assert all(d.reason != p.DEMAND_TREND for d in ds)


def test_replicas_still_starting_are_not_cancelled_by_a_scale_down() -> None:
    sp = spec(llm={"replica_startup_s": 60, "downscale_delay_s": 5, "max_scale_up_step": 4})
    state = p.PolicyState()
    p.decide(p.Snapshot(vision(1), llm(1, depth=40)), sp, state, 0.0, current={"vision": 1, "llm": 1})
    assert state.llm.target == 5
    for t in range(1, 60):  # the burst is gone, but the 4 new replicas have not started yet
        d = p.decide(p.Snapshot(vision(1), llm(1)), sp, state, float(t), current={"vision": 1, "llm": 5})["llm"]
        assert d.desired == 5, d
    assert "still starting" in d.message
    later = p.decide(p.Snapshot(vision(1), llm(1)), sp, state, 70.0, current={"vision": 1, "llm": 5})["llm"]
    assert later.desired == 4, "after the start-up time, the unneeded replicas may go"


def test_by_default_the_vision_pool_grows_at_the_first_backlog_and_the_llm_pool_waits_its_window() -> None:
    """Defaults as a user gets them: no up window on the vision pool (a burst of images must not wait on a
    small pool while the LLM pool behind it idles), 10 s on the LLM pool (its replicas are 16 GPUs)."""
    sp = p.PolicySpec(slo=SLOConfig(), vision=VisionAutoscaling(max_replicas=16), llm=LLMAutoscaling(max_replicas=8))
    assert sp.vision.upscale_delay_s == 0 and sp.llm.upscale_delay_s == 10
    state, cur = p.PolicyState(), {"vision": 1, "llm": 1}
    calm = p.Snapshot(vision(1), llm(1, running=4))
    for t in range(0, 60, 5):  # both pools watched long enough for every window to count
        cur = {k: d.desired for k, d in p.decide(calm, sp, state, float(t), current=cur).items()}
    burst = p.Snapshot(vision(1, requests=60, pixels=40e6), llm(1, depth=40, running=8))
    d = p.decide(burst, sp, state, 60.0, current=cur)
    assert d["vision"].desired == 5 and d["vision"].reason == p.VISION_BACKLOG  # 1 running + step 4, at once
    assert d["llm"].desired == 1 and d["llm"].reason == p.STABILIZING and "upscaleDelaySeconds (10 s)" in d["llm"].message


def _replicas_join_a_backlog(sp: p.PolicySpec, *, arrivals: float, report_completed: bool = True) -> list[p.Decision]:
    """2 LLM replicas held a queue of 240 while 4 more started; now all 6 run full (48 in service, 8 each)
    and finish 12 requests a second while `arrivals` a second come in. The text TTFT p90 is far over its
    target throughout: it measures requests that waited in the backlog."""
    state, done, depth, out = p.PolicyState(), 0.0, 240.0, []
    p.decide(p.Snapshot(vision(1), llm(2, depth=depth, running=16, completed_total=0.0)), sp, state, -1.0,
             current={"vision": 1, "llm": 6})
    for t in range(90):
        depth = max(depth + arrivals - 12, 0.0)
        running = 48 if depth else arrivals * 4  # 4 s in service each
        done += 12 if depth else arrivals
        snap = p.Snapshot(vision(1), llm(6, depth=depth, running=running, ttft_text_s=10.0 if t < 40 else 0.5,
                                         completed_total=done if report_completed else None))
        out.append(p.decide(snap, sp, state, float(t), current={"vision": 1, "llm": 6})["llm"])
    assert p.PoolState.from_json(state.llm.to_json()) == state.llm
    return out


def test_a_backlog_the_pool_empties_before_a_new_replica_could_start_buys_no_replicas() -> None:
    """The image burst of bench/autoscale_sim.py: replicas asked for during the burst come up to a queue that
    built up while they started. The six empty it in ~27 s; a replica asked for now would serve in 120 s,
    after it is gone. Counting the queue one request per slot (or the backlog's TTFT) asked for more."""
    sp = spec(llm={"replica_startup_s": 120, "max_scale_up_step": 8, "upscale_delay_s": 5, "max_replicas": 12})
    ds = _replicas_join_a_backlog(sp, arrivals=3)
    assert max(d.desired for d in ds) == 6, [(d.desired, d.reason, d.message) for d in ds if d.desired > 6][:2]
    assert any("drains by itself" in d.message and "3.0 requests/s" in d.message for d in ds), [d.message for d in ds[10:13]]
    assert any("measuring how fast the pool empties the queue" in d.message for d in ds[:5])
    blind = _replicas_join_a_backlog(sp, arrivals=3, report_completed=False)
    assert max(d.desired for d in blind) > 6, "without the pool's completion rate the backlog counts as demand"


def test_a_backlog_that_keeps_growing_after_replicas_joined_still_scales_the_pool() -> None:
    sp = spec(llm={"replica_startup_s": 120, "max_scale_up_step": 8, "upscale_delay_s": 5, "max_replicas": 12})
    ds = _replicas_join_a_backlog(sp, arrivals=20)  # more arrive than six replicas finish
    up = next(i for i, d in enumerate(ds) if d.desired > 6)
    assert p.FLOW_MIN_S <= up <= p.FLOW_MIN_S + 10 and ds[up].reason == p.LLM_DEMAND


def _quiet_vision_pool(admitted_at: set[int], seconds: int, sp: p.PolicySpec) -> list[p.Decision]:
    """A vision pool (minReplicas 0) whose image work is seen waiting only at t=0; afterwards one image is
    admitted at each second in `admitted_at`, encoded by the warm replica between two stats samples (pending
    is 0 at every sample). The pool's running replicas follow its target at once."""
    state, cur, admitted, out = p.PolicyState(), {"vision": 1, "llm": 1}, 0.0, []
    for t in range(seconds):
        if t in admitted_at:
            admitted += 0.5e6
        seen = t == 0
        snap = p.Snapshot(vision(cur["vision"], requests=int(seen), pixels=0.5e6 * seen, rate=4e6,
                                 admitted_pixels_total=admitted), llm(1))
        d = p.decide(snap, sp, state, 1000.0 + t, current=cur)
        cur = {k: x.desired for k, x in d.items()}
        out.append(d["vision"])
    assert p.PoolState.from_json(state.vision.to_json()) == state.vision
    return out


def test_images_admitted_between_two_stats_samples_count_as_image_work() -> None:
    """The ingress records its stats every ~2 s and a warm replica encodes a small image in ~0.2 s: most
    images are never seen waiting. The admitted counter counts each one, so one image every 160 s (under
    idleToZeroSeconds) keeps the warm replica; sampled waits alone sent it to zero (and the next image met a
    cold pool)."""
    sp = spec(vision={"min_replicas": 0, "idle_to_zero_s": 300, "downscale_delay_s": 120, "scale_down_interval_s": 30})
    ds = _quiet_vision_pool(set(range(160, 1200, 160)), 1200, sp)
    assert all(d.desired == 1 for d in ds), next((d.current, d.desired, d.message) for d in ds if d.desired != 1)
    # With no image after t=0, the pool goes to zero all the same.
    assert _quiet_vision_pool(set(), 1200, sp)[-1].desired == 0


def test_the_vision_pool_goes_to_zero_idle_to_zero_seconds_after_the_last_image() -> None:
    """The idle timer is the scale-to-zero's window: the down window does not come on top of it (300 s, as
    documented, not 300 + 120)."""
    sp = spec(vision={"min_replicas": 0, "idle_to_zero_s": 300, "downscale_delay_s": 120, "scale_down_interval_s": 30})
    ds = _quiet_vision_pool(set(), 700, sp)
    zero = next(t for t, d in enumerate(ds) if d.desired == 0)
    assert zero == 300, zero
    assert ds[zero].reason == p.IDLE_TO_ZERO and "no image work for 300 s" in ds[zero].message
    # Never any image work since the autoscaler started: also idleToZeroSeconds of watching, not at once.
    state, cur = p.PolicyState(), {"vision": 1, "llm": 1}
    for t in range(400):
        d = p.decide(p.Snapshot(vision(cur["vision"], rate=4e6), llm(1)), sp, state, 1000.0 + t, current=cur)["vision"]
        cur["vision"] = d.desired
        if d.desired == 0:
            break
    assert t == 300 and "300 s since the autoscaler started watching" in d.message, (t, d.message)



def _low_load_at_500_shrinks_the_llm_pool_only_after_its_down_window(sp, state: p.PolicyState, cur: dict) -> None:
    """From t=500, after a gap in fresh signals or decisions, an LLM pool of 4 at low load: the first reading
    does not shrink it on its own; a low load lasting the whole 60 s down window does."""
    first = p.decide(p.Snapshot(vision(1), llm(4, running=10)), sp, state, 500.0, current=cur)["llm"]
    assert first.desired == 4 and first.reason == p.STABILIZING, first
    for t in range(501, 562):
        d = p.decide(p.Snapshot(vision(1), llm(4, running=10)), sp, state, float(t), current=cur)["llm"]
        if d.desired < 4:
            break
    assert t == 560 and d.reason == p.LOW_LOAD and d.desired == 3, (t, d)

def test_after_stale_metrics_the_windows_start_again() -> None:
    """A window counts only once watched in full: recommendations from before a gap in the signals do not
    fill it, so the first (momentarily low) fresh reading does not shrink the pool."""
    sp = spec(llm={"downscale_delay_s": 60, "target_ongoing_requests": 48})
    state, cur = p.PolicyState(), {"vision": 1, "llm": 4}
    for t in range(300):  # 4 replicas' worth of demand
        cur = {k: d.desired for k, d in p.decide(p.Snapshot(vision(1), llm(4, running=180)), sp, state,
                                                   float(t), current=cur).items()}
    for t in range(300, 500):  # the LLM signals are stale: the pool holds
        d = p.decide(p.Snapshot(vision(1), llm(4, running=180, age_s=40)), sp, state, float(t), current=cur)["llm"]
        assert d.reason == p.METRICS_STALE and d.desired == 4
    _low_load_at_500_shrinks_the_llm_pool_only_after_its_down_window(sp, state, cur)


def test_a_wall_clock_that_steps_back_neither_freezes_the_pools_nor_skips_a_window() -> None:
    """Serve calls the policy with time.time(): a clock stepped back (NTP, a VM resumed) left every time in the
    state in the future, so for as long as the step (here 300 s) no window counted as watched and neither pool
    could grow under a burst. The step counts as no time passing: the windows go on where they were."""
    sp = spec(vision={"max_scale_up_step": 16}, llm={"upscale_delay_s": 10, "downscale_delay_s": 60,
                                                     "target_ongoing_requests": 48})
    state, cur = p.PolicyState(), {"vision": 1, "llm": 1}
    for t in range(1000, 1100):  # quiet
        cur = {k: d.desired for k, d in p.decide(p.Snapshot(vision(cur["vision"]), llm(cur["llm"], running=10)), sp,
                                                   state, float(t), current=cur).items()}
    assert cur == {"vision": 1, "llm": 1}
    burst = lambda: p.Snapshot(vision(cur["vision"], requests=4, pixels=40e6), llm(cur["llm"], running=150))
    seen = []
    for t in range(800, 815):  # the clock steps back 300 s as a burst arrives
        ds = p.decide(burst(), sp, state, t + 0.5, current=cur)
        cur = {k: d.desired for k, d in ds.items()}
        seen.append(dict(cur))
    # The first reading falls in the same second as the last quiet one (no time passed), as it would have
    # without the step; the next one grows the vision pool (no up window), the LLM pool grows after its 10 s.
    assert [c["vision"] for c in seen[:2]] == [1, 8], seen
    assert next(i for i, c in enumerate(seen) if c["llm"] > 1) == 11 and seen[-1]["llm"] == 4, seen
    # A step back does not make the windows shorter either: the low load must last the full down window.
    for t in range(815, 830):
        ds = p.decide(p.Snapshot(vision(cur["vision"]), llm(cur["llm"], running=10)), sp, state, float(t), current=cur)
        cur = {k: d.desired for k, d in ds.items()}
    for t in range(500, 560):  # back again, by 330 s
        d = p.decide(p.Snapshot(vision(cur["vision"]), llm(cur["llm"], running=10)), sp, state, float(t), current=cur)
        cur = {k: x.desired for k, x in d.items()}
        assert cur["llm"] == 4 or t >= 500 + 60 - 15, (t, d["llm"])


def test_after_a_gap_without_decisions_the_windows_start_again() -> None:
    """No decision for longer than metricsStaleSeconds (the controller stalled, or the clock stepped forward):
    nothing was watched in between, so the first reading after the gap does not fill the down window on its
    own (it shrank the LLM pool at once)."""
    sp = spec(llm={"downscale_delay_s": 60, "target_ongoing_requests": 48})
    state, cur = p.PolicyState(), {"vision": 1, "llm": 4}
    for t in range(300):  # 4 replicas' worth of demand
        cur = {k: d.desired for k, d in p.decide(p.Snapshot(vision(1), llm(4, running=180)), sp, state,
                                                   float(t), current=cur).items()}
    _low_load_at_500_shrinks_the_llm_pool_only_after_its_down_window(sp, state, cur)


def test_a_vision_pool_whose_one_replica_is_not_running_keeps_it_until_the_idle_window() -> None:
    """With minReplicas 0 the pool keeps one warm replica until no image work was seen for idleToZeroSeconds.
    That replica was counted only while it ran: one still starting, restarting after a crash or waiting for a
    GPU made the pool's wish 0, and the pool went to zero after the down window (60 s here) instead."""
    sp = spec(vision={"min_replicas": 0, "downscale_delay_s": 60, "idle_to_zero_s": 300})
    state, cur = p.PolicyState(), {"vision": 1, "llm": 1}
    for t in range(400):
        d = p.decide(p.Snapshot(vision(0, admitted_pixels_total=5e6), llm(1)), sp, state, float(t), current=cur)["vision"]
        cur["vision"] = d.desired
        if d.desired == 0:
            break
    assert t == 300 and d.reason == p.IDLE_TO_ZERO, (t, d)


def _idle_vision_pool_after_a_gap(gap: float, stale_for: int = 0) -> tuple[int, p.Decision]:
    """A vision pool (minReplicas 0, idleToZeroSeconds 300) whose last image was seen at t=0 and that decided
    every second for 100 s; then no decision for `gap` seconds (a clock stepped forward), or `stale_for` seconds
    of stale signals; then quiet, fresh signals every second. The seconds of fresh watching after the gap until
    the pool went to zero, and that decision."""
    sp = spec(vision={"min_replicas": 0, "idle_to_zero_s": 300, "downscale_delay_s": 60})
    state, cur = p.PolicyState(), {"vision": 1, "llm": 1}
    quiet = lambda age=0.0: p.Snapshot(vision(cur["vision"], rate=4e6, admitted_pixels_total=5e6, age_s=age), llm(1))
    first = p.Snapshot(vision(1, requests=1, pixels=1e6, rate=4e6, admitted_pixels_total=5e6), llm(1))
    p.decide(first, sp, state, 0.0, current=cur)
    for t in range(1, 100):
        cur = {k: d.desired for k, d in p.decide(quiet(), sp, state, float(t), current=cur).items()}
    for t in range(100, 100 + stale_for):
        cur = {k: d.desired for k, d in p.decide(quiet(age=60.0), sp, state, float(t), current=cur).items()}
    resumed = 100 + stale_for + gap
    for t in range(400):
        d = p.decide(quiet(), sp, state, resumed + t, current=cur)["vision"]
        cur["vision"] = d.desired
        if d.desired == 0:
            return t, d
    raise AssertionError("the pool never went to zero")


def test_a_clock_stepped_forward_does_not_send_an_idle_vision_pool_to_zero_at_once() -> None:
    """The wall clock steps forward by 600 s (NTP, a resumed VM) over a pool idle for 100 s: the step is no
    idle time (nothing was watched), so the pool keeps its warm replica until 300 s of idleness were seen
    (100 before the step, 200 after). Before, the first decision after the step saw 700 s without image work
    and took the pool to zero at once, while the windows (restarted by the gap) held everything else."""
    t, d = _idle_vision_pool_after_a_gap(600.0)
    assert 200 <= t <= 201 and d.reason == p.IDLE_TO_ZERO, (t, d)  # 300 s less the ~100 s watched before


def test_stale_vision_signals_are_no_idle_time_either() -> None:
    """While the ingress's signals are stale the pool holds and nothing is watched: a first fresh reading after
    500 s of stale signals did not hold the pool (as documented) but sent it to zero at once."""
    t, d = _idle_vision_pool_after_a_gap(0.0, stale_for=500)
    assert 200 <= t <= 201 and d.reason == p.IDLE_TO_ZERO, (t, d)


def test_a_decision_always_lies_within_the_bounds_it_is_decided_with() -> None:
    """The user changes a pool's bounds while Serve's target is still the old one (outside them): the decision
    (published to /-/autoscaler, the resource's status and dotsvlm_autoscaler_desired_replicas) said 4 replicas
    under maxReplicas 2, or 2 under minReplicas 3, for as long as the windows or a hold kept the old target.
    It is the target within the new bounds, and not counted as a scaling action of the autoscaler."""
    state, cur = p.PolicyState(), {"vision": 1, "llm": 4}
    for t in range(100):  # 4 LLM replicas' worth of demand
        cur = {k: d.desired for k, d in p.decide(p.Snapshot(vision(1), llm(4, running=30)), spec(), state, float(t),
                                                   current=cur).items()}
    assert cur["llm"] == 4
    lowered = spec(llm={"max_replicas": 2})
    d = p.decide(p.Snapshot(vision(1), llm(4, running=30)), lowered, state, 100.0, current=cur)["llm"]
    assert (d.desired, d.current, d.direction) == (2, 2, "hold"), d
    assert "maxReplicas" in state.llm.last_message and state.llm.last_change_at == 100.0, state.llm.last_message
    stale = p.decide(p.Snapshot(vision(1), llm(4, running=30, age_s=60)), lowered, p.PolicyState(), 0.0, current=cur)
    assert stale["llm"].desired == 2 and stale["llm"].reason == p.METRICS_STALE, stale["llm"]
    missing = p.decide(p.Snapshot(vision(1), None), lowered, p.PolicyState(), 0.0, current=cur)["llm"]
    assert missing.desired == 2, missing
    # A raised minimum above what runs plus a step: the target is the new minimum at once (Serve applies it).
    raised = spec(vision={"min_replicas": 3, "max_scale_up_step": 1})
    d = p.decide(p.Snapshot(vision(1), llm(4, running=30)), raised, p.PolicyState(), 0.0,
                 current={"vision": 1, "llm": 4})["vision"]
    assert d.desired == 3 and d.direction == "hold", d


def test_a_target_that_serve_moved_to_new_bounds_is_not_taken_for_a_wake_up() -> None:
    """A vision pool at zero whose minReplicas the user raises to 2: Serve moves its target to 2 as it takes the
    new bounds. The policy took that for Serve's cold start: the status's last scale and the Event for 0 -> 2 said
    "a request arrived while the vision pool was at zero" (WakeUp) when none had. It says the bound moved it."""
    sp = spec(vision={"min_replicas": 0, "idle_to_zero_s": 0, "downscale_delay_s": 0})
    state, cur = p.PolicyState(), {"vision": 1, "llm": 1}
    for t in range(5):
        cur = {k: d.desired for k, d in p.decide(p.Snapshot(vision(cur["vision"]), llm(1)), sp, state, float(t),
                                                   current=cur).items()}
    assert cur["vision"] == 0
    raised = spec(vision={"min_replicas": 2, "idle_to_zero_s": 0, "downscale_delay_s": 0})
    d = p.decide(p.Snapshot(vision(0), llm(1)), raised, state, 5.0, current={"vision": 2, "llm": 1})["vision"]
    assert d.desired == 2 and state.vision.last_reason != p.WAKE_UP, (state.vision.last_reason, state.vision.last_message)
    assert "minReplicas" in state.vision.last_message and state.vision.last_change_at == 5.0, state.vision.last_message


def test_a_clock_stepped_forward_does_not_cancel_replicas_still_starting() -> None:
    """4 LLM replicas are asked for under a burst (replicaStartupSeconds 600: a large model loading) and none runs
    yet when the wall clock steps forward by 1000 s (NTP, a resumed VM). The step is no start-up time: they are
    kept until 600 s were actually watched. Before, the step ended the guard at once and the first down window
    after it (60 s) cancelled them, ~160 s after they were asked for."""
    sp = spec(llm={"replica_startup_s": 600, "downscale_delay_s": 60, "max_scale_up_step": 4})
    state, cur = p.PolicyState(), {"vision": 1, "llm": 1}
    p.decide(p.Snapshot(vision(1), llm(1, depth=40)), sp, state, 0.0, current=cur)
    assert state.llm.target == 5
    cur = {"vision": 1, "llm": 5}
    quiet = p.Snapshot(vision(1), llm(1))  # the burst is gone; the new replicas are still starting
    for t in range(1, 100):
        assert p.decide(quiet, sp, state, float(t), current=cur)["llm"].desired == 5
    shrunk_at = None
    for t in range(100, 700):  # 1000 s later on the wall clock
        d = p.decide(quiet, sp, state, 1000.0 + t, current=cur)["llm"]
        if d.desired < 5:
            shrunk_at = t
            break
        assert d.reason == p.STABILIZING and (t < 160 or "still starting" in d.message), d
    assert shrunk_at is not None and 600 <= shrunk_at <= 602, (shrunk_at, d)
    assert d.reason == p.LOW_LOAD, d


def test_a_clock_stepped_forward_does_not_shorten_the_scale_down_interval() -> None:
    """scaleDownIntervalSeconds 300 between two scale-downs (downscaleDelaySeconds 60): the LLM pool steps down
    once, then the wall clock steps forward by 1000 s. The step is no time watched: the next step down comes 300 s
    of watching after the first. Before, it came one down window (60 s) after the step, 100 s after the first."""
    sp = spec(llm={"downscale_delay_s": 60, "scale_down_interval_s": 300, "target_ongoing_requests": 48})
    state, cur = p.PolicyState(), {"vision": 1, "llm": 4}
    quiet = lambda: p.Snapshot(vision(1), llm(cur["llm"], running=10))
    downs = []
    for t in range(100):
        ds = p.decide(quiet(), sp, state, float(t), current=cur)
        if ds["llm"].desired < cur["llm"]:
            downs.append(t)
        cur = {k: d.desired for k, d in ds.items()}
    assert downs == [60] and cur["llm"] == 3, downs
    for t in range(100, 500):  # 1000 s later on the wall clock
        ds = p.decide(quiet(), sp, state, 1000.0 + t, current=cur)
        if ds["llm"].desired < cur["llm"]:
            downs.append(t)
        cur = {k: d.desired for k, d in ds.items()}
    assert 360 <= downs[1] <= 361, downs  # 300 s watched after the first (the gap takes its last tick along)
