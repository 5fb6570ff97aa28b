"""(c) Ray Serve's default autoscaler against (d) dotsvlm's policy at equal SLO attainment and at equal
GPU-hours: each strategy's own knobs swept over a grid on every trace, through the same simulator and the
same policy code as `bench/autoscale_sim.py` (`dotsvlm_serving.autoscaling.policy.decide`, imported).

A single run compares two settings; a grid compares two strategies. For every trace this sweeps
- (c) Serve's default request-count rule as a fair user would tune it: the LLM pool's `min_replicas`
  (Serve sees no LLM load, since LLM replicas pull from the tensor queue, so the pool stays at its
  minimum and `min_replicas` is the only LLM knob that does anything; its `target_ongoing_requests` is
  inert), and the vision pool's `target_ongoing_requests` with Serve's own delays (30 s up, 600 s down)
  and with (d)'s (LLM 10 s / 120 s, vision 0 s / 120 s); same bounds as (d) (vision 1-16, LLM up to 12);
- (c*) the same rule if Serve COULD count the LLM's requests (running + waiting + queued, as if the LLM
  were called through handles): a hypothetical, to see whether (d) wins on its rules or only on what it
  can see; its LLM `target_ongoing_requests` swept, (d)'s delays;
- (d) dotsvlm's policy, its LLM `targetOngoingRequests` swept (the default is 3/4 of
  maxRunningRequests = 48); plus, at the default target, the stabilisation made faster and the trend
  turned off, to tell what the target costs from what the windows cost; and, at the default target,
  the LLM pool's `minReplicas` raised, the one knob (c) is swept over (a burst that outgrows the pool
  faster than an LLM replica starts can only be met by a floor; both strategies get that floor);
- (a) one co-located pool fixed at n replicas, for (a)'s 99% size and the 40% target.

Then, for each (d) point: the GPU-hours (c) needs to reach (d)'s SLO attainment and the attainment (c)
gets at (d)'s GPU-hours, read off (c)'s Pareto frontier over its grid, linearly interpolated between
neighbouring frontier points (an interpolated point is not a setting that was run: the nearest grid
points are reported beside it).

    .venv/bin/python bench/autoscale_frontier.py --jobs 2     # results in bench/results/autoscale_frontier.*
    .venv/bin/python bench/autoscale_frontier.py --traces image_burst --duration 300 --quick --no-plot --out /tmp/f
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from autoscale_model import controllers, traces  # noqa: E402
from autoscale_model.costs import CostModel  # noqa: E402
from autoscale_model.run import simulate  # noqa: E402
from autoscale_sim import (LLM_MAX, RESULTS, TARGET, VISION_MAX, _commit, policy_spec, size_fixed,  # noqa: E402
                           write_report)

from dotsvlm_serving.serve_config import LLMAutoscaling, SLOConfig, VisionAutoscaling  # noqa: E402

SERVE_DELAYS = (30.0, 600.0)  # Ray Serve 2.60's AutoscalingConfig defaults
D_DELAYS = (LLMAutoscaling().upscale_delay_s, LLMAutoscaling().downscale_delay_s)  # dotsvlm's LLM defaults: 10 s / 120 s
D_VISION_DELAYS = (VisionAutoscaling().upscale_delay_s, VisionAutoscaling().downscale_delay_s)  # vision: 0 s / 120 s

# Per trace: LLM sizes for (a) and (c), the vision variants of (c) as (target, (up, down) delays), (d)'s LLM
# targets, (c*)'s LLM targets. The ranges bracket (a)'s 99% size (autoscale_sim.md) and (d)'s GPU-hours;
# the 24-h day (45 s of CPU a run) gets the points that matter there and one vision variant (5% image requests).
# (c)'s vision pool also gets (d)'s earlier vision delays (10 s / 120 s): more (c) settings only help (c).
_VISION_FULL = tuple((vt, dl) for dl in (SERVE_DELAYS, D_DELAYS, D_VISION_DELAYS) for vt in (1.0, 2.0, 4.0))
_D_TARGETS = (24.0, 32.0, 40.0, 44.0, 48.0, 52.0, 56.0, 60.0, 64.0)
# d_mins: (d)'s LLM minReplicas floors tried at the default target (the sweep above runs at 1).
GRIDS: dict[str, dict] = {
    "image_burst": {"llm_sizes": range(1, 8), "vision": _VISION_FULL, "d_targets": _D_TARGETS, "cstar_targets": (24.0, 32.0, 48.0, 56.0),
                    "d_mins": (2, 3, 4, 5)},
    "text_day": {"llm_sizes": range(1, 8), "vision": _VISION_FULL, "d_targets": _D_TARGETS, "cstar_targets": (32.0, 48.0, 56.0),
                 "d_mins": (2, 3, 4)},
    "shifting_mix": {"llm_sizes": range(1, 6), "vision": _VISION_FULL, "d_targets": _D_TARGETS, "cstar_targets": (32.0, 48.0, 56.0),
                     "d_mins": (2, 3)},
    "text_day_24h": {"llm_sizes": range(3, 6), "vision": ((2.0, D_VISION_DELAYS),),
                     "d_targets": (48.0, 52.0, 56.0, 60.0), "cstar_targets": (48.0, 56.0), "d_mins": ()},
}
QUICK = {"llm_sizes": range(1, 4), "vision": ((2.0, D_VISION_DELAYS),), "d_targets": (48.0, 56.0), "cstar_targets": (48.0,),
         "d_mins": (2,)}
DEFAULT_D_TARGET = 48.0  # 3/4 of the cost model's 64 running requests: the serve contract's default
# (d) at the default target with other stabilisation: what the windows and the trend cost.
D_VARIANTS = {
    "fast windows (up 5 s, down 30 s, scale-down every 10 s, step 2)": {
        "upscale_delay_s": 5.0, "downscale_delay_s": 30.0, "scale_down_interval_s": 10.0, "max_scale_down_step": 2},
    "no trend, no start-up hold (replicaStartupSeconds 0)": {"replica_startup_s": 0.0},
}
KEYS = ("gpu_hours", "gpu_hours_vision", "gpu_hours_llm", "slo_attainment", "ttft_image_attainment",
        "ttft_text_attainment", "itl_attainment", "rejected", "scaling_actions_vision", "scaling_actions_llm",
        "peak_replicas_llm")


class ServeDefaultSeeingLLM(controllers.ServeDefault):
    """(c*) Serve's default rule if the LLM's requests were visible to it (hypothetical: in dotsvlm they are
    not, the LLM replicas pull from the tensor queue): ongoing = running + waiting + queued + producers."""

    name = "serve-default-seeing-llm"

    def ongoing(self, cluster, pool: str) -> float:
        if pool == "llm":
            return float(sum(r.load() for r in cluster.llm) + len(cluster.queue) + len(cluster.producers))
        return super().ongoing(cluster, pool)


@functools.lru_cache(maxsize=2)
def _trace(name: str, duration: float | None) -> traces.Trace:
    return traces.generate(name, duration_s=duration)


def _serve_cfg(lo: int, hi: int, target: float, delays: tuple[float, float]) -> controllers.ServeDefaultConfig:
    return controllers.ServeDefaultConfig(min_replicas=lo, max_replicas=hi, target_ongoing_requests=target,
                                          upscale_delay_s=delays[0], downscale_delay_s=delays[1])


def run_point(job: dict) -> dict:
    """One simulation of the grid: job = {trace, duration, kind, params, v0, l0}."""
    costs, slo = CostModel(), SLOConfig()
    trace = _trace(job["trace"], job["duration"])
    p, kind = job["params"], job["kind"]
    t0 = time.time()
    if kind == "a":
        res = simulate(trace, costs, "colocated", controllers.Fixed(), vision=0, llm=p["llm"], slo=slo, strategy="a")
    elif kind == "c":
        ctl = controllers.ServeDefault(_serve_cfg(1, VISION_MAX, p["vision_target"], tuple(p["vision_delays"])),
                                       _serve_cfg(p["llm_min"], LLM_MAX, 2.0, tuple(p["vision_delays"])))
        res = simulate(trace, costs, "disaggregated", ctl, vision=job["v0"], llm=p["llm_min"], slo=slo, strategy="c")
    elif kind == "cstar":
        ctl = ServeDefaultSeeingLLM(_serve_cfg(1, VISION_MAX, 2.0, D_VISION_DELAYS), _serve_cfg(1, LLM_MAX, p["llm_target"], D_DELAYS))
        res = simulate(trace, costs, "disaggregated", ctl, vision=job["v0"], llm=job["l0"], slo=slo, strategy="cstar")
    elif kind == "d":
        spec = policy_spec(slo, costs, llm_target=p["llm_target"])
        if p.get("llm_overrides"):
            spec = replace(spec, llm=spec.llm.model_copy(update=p["llm_overrides"]))
        res = simulate(trace, costs, "disaggregated", controllers.DotsVLM(spec), vision=job["v0"], llm=job["l0"], slo=slo,
                       strategy="d")
    else:
        raise ValueError(f"unknown kind {kind!r}")
    tl = res.timeline
    asked = sum(r["llm_target"] for r in tl)
    conc = [r["llm_running_requests"] + r["queue_depth"] for r in tl]
    return {"trace": job["trace"], "kind": kind, "params": p, **{k: res.metrics[k] for k in KEYS},
            "requests_per_llm_replica": round(sum(conc) / asked, 1) if asked else None,
            "peak_concurrency": max(conc, default=0), "growth_within_llm_start": growth_within(tl, conc, costs.llm_start_s),
            "wall_s": round(time.time() - t0, 1)}


def growth_within(timeline: list[dict], conc: list[float], horizon_s: float) -> float:
    """The most the LLM's concurrent requests (running + queued) grew within `horizon_s` in the run:
    what a pool must absorb with the replicas it has while a new one starts (its headroom)."""
    if len(timeline) < 2:
        return 0.0
    k = max(1, round(horizon_s / (timeline[1]["t"] - timeline[0]["t"])))
    # From one horizon in: the run starts empty, and filling up is not growth of the load.
    return max((max(conc[i:i + k + 1]) - conc[i] for i in range(k, len(conc))), default=0.0)


# ---- reading the grid -------------------------------------------------------------------------------


def pareto(points: list[dict]) -> list[dict]:
    """The points no other point beats on both axes (fewer GPU-hours and higher attainment), by GPU-hours."""
    front: list[dict] = []
    for p in sorted(points, key=lambda p: (p["gpu_hours"], -p["slo_attainment"])):
        if not front or p["slo_attainment"] > front[-1]["slo_attainment"]:
            front.append(p)
    return front


def attainment_at(front: list[dict], gpu_hours: float) -> dict:
    """The attainment the frontier reaches with `gpu_hours` (linear between neighbouring points; flat past
    the last; None below the cheapest setting: that strategy cannot run on so few)."""
    if not front or gpu_hours < front[0]["gpu_hours"]:
        return {"value": None, "below": front[0] if front else None, "above": None}
    for lo, hi in zip(front, front[1:]):
        if lo["gpu_hours"] <= gpu_hours < hi["gpu_hours"]:
            w = (gpu_hours - lo["gpu_hours"]) / (hi["gpu_hours"] - lo["gpu_hours"])
            return {"value": lo["slo_attainment"] + w * (hi["slo_attainment"] - lo["slo_attainment"]), "below": lo, "above": hi}
    return {"value": front[-1]["slo_attainment"], "below": front[-1], "above": None}


def gpu_hours_for(front: list[dict], attainment: float) -> dict:
    """The fewest GPU-hours at which the frontier reaches `attainment` (linear between neighbouring points;
    None when no setting of the grid reaches it)."""
    if not front or attainment > front[-1]["slo_attainment"]:
        return {"value": None, "below": front[-1] if front else None, "above": None}
    if attainment <= front[0]["slo_attainment"]:
        return {"value": front[0]["gpu_hours"], "below": None, "above": front[0]}
    for lo, hi in zip(front, front[1:]):
        if lo["slo_attainment"] < attainment <= hi["slo_attainment"]:
            w = (attainment - lo["slo_attainment"]) / (hi["slo_attainment"] - lo["slo_attainment"])
            return {"value": lo["gpu_hours"] + w * (hi["gpu_hours"] - lo["gpu_hours"]), "below": lo, "above": hi}
    raise AssertionError("unreachable: the frontier's attainment rises")


def compare(d: dict, front: list[dict]) -> dict:
    """(d) against a frontier on both axes. `wins_both`: the frontier needs more GPU-hours for (d)'s
    attainment (or cannot reach it) AND reaches less attainment with (d)'s GPU-hours."""
    need = gpu_hours_for(front, d["slo_attainment"])
    get = attainment_at(front, d["gpu_hours"])
    cheaper = need["value"] is None or need["value"] > d["gpu_hours"] + 1e-9
    better = get["value"] is None or get["value"] < d["slo_attainment"] - 1e-9
    return {"gpu_hours_needed": need["value"], "attainment_at_equal_gpu_hours": get["value"],
            "need_between": [_label(need["below"]), _label(need["above"])],
            "get_between": [_label(get["below"]), _label(get["above"])],
            "d_fewer_gpu_hours": cheaper, "d_higher_attainment": better, "wins_both": cheaper and better}


def _label(p: dict | None) -> str | None:
    if p is None:
        return None
    return f"{_setting(p)}: {p['gpu_hours']:.1f} GPU-h / {p['slo_attainment']:.2%}"


def _setting(p: dict) -> str:
    x = p["params"]
    if p["kind"] == "a":
        return f"(a) co-located, fixed at {x['llm']}"
    if p["kind"] == "c":
        up, down = x["vision_delays"]
        return f"(c) LLM min {x['llm_min']}, vision target {x['vision_target']:g}, delays {up:g}/{down:g} s"
    if p["kind"] == "cstar":
        return f"(c*) LLM target {x['llm_target']:g}"
    extra = f", {x['variant']}" if x.get("variant") else ""
    floor = f", LLM min {x['llm_min']}" if x.get("llm_min") else ""
    return f"(d) LLM target {x['llm_target']:g}{floor}{extra}"


def analyse(name: str, points: list[dict]) -> dict:
    by = lambda k: [p for p in points if p["trace"] == name and p["kind"] == k]  # noqa: E731
    a_pts, c_pts, cs_pts = by("a"), by("c"), by("cstar")
    d_pts = [p for p in by("d") if not p["params"].get("variant") and not p["params"].get("llm_min")]
    d_min_pts = [p for p in by("d") if p["params"].get("llm_min")]
    variants = [p for p in by("d") if p["params"].get("variant")]
    a_ok = [p for p in a_pts if p["slo_attainment"] >= TARGET]
    a99 = min(a_ok, key=lambda p: p["gpu_hours"]) if a_ok else None
    c_front, cs_front = pareto(c_pts), pareto(cs_pts)
    rows = []
    for d in sorted(d_pts, key=lambda p: p["params"]["llm_target"]):
        modal = min(d["ttft_image_attainment"], d["ttft_text_attainment"], d["itl_attainment"])
        rows.append({"llm_target": d["params"]["llm_target"], "point": d, "vs_c": compare(d, c_front),
                     "vs_cstar": compare(d, cs_front) if cs_front else None,
                     "saving_vs_a99": (1 - d["gpu_hours"] / a99["gpu_hours"]) if a99 else None,
                     "meets_99": d["slo_attainment"] >= TARGET, "meets_99_per_modality": modal >= TARGET})
    min_rows = [{"llm_min": d["params"]["llm_min"], "point": d, "vs_c": compare(d, c_front),
                 "saving_vs_a99": (1 - d["gpu_hours"] / a99["gpu_hours"]) if a99 else None,
                 "meets_99": d["slo_attainment"] >= TARGET}
                for d in sorted(d_min_pts, key=lambda p: p["params"]["llm_min"])]
    ok = [r for r in rows if r["meets_99_per_modality"]]
    best = min(ok, key=lambda r: r["point"]["gpu_hours"]) if ok else None
    # The cheapest (d) setting of the whole grid that beats (c) on both axes at >= 99% attainment.
    winners = [r for r in rows + min_rows if r["vs_c"]["wins_both"] and r["meets_99"]]
    best_vs_c = min(winners, key=lambda r: r["point"]["gpu_hours"]) if winners else None
    return {"d_min_rows": min_rows, "best_d_beating_c_at_99": best_vs_c and {
                "setting": _setting(best_vs_c["point"]), "gpu_hours": best_vs_c["point"]["gpu_hours"],
                "slo_attainment": best_vs_c["point"]["slo_attainment"], "saving_vs_a99": best_vs_c["saving_vs_a99"],
                "c_needs": best_vs_c["vs_c"]["gpu_hours_needed"], "c_gets": best_vs_c["vs_c"]["attainment_at_equal_gpu_hours"]},
            "a99": a99, "a_points": a_pts, "c_points": c_pts, "c_front": c_front, "cstar_points": cs_pts,
            "cstar_front": cs_front, "d_rows": rows, "d_variants": variants,
            "c_reaches": max((p["slo_attainment"] for p in c_pts), default=None),
            "a_reaches_99": a99 is not None, "best_d_at_99_per_modality": best and {
                "llm_target": best["llm_target"], "gpu_hours": best["point"]["gpu_hours"],
                "slo_attainment": best["point"]["slo_attainment"], "saving_vs_a99": best["saving_vs_a99"]}}


# ---- report -----------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.2%}"


def _got(x: float | None) -> str:
    return "below its cheapest setting" if x is None else f"{x:.2%}"


def _saving(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


def _h(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def markdown(report: dict) -> str:
    L = ["# Autoscaling: (c) Ray Serve's default vs (d) dotsvlm's policy at equal SLO attainment and equal GPU-hours", "",
         f"Command: `{report['command']}` (commit {report['commit']}, {report['date']}); {report['wall_s']} s wall, "
         f"{report['points']} simulations, on {report['machine']} (load average {report['load_average_1m']}: shared).", "",
         "Same simulator, cost model, traces and SLO as `autoscale_sim.md` (everything simulated; LLM and vision costs "
         "are published H100 figures or FLOP-derived, not measured by us on a GPU). dotsvlm's policy is the real "
         "`decide`. SLO attainment = share of requests that meet every target that applies (image TTFT 10 s, text TTFT "
         "2 s, mean inter-token 0.2 s); a 429 misses.", "",
         "How to read it: for each (d) setting, *(c) needs* is the GPU-hours (c)'s best settings need to reach (d)'s "
         "attainment, and *(c) gets* the attainment (c)'s best settings reach with (d)'s GPU-hours. Both are read off "
         "(c)'s Pareto frontier over its whole grid and **linearly interpolated between the two neighbouring frontier "
         "points** (named in the JSON; an interpolated value is not a setting that was run). (d) is *better on both "
         "axes* when (c) needs more GPU-hours for (d)'s attainment (or cannot reach it at any setting of the grid) "
         "**and** gets less attainment with (d)'s GPU-hours.", "",
         "(c)'s grid: the LLM pool's `min_replicas` (Serve's request count sees no LLM load, since LLM replicas pull "
         "from the tensor queue: the pool stays at its minimum, so this is the one LLM knob that acts and "
         "`target_ongoing_requests` is inert there), the vision pool's `target_ongoing_requests` 1/2/4, with Serve's "
         "delays (30 s up / 600 s down) and with (d)'s (LLM 10 s / 120 s, vision 0 s / 120 s: each tried on (c)'s vision pool); bounds as (d): vision 1-16, LLM up to 12. "
         "(c*) is a hypothetical: Serve's rule if it could count the LLM's requests (running + waiting + queued), "
         "its LLM target swept. (d): dotsvlm's policy with `replicaStartupSeconds` set to the modelled start-up, its "
         "LLM `targetOngoingRequests` swept (default 48 = 3/4 of 64).", "",
         "## Per trace, (d) at the default LLM target (48)", "",
         "| trace | (d) GPU-h / SLO | (c) needs for that SLO | (c) gets at those GPU-h | (d) better than (c) on both axes? | "
         "(c*) needs / gets | (a) at 99%: GPU-h | (d) saving vs (a) | best (d) target with >= 99% per modality: GPU-h / SLO, saving vs (a) |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name, an in report["traces"].items():
        row = next((r for r in an["d_rows"] if r["llm_target"] == DEFAULT_D_TARGET), None)
        if row is None:
            continue
        d, vc, vs = row["point"], row["vs_c"], row["vs_cstar"]
        need = _h(vc["gpu_hours_needed"]) if vc["gpu_hours_needed"] is not None else f"cannot (best {_pct(an['c_reaches'])})"
        get = _pct(vc["attainment_at_equal_gpu_hours"]) if vc["attainment_at_equal_gpu_hours"] is not None else "below its cheapest setting"
        verdict = "**yes**" if vc["wins_both"] else ("no: " + ", ".join(
            s for s, ok in (("(c) needs no more GPU-h for the same SLO", not vc["d_fewer_gpu_hours"]),
                            ("(c) gets as much SLO or more for the same GPU-h", not vc["d_higher_attainment"])) if ok))
        star = "-" if vs is None else (f"{_h(vs['gpu_hours_needed']) if vs['gpu_hours_needed'] is not None else 'cannot'} / "
                                       f"{_got(vs['attainment_at_equal_gpu_hours'])}")
        a99 = an["a99"]
        best = an["best_d_at_99_per_modality"]
        best_s = (f"{best['llm_target']:g}: {best['gpu_hours']:.1f} / {best['slo_attainment']:.2%}, "
                  f"{best['saving_vs_a99']:.0%}" if best and best["saving_vs_a99"] is not None else "none in the grid")
        L.append(f"| {name} | {d['gpu_hours']:.1f} / {d['slo_attainment']:.2%} | {need} | {get} | {verdict} | {star} | "
                 f"{_h(a99 and a99['gpu_hours'])} | {_saving(row['saving_vs_a99'])} | {best_s} |")
    L += ["", "## Per trace, (d) at the default LLM target with the LLM `minReplicas` floor (c) is swept over", "",
          "(c)'s only LLM knob is a floor, and a burst that outgrows the pool faster than an LLM replica starts "
          f"({CostModel().llm_start_s:g} s here) can only be met by one; so (d) gets the same floor. Each (d) setting "
          "against (c)'s frontier as above; the last column names the cheapest (d) setting of the whole grid (target "
          "sweep and floors) that beats (c) on both axes at 99% or more.", "",
          "| trace | (d) LLM min | GPU-h / SLO | (c) needs for that SLO | (c) gets at those GPU-h | both axes vs (c) | saving vs (a) at 99% | "
          "cheapest (d) beating (c) on both axes at >= 99% |", "|---|---|---|---|---|---|---|---|"]
    for name, an in report["traces"].items():
        best = an.get("best_d_beating_c_at_99")
        best_s = (f"{best['setting']}: {best['gpu_hours']:.1f} GPU-h / {best['slo_attainment']:.2%} ((c) needs "
                  f"{_h(best['c_needs']) if best['c_needs'] is not None else 'more than any setting'}, gets "
                  f"{_got(best['c_gets'])}), {_saving(best['saving_vs_a99'])} vs (a)" if best else "none")
        for i, r in enumerate(an.get("d_min_rows") or []):
            d, vc = r["point"], r["vs_c"]
            L.append(f"| {name if i == 0 else ''} | {r['llm_min']} | {d['gpu_hours']:.1f} / {d['slo_attainment']:.2%} | "
                     f"{_h(vc['gpu_hours_needed']) if vc['gpu_hours_needed'] is not None else 'cannot'} | "
                     f"{_got(vc['attainment_at_equal_gpu_hours'])} | {'**yes**' if vc['wins_both'] else 'no'} | "
                     f"{_saving(r['saving_vs_a99'])} | {best_s if i == 0 else ''} |")
        if not an.get("d_min_rows"):
            L.append(f"| {name} | (not run) | | | | | | {best_s} |")
    for name, an in report["traces"].items():
        L += ["", f"## {name}", "", "(d) over its LLM target, each against (c)'s frontier (interpolated) and (c*)'s:", "",
              "| (d) LLM target | GPU-h | SLO | TTFT image / text / ITL | rejected | requests per LLM replica | (c) needs | "
              "(c) gets | both axes vs (c) | (c*) needs | (c*) gets | both vs (c*) | saving vs (a) at 99% |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in an["d_rows"]:
            d, vc, vs = r["point"], r["vs_c"], r["vs_cstar"] or {}
            L.append(f"| {r['llm_target']:g} | {d['gpu_hours']:.1f} | {d['slo_attainment']:.2%} | "
                     f"{d['ttft_image_attainment']:.2%} / {d['ttft_text_attainment']:.2%} / {d['itl_attainment']:.2%} | "
                     f"{d['rejected']} | {d['requests_per_llm_replica']} | {_h(vc['gpu_hours_needed']) if vc['gpu_hours_needed'] is not None else 'cannot'} | "
                     f"{_got(vc['attainment_at_equal_gpu_hours'])} | {'**yes**' if vc['wins_both'] else 'no'} | "
                     f"{(_h(vs['gpu_hours_needed']) if vs.get('gpu_hours_needed') is not None else 'cannot') if vs else '-'} | "
                     f"{_got(vs.get('attainment_at_equal_gpu_hours')) if vs else '-'} | "
                     f"{('**yes**' if vs['wins_both'] else 'no') if vs else '-'} | "
                     f"{_saving(r['saving_vs_a99'])} |")
        if an["d_variants"]:
            L += ["", "(d) at the default target with other stabilisation (what the windows and the trend cost):", "",
                  "| variant | GPU-h | SLO | TTFT image / text / ITL | requests per LLM replica | LLM actions |", "|---|---|---|---|---|---|"]
            for p in an["d_variants"]:
                L.append(f"| {p['params']['variant']} | {p['gpu_hours']:.1f} | {p['slo_attainment']:.2%} | "
                         f"{p['ttft_image_attainment']:.2%} / {p['ttft_text_attainment']:.2%} / {p['itl_attainment']:.2%} | "
                         f"{p['requests_per_llm_replica']} | {p['scaling_actions_llm']} |")
        L += ["", "(c)'s Pareto frontier (the settings no other (c) setting beats on both axes), then (c*)'s and (a)'s points:", "",
              "| setting | GPU-h | SLO | TTFT image / text / ITL | rejected |", "|---|---|---|---|---|"]
        for p in an["c_front"] + an["cstar_points"] + sorted(an["a_points"], key=lambda p: p["gpu_hours"]):
            L.append(f"| {_setting(p)} | {p['gpu_hours']:.1f} | {p['slo_attainment']:.2%} | {p['ttft_image_attainment']:.2%} / "
                     f"{p['ttft_text_attainment']:.2%} / {p['itl_attainment']:.2%} | {p['rejected']} |")
        L.append(f"\n(c)'s grid: {len(an['c_points'])} settings; best attainment any of them reaches: {_pct(an['c_reaches'])}."
                 + ("" if an["a_reaches_99"] else " (a) did not reach 99% within the grid."))
    if report.get("plot"):
        L += ["", f"Plot: `{report['plot']}` (GPU-hours against SLO attainment per trace: every (c), (c*), (d) and (a) point, "
              "the frontiers, the 99% line)."]
    return "\n".join(L) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["traces"])
    fig, axes = plt.subplots(1, len(names), figsize=(max(5.2 * len(names), 7.0), 5.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        an = report["traces"][name]
        for pts, front, color, label in ((an["c_points"], an["c_front"], "tab:red", "(c) Serve default"),
                                         (an["cstar_points"], an["cstar_front"], "tab:orange", "(c*) Serve rule seeing LLM load")):
            ax.scatter([p["gpu_hours"] for p in pts], [100 * p["slo_attainment"] for p in pts], s=12, color=color, alpha=0.35)
            ax.plot([p["gpu_hours"] for p in front], [100 * p["slo_attainment"] for p in front], color=color, label=label)
        a = sorted(an["a_points"], key=lambda p: p["gpu_hours"])
        ax.plot([p["gpu_hours"] for p in a], [100 * p["slo_attainment"] for p in a], "s--", color="tab:gray", ms=4,
                label="(a) co-located, fixed")
        d = [r["point"] for r in an["d_rows"]]
        ax.plot([p["gpu_hours"] for p in d], [100 * p["slo_attainment"] for p in d], "o-", color="tab:blue", ms=4,
                label="(d) dotsvlm, LLM target swept")
        for r in an["d_rows"]:
            ax.annotate(f"{r['llm_target']:g}", (r["point"]["gpu_hours"], 100 * r["point"]["slo_attainment"]), fontsize=7,
                        color="tab:blue", textcoords="offset points", xytext=(3, -9))
        floors = an.get("d_min_rows") or []
        if floors:
            ax.scatter([r["point"]["gpu_hours"] for r in floors], [100 * r["point"]["slo_attainment"] for r in floors],
                       marker="^", s=28, color="tab:green", label="(d) default target, LLM min raised", zorder=3)
            for r in floors:
                ax.annotate(f"min {r['llm_min']}", (r["point"]["gpu_hours"], 100 * r["point"]["slo_attainment"]),
                            fontsize=7, color="tab:green", textcoords="offset points", xytext=(3, 3))
        ax.axhline(100 * TARGET, color="black", lw=0.7, ls=":")
        ax.set_title(name)
        ax.set_xlabel("GPU-hours")
        ax.set_ylabel("SLO attainment (%)")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="lower right")
    fig.suptitle("GPU-hours against SLO attainment (simulated)\n(d)'s points labelled with its LLM target", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def jobs_for(name: str, duration: float | None, grid: dict) -> list[dict]:
    costs, slo = CostModel(), SLOConfig()
    trace = _trace(name, duration)
    head = traces.Trace(trace.name, trace.seed, min(600.0, trace.duration_s), [r for r in trace.requests if r.t < 600.0],
                        trace.description)
    _, warm = size_fixed(head, costs, slo)  # autoscaled pools start at what the first 10 minutes need, as in autoscale_sim
    v0, l0 = warm or (1, 1)
    base = {"trace": name, "duration": duration, "v0": v0, "l0": l0}
    out = [base | {"kind": "a", "params": {"llm": n}} for n in grid["llm_sizes"]]
    out += [base | {"kind": "c", "params": {"llm_min": n, "vision_target": vt, "vision_delays": list(dl)}}
            for n in grid["llm_sizes"] for vt, dl in grid["vision"]]
    out += [base | {"kind": "cstar", "params": {"llm_target": t}} for t in grid["cstar_targets"]]
    out += [base | {"kind": "d", "params": {"llm_target": t}} for t in grid["d_targets"]]
    out += [base | {"kind": "d", "params": {"llm_target": DEFAULT_D_TARGET, "variant": v, "llm_overrides": o}}
            for v, o in D_VARIANTS.items()]
    out += [base | {"l0": max(l0, m), "kind": "d",
                    "params": {"llm_target": DEFAULT_D_TARGET, "llm_min": m, "llm_overrides": {"min_replicas": m}}}
            for m in grid.get("d_mins", ())]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    p.add_argument("--duration", type=float, default=None, help="cut every trace to this many seconds (tests)")
    p.add_argument("--quick", action="store_true", help="a small grid (tests)")
    p.add_argument("--jobs", type=int, default=2, help="simulations run in parallel processes")
    p.add_argument("--out", default=str(RESULTS / "autoscale_frontier"), help="path prefix of the .md/.json/.png results")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    t0 = time.time()
    jobs = [j for name in args.traces for j in jobs_for(name, args.duration, QUICK if args.quick else GRIDS[name])]
    jobs.sort(key=lambda j: j["trace"] != "text_day_24h")  # the long runs first, the short ones fill in around them
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as ex:
            points = list(ex.map(run_point, jobs))
    else:
        points = [run_point(j) for j in jobs]
    argv_shown = " ".join(sys.argv[1:] if argv is None else argv)
    report = {"command": f".venv/bin/python bench/autoscale_frontier.py {argv_shown}".strip(), "commit": _commit(),
              "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
              "points": len(points), "target": TARGET, "default_llm_target": DEFAULT_D_TARGET,
              "traces": {name: analyse(name, points) for name in args.traces}, "plot": None}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_report(report, out, t0, draw=None if args.no_plot else plot, render=markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
