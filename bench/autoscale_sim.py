"""Autoscaling simulator: replay bursty traces through a per-stage cost model and the SAME policy code
as the live system (`dotsvlm_serving.autoscaling.policy.decide`, imported), and compare four ways of
sizing the GPU pools of dots.vlm1 (DeepSeek-V3 LLM, TP16 over 2 nodes; a 1.3B ViT):

(a) one co-located pool (vision + LLM on the same replicas), fixed, provisioned for the peak: the
    fewest replicas that keep 99% SLO attainment on the trace;
(b) disaggregated pools at fixed sizes: the fewest (vision, LLM) replicas that keep 99%;
(c) Ray Serve's default request-count autoscaler on the same pools (re-implemented from Ray 2.60's
    source; it cannot see LLM load, since LLM replicas pull from the tensor queue), as configured
    (LLM minReplicas 1) and with the LLM pool pinned at (b)'s size, which a Serve user must do;
(d) dotsvlm's policy, with the LLM target set for the replica (0.75 x maxRunningRequests) and, for
    reference, at the CRD defaults.
Then (a) and (b) again at (d)'s GPU-hours: what fixed pools reach with the same budget.

    .venv/bin/python bench/autoscale_sim.py            # all traces, results in bench/results/autoscale_sim.*
    .venv/bin/python bench/autoscale_sim.py --traces image_burst --duration 600 --no-plot --out /tmp/x

Cost model and where each figure comes from: `autoscale_model/costs.py` (written into the results).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from autoscale_model import controllers, traces  # noqa: E402
from autoscale_model.costs import SOURCES, CostModel  # noqa: E402
from autoscale_model.run import Result, simulate  # noqa: E402

from dotsvlm_serving.autoscaling.policy import PolicySpec  # noqa: E402
from dotsvlm_serving.serve_config import LLMAutoscaling, LLMPoolConfig, SLOConfig, VisionAutoscaling  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.99
VISION_MAX, LLM_MAX = 16, 12
STRATEGIES = {
    "a": "(a) co-located, fixed for peak",
    "b": "(b) disaggregated, fixed",
    "c": "(c) Ray Serve default autoscaler",
    "c_pinned": "(c') Serve default, LLM pinned at (b)",
    "d": "(d) dotsvlm policy",
    "d_defaults": "(d0) dotsvlm policy, CRD defaults",
}
HEADLINE = ("a", "b", "c", "d")


def policy_spec(slo: SLOConfig, costs: CostModel, *, defaults: bool = False, llm_target: float | None = None) -> PolicySpec:
    """The bounds used for every autoscaled strategy. (d0) leaves every knob at the resource's defaults
    (the LLM target then follows maxRunningRequests, as the Serve config derives it); (d) also tells the
    policy how long a replica takes to start (`replicaStartupSeconds`, what the docs ask a user to set)
    and may pin the LLM target (sensitivity rows)."""
    llm = {} if defaults else {"replica_startup_s": costs.llm_start_s}
    if llm_target:
        llm["target_ongoing_requests"] = llm_target
    vision = {} if defaults else {"replica_startup_s": costs.vision_start_s}
    pool = LLMPoolConfig(max_running_requests=costs.max_running,
                         autoscaling=LLMAutoscaling(min_replicas=1, max_replicas=LLM_MAX, **llm))
    return PolicySpec(slo=slo, vision=VisionAutoscaling(min_replicas=1, max_replicas=VISION_MAX, **vision),
                      llm=pool.autoscaling)


def _fixed(trace, costs, slo, mode, v, l) -> Result:
    return simulate(trace, costs, mode, controllers.Fixed(), vision=v, llm=l, slo=slo, strategy="fixed")


def _ok(res: Result) -> bool:
    return res.metrics["slo_attainment"] >= TARGET


def smallest(check, lo: int, hi: int) -> int | None:
    """Smallest n in [lo, hi] with check(n) true, assuming more replicas never hurt (binary search)."""
    if not check(hi):
        return None
    while lo < hi:
        mid = (lo + hi) // 2
        if check(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def size_fixed(trace, costs, slo) -> tuple[int | None, tuple[int, int] | None]:
    """(a)'s replicas and (b)'s (vision, LLM) replicas: the fewest that keep TARGET on this trace."""
    n_a = smallest(lambda n: _ok(_fixed(trace, costs, slo, "colocated", 0, n)), 1, LLM_MAX)
    l_b = smallest(lambda n: _ok(_fixed(trace, costs, slo, "disaggregated", VISION_MAX, n)), 1, LLM_MAX)
    if l_b is None:
        return n_a, None
    v_b = smallest(lambda n: _ok(_fixed(trace, costs, slo, "disaggregated", n, l_b)), 1, VISION_MAX)
    return n_a, (v_b, l_b) if v_b is not None else None


FAST_LLM_START_S = 60.0  # e.g. weights pre-staged in host memory on a warm standby node
SENSITIVITY_TARGETS = (32.0, 48.0, 56.0)
FAST_START_MAX_TRACE_S = 4 * 3600  # a faster start-up matters on compressed traces, not on a day at real speed


def clairvoyant(timeline: list[dict], costs: CostModel, per_replica: float, vision_gpu_hours: float,
                lookahead_s: float = 60.0, min_replicas: int = 1) -> float:
    """A lower bound no reactive policy can beat: the LLM pool sized at every moment for the peak
    concurrency of the next `lookahead_s` (perfect foresight), starting instantly, at `per_replica`
    requests per replica; concurrency is read from a run that met the SLO (running + queued), and the
    vision pool costs what (d)'s did."""
    if len(timeline) < 2:
        return vision_gpu_hours
    step = timeline[1]["t"] - timeline[0]["t"]
    conc = [r["llm_running_requests"] + r["queue_depth"] for r in timeline]
    k = max(1, int(round(lookahead_s / step)))
    reps = [max(min_replicas, math.ceil(round(max(conc[i:i + k]) / per_replica, 6))) for i in range(len(conc))]
    return round(vision_gpu_hours + sum(reps) * step * costs.llm_gpus_per_replica / 3600, 2)


def sensitivity(trace, costs: CostModel, slo: SLOConfig, v0: int, l0: int) -> list[dict]:
    """(d) with more headroom (a lower LLM target), with less (a higher one), and with a faster LLM start-up."""
    rows = []
    starts = (costs.llm_start_s, FAST_LLM_START_S) if trace.duration_s <= FAST_START_MAX_TRACE_S else (costs.llm_start_s,)
    for start in dict.fromkeys(starts):
        for target in SENSITIVITY_TARGETS:
            cst = replace(costs, llm_start_s=start)
            ctl = controllers.DotsVLM(policy_spec(slo, cst, llm_target=target))
            m = simulate(trace, cst, "disaggregated", ctl, vision=v0, llm=l0, slo=slo, strategy="d").metrics
            rows.append({"llm_start_s": start, "llm_target_ongoing_requests": target, **{k: m[k] for k in (
                "gpu_hours", "slo_attainment", "ttft_image_attainment", "ttft_text_attainment", "itl_attainment",
                "rejected", "scaling_actions_llm", "peak_replicas_llm")}})
    return rows


def run_trace(name: str, costs: CostModel, slo: SLOConfig, duration: float | None = None, seed: int | None = None,
              with_sensitivity: bool = True) -> dict:
    t0 = time.time()
    trace = traces.generate(name, seed=seed, duration_s=duration)
    n_a, b = size_fixed(trace, costs, slo)
    n_a = n_a or LLM_MAX
    v_b, l_b = b or (VISION_MAX, LLM_MAX)
    # Autoscaled pools start warm, at what the trace's first 10 minutes need (a running service).
    head = traces.Trace(trace.name, trace.seed, min(600.0, trace.duration_s),
                        [r for r in trace.requests if r.t < 600.0], trace.description)
    _, warm = size_fixed(head, costs, slo)
    v0, l0 = warm or (1, 1)
    serve = lambda llm_min: controllers.ServeDefault(  # noqa: E731
        controllers.ServeDefaultConfig(min_replicas=1, max_replicas=VISION_MAX),
        controllers.ServeDefaultConfig(min_replicas=llm_min, max_replicas=LLM_MAX))
    d_ctl = controllers.DotsVLM(policy_spec(slo, costs))
    d0_ctl = controllers.DotsVLM(policy_spec(slo, costs, defaults=True))
    runs: dict[str, Result] = {
        "a": _fixed(trace, costs, slo, "colocated", 0, n_a),
        "b": _fixed(trace, costs, slo, "disaggregated", v_b, l_b),
        "c": simulate(trace, costs, "disaggregated", serve(1), vision=v0, llm=l0, slo=slo, strategy="c"),
        "c_pinned": simulate(trace, costs, "disaggregated", serve(l_b), vision=v0, llm=l_b, slo=slo, strategy="c_pinned"),
        "d": simulate(trace, costs, "disaggregated", d_ctl, vision=v0, llm=l0, slo=slo, strategy="d"),
        "d_defaults": simulate(trace, costs, "disaggregated", d0_ctl, vision=v0, llm=l0, slo=slo, strategy="d_defaults"),
    }
    sizes = {"a": {"llm": n_a}, "b": {"vision": v_b, "llm": l_b}, "c": {"vision": v0, "llm": l0},
             "c_pinned": {"vision": v0, "llm": l_b}, "d": {"vision": v0, "llm": l0}, "d_defaults": {"vision": v0, "llm": l0}}
    # Equal GPU-hours: the largest fixed pools whose GPU-hours stay within (d)'s.
    hours = (trace.duration_s + 120.0) / 3600
    budget = runs["d"].metrics["gpu_hours"]
    n_eq = max(1, int(budget / (costs.llm_gpus_per_replica * hours)))
    l_eq = max(1, int((budget - v_b * costs.vision_gpus_per_replica * hours) / (costs.llm_gpus_per_replica * hours)))
    equal = {"a": _fixed(trace, costs, slo, "colocated", 0, n_eq).metrics | {"replicas": {"llm": n_eq}},
             "b": _fixed(trace, costs, slo, "disaggregated", v_b, l_eq).metrics | {"replicas": {"vision": v_b, "llm": l_eq}}}
    sens = sensitivity(trace, costs, slo, v0, l0) if with_sensitivity else []
    d_target = policy_spec(slo, costs).llm.target_ongoing_requests
    vision_h = runs["d"].metrics["gpu_hours_vision"]
    bound = {"lookahead_s": 60.0, "per_replica": {
        f"{d_target:g}": clairvoyant(runs["b"].timeline, costs, d_target, vision_h),
        f"{costs.max_running:g}": clairvoyant(runs["b"].timeline, costs, costs.max_running, vision_h)}}
    return {"trace": trace.summary(), "sizes": sizes, "sensitivity": sens, "clairvoyant": bound, "llm_start_s": costs.llm_start_s,
            "results": {k: r.metrics for k, r in runs.items()},
            "equal_gpu_hours": equal, "reasons": {"d": d_ctl.reasons, "d_defaults": d0_ctl.reasons},
            "timelines": {k: runs[k].timeline for k in ("b", "c", "c_pinned", "d")}, "wall_s": round(time.time() - t0, 1)}


def verdict(out: dict) -> dict:
    r = out["results"]
    a, c, d = r["a"], r["c"], r["d"]
    saving = 1 - d["gpu_hours"] / a["gpu_hours"] if a["gpu_hours"] else 0.0
    better_than = lambda x: d["gpu_hours"] <= x["gpu_hours"] and d["slo_attainment"] >= x["slo_attainment"]  # noqa: E731
    ok = [x for x in out.get("sensitivity", []) if x["llm_start_s"] == out.get("llm_start_s") and x["slo_attainment"] >= TARGET]
    best = min(ok, key=lambda x: x["gpu_hours"]) if ok else None
    best_saving = 1 - best["gpu_hours"] / a["gpu_hours"] if best and a["gpu_hours"] else None
    return {"gpu_hours_saving_vs_a": round(saving, 3), "d_meets_99": d["slo_attainment"] >= TARGET,
            "best_tuned": best and {"llm_target_ongoing_requests": best["llm_target_ongoing_requests"],
                                    "gpu_hours": best["gpu_hours"], "slo_attainment": best["slo_attainment"],
                                    "saving_vs_a": round(best_saving, 3)},
            "target_met_tuned": best_saving is not None and best_saving >= 0.40,
            "target_met_vs_a": saving >= 0.40 and d["slo_attainment"] >= TARGET,
            "better_than_c_both_axes": better_than(c), "better_than_c_pinned_both_axes": better_than(r["c_pinned"])}


def markdown(report: dict) -> str:
    cm = report["cost_model"]
    lines = [
        "# Autoscaling simulator: co-located vs fixed vs Ray Serve default vs dotsvlm's policy", "",
        f"Command: `{report['command']}` (commit {report['commit']}, {report['date']}); "
        f"{report['wall_s']} s wall, {report['cpu_s']} s of CPU, on {report['machine']} "
        f"(load average {report['load_average_1m']}: the machine is shared).", "",
        "Everything below is simulated: a discrete-time model (`bench/autoscale_model/`, tick "
        f"{report['dt_s']} s) of the serving path driven by seeded synthetic traces. The LLM and vision costs are "
        "**published H100 figures or derived from FLOP counts, not measured by us on a GPU** (we have no GPU figure "
        "yet); the path overheads are **measured here on CPU**. The table at the end says which number is which. "
        "dotsvlm's policy is the real `decide` imported from `dotsvlm_serving.autoscaling.policy`; Ray Serve's "
        "default rule is re-implemented from Ray 2.60's `replica_queue_length_autoscaling_policy`.", "",
        f"SLO: image TTFT <= {report['slo']['image_ttft_s']} s, text TTFT <= {report['slo']['text_ttft_s']} s, "
        f"mean inter-token latency <= {report['slo']['inter_token_s']} s per request; a rejected (429) or unfinished "
        "request misses. SLO attainment = share of requests meeting all that apply. GPU-hours over the trace + 120 s "
        f"(vision replica {cm['vision_gpus_per_replica']} GPU, LLM replica {cm['llm_gpus_per_replica']} GPUs, counted "
        "from the request for a replica, start-up included, until it has drained). Bounds of every autoscaled pool: "
        f"vision 1-{VISION_MAX}, LLM 1-{LLM_MAX}; autoscaled pools start at what the trace's first 10 minutes need. "
        f"Start-up: vision replica {cm['vision_start_s']:.0f} s, LLM replica {cm['llm_start_s']:.0f} s.", "",
        "## Headline", "",
        "| trace | (a) GPU-h / SLO | (c) GPU-h / SLO | (c') GPU-h / SLO | (d) GPU-h / SLO | (d) saving vs (a) | "
        "40% fewer than (a) at 99%? | (d) tuned: best LLM target at 99% | clairvoyant bound at (d)'s target / at "
        "maxRunningRequests | (d) better than (c) on both axes | than (c') on both |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    yn = lambda b: "**yes**" if b else "no"  # noqa: E731
    for name, out in report["traces"].items():
        v, r = out["verdict"], out["results"]
        gs = lambda k: f"{r[k]['gpu_hours']:.1f} / {r[k]['slo_attainment']:.1%}"  # noqa: E731
        bt = v.get("best_tuned")
        tuned = (f"{bt['llm_target_ongoing_requests']:.0f}: {bt['gpu_hours']:.1f} / {bt['slo_attainment']:.1%}, "
                 f"{bt['saving_vs_a']:.0%} fewer" + (" (**40% met**)" if v["target_met_tuned"] else "")) if bt else "none tried"
        cb = out.get("clairvoyant", {}).get("per_replica", {})
        bound = " / ".join(f"{h:.1f} ({1 - h / r['a']['gpu_hours']:.0%} fewer)" for h in cb.values()) if cb else "-"
        lines.append(f"| {name} | {gs('a')} | {gs('c')} | {gs('c_pinned')} | {gs('d')} | {v['gpu_hours_saving_vs_a']:.0%} | "
                     f"{yn(v['target_met_vs_a'])} | {tuned} | {bound} | {yn(v['better_than_c_both_axes'])} | "
                     f"{yn(v['better_than_c_pinned_both_axes'])} |")
    lines += ["", "The clairvoyant bound sizes the LLM pool with perfect foresight of the next minute and instant "
              "start-up, from the concurrency of a run that met the SLO: no reactive policy can use fewer GPU-hours at "
              "that many requests per replica. Where the bound itself is under 40% fewer than (a), the target cannot "
              "be met on that trace by any policy at that utilisation; the gap between (d) and the bound is what the "
              "start-up time and the windows cost."]
    lines += ["", "Best (d) setting that keeps 99% on each trace (from the sensitivity rows below):", ""]
    for name, out in report["traces"].items():
        a_h = out["results"]["a"]["gpu_hours"]
        for start in dict.fromkeys(x["llm_start_s"] for x in out["sensitivity"]):
            ok = [x for x in out["sensitivity"] if x["llm_start_s"] == start and x["slo_attainment"] >= TARGET]
            best = min(ok, key=lambda x: x["gpu_hours"]) if ok else None
            lines.append(f"- {name}, LLM start-up {start:.0f} s: " + (
                f"LLM target {best['llm_target_ongoing_requests']:.0f} -> {best['gpu_hours']:.1f} GPU-h at "
                f"{best['slo_attainment']:.2%}, {1 - best['gpu_hours'] / a_h:.0%} fewer GPU-hours than (a)" if best else
                "no setting tried keeps 99%"))
    for name, out in report["traces"].items():
        t = out["trace"]
        lines += ["", f"## {name}", "", f"{t['description']}. {t['requests']} requests ({t['image_requests']} with "
                  f"{t['images']} images, {t['megapixels']:.0f} MP), peak {t['peak_rate_per_s']} req/s over a minute; "
                  f"prompt {t['prompt_tokens_mean']:.0f} / output {t['output_tokens_mean']:.0f} tokens on average "
                  f"(seed {t['seed']}).", "",
                  "| strategy | replicas (start) | GPU-h (vision + LLM) | SLO | TTFT image | TTFT text | ITL | rejected | "
                  "scaling actions V / L | peak V / L | TTFT p99 image / text (s) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for key, label in STRATEGIES.items():
            m, s = out["results"][key], out["sizes"][key]
            size = " + ".join(f"{k[0].upper()}{v}" for k, v in s.items())
            lines.append(f"| {label} | {size} | {m['gpu_hours']:.1f} ({m['gpu_hours_vision']:.1f} + {m['gpu_hours_llm']:.1f}) | "
                         f"{m['slo_attainment']:.2%} | {m['ttft_image_attainment']:.2%} | {m['ttft_text_attainment']:.2%} | "
                         f"{m['itl_attainment']:.2%} | {m['rejected']} | {m['scaling_actions_vision']} / {m['scaling_actions_llm']} | "
                         f"{m['peak_replicas_vision']} / {m['peak_replicas_llm']} | {m['ttft_image_p99_s']} / {m['ttft_text_p99_s']} |")
        lines += ["", f"At (d)'s GPU-hours ({out['results']['d']['gpu_hours']:.1f}), fixed pools get:", "",
                  "| strategy | replicas | GPU-h | SLO | TTFT image | TTFT text | ITL | rejected |", "|---|---|---|---|---|---|---|---|"]
        for key in ("a", "b"):
            m = out["equal_gpu_hours"][key]
            size = " + ".join(f"{k[0].upper()}{v}" for k, v in m["replicas"].items())
            lines.append(f"| {STRATEGIES[key]} | {size} | {m['gpu_hours']:.1f} | {m['slo_attainment']:.2%} | "
                         f"{m['ttft_image_attainment']:.2%} | {m['ttft_text_attainment']:.2%} | {m['itl_attainment']:.2%} | {m['rejected']} |")
        if out["sensitivity"]:
            a_h = out["results"]["a"]["gpu_hours"]
            lines += ["", "(d) with more headroom (lower LLM `targetOngoingRequests`) and a faster LLM start-up:", "",
                      "| LLM start-up (s) | LLM target | GPU-h | saving vs (a) | SLO | TTFT image | TTFT text | ITL | rejected | LLM actions | peak L |",
                      "|---|---|---|---|---|---|---|---|---|---|---|"]
            for x in out["sensitivity"]:
                lines.append(f"| {x['llm_start_s']:.0f} | {x['llm_target_ongoing_requests']:.0f} | {x['gpu_hours']:.1f} | "
                             f"{1 - x['gpu_hours'] / a_h:.0%} | {x['slo_attainment']:.2%} | {x['ttft_image_attainment']:.2%} | "
                             f"{x['ttft_text_attainment']:.2%} | {x['itl_attainment']:.2%} | {x['rejected']} | "
                             f"{x['scaling_actions_llm']} | {x['peak_replicas_llm']} |")
        rs = out["reasons"]["d"]
        lines += ["", "(d)'s scaling actions by reason: " + "; ".join(
            f"{pool}: " + (", ".join(f"{k} {v}" for k, v in sorted(rs[pool].items())) or "none") for pool in ("vision", "llm"))]
    lines += ["", "## Where each number comes from", "", "| figure | value | kind | source |", "|---|---|---|---|"]
    for s in report["sources"]:
        lines.append(f"| {s['figure']} | {s['value']} | {s['kind']} | {s['source']} |")
    lines += ["", f"Plot: `{report['plot']}` (replicas and queue depth over time per pool, per trace)." if report["plot"] else ""]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["traces"])
    fig, axes = plt.subplots(3, len(names), figsize=(5.5 * len(names) + 3.5, 11), squeeze=False, sharex="col")
    style = {"d": ("tab:blue", "(d) dotsvlm"), "c": ("tab:red", "(c) Serve default"),
             "c_pinned": ("tab:orange", "(c') Serve default, LLM pinned"), "b": ("tab:gray", "(b) fixed")}
    for j, name in enumerate(names):
        tl = report["traces"][name]["timelines"]
        for key, (color, label) in style.items():
            rows = tl.get(key) or []
            t = [r["t"] / 60 for r in rows]
            ls = "--" if key == "b" else "-"
            axes[0][j].step(t, [r["vision_target"] for r in rows], where="post", color=color, ls=ls, label=label + " (asked)")
            axes[1][j].step(t, [r["llm_target"] for r in rows], where="post", color=color, ls=ls, label=label + " (asked)")
            if key == "d":
                axes[0][j].plot(t, [r["vision_running"] for r in rows], color=color, alpha=0.4, lw=4, label=label + " (running)")
                axes[1][j].plot(t, [r["llm_running"] for r in rows], color=color, alpha=0.4, lw=4, label=label + " (running)")
                axes[2][j].plot(t, [r["vision_backlog"] for r in rows], color="tab:green", label="(d) vision backlog (image requests)")
            if key != "b":
                axes[2][j].plot(t, [r["queue_depth"] for r in rows], color=color, label=label + ": tensor queue + waiting producers")
        axes[0][j].set_title(f"{name}")
        axes[0][j].set_ylabel("vision replicas (1 GPU)")
        axes[1][j].set_ylabel("LLM replicas (16 GPUs)")
        axes[2][j].set_ylabel("requests waiting")
        axes[2][j].set_yscale("symlog")
        axes[2][j].set_xlabel("minutes")
        for i in range(3):
            axes[i][j].grid(alpha=0.3)
    from matplotlib.ticker import MaxNLocator
    for ax in list(axes[0]) + list(axes[1]):
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    for i in range(3):  # one legend per row, right of the last column: the lines stay visible
        axes[i][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle("Replicas and queue depth over time (simulated; LLM replica start-up "
                 f"{report['cost_model']['llm_start_s']:.0f} s, vision {report['cost_model']['vision_start_s']:.0f} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", nargs="+", default=list(traces.GENERATORS), choices=list(traces.GENERATORS))
    p.add_argument("--duration", type=float, default=None, help="cut every trace to this many seconds (tests)")
    p.add_argument("--llm-start", type=float, default=None, help="LLM replica start-up seconds (default: the cost model's)")
    p.add_argument("--jobs", type=int, default=2, help="traces simulated in parallel processes")
    p.add_argument("--out", default=str(RESULTS / "autoscale_sim"), help="path prefix of the .md/.json/.png results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-sensitivity", action="store_true", help="skip (d)'s runs with other LLM targets and start-ups")
    p.add_argument("--save-traces", metavar="DIR", help="also write each trace as CSV into DIR")
    args = p.parse_args(argv)
    t0 = time.time()
    costs = CostModel() if args.llm_start is None else replace(CostModel(), llm_start_s=args.llm_start)
    slo = SLOConfig()
    if args.save_traces:
        Path(args.save_traces).mkdir(parents=True, exist_ok=True)
        for name in args.traces:
            traces.save_csv(traces.generate(name, duration_s=args.duration), Path(args.save_traces) / f"{name}.csv")
    if args.jobs > 1 and len(args.traces) > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as ex:
            n = len(args.traces)
            outs = list(ex.map(run_trace, args.traces, [costs] * n, [slo] * n, [args.duration] * n, [None] * n,
                               [not args.no_sensitivity] * n))
    else:
        outs = [run_trace(n, costs, slo, args.duration, None, not args.no_sensitivity) for n in args.traces]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    argv_shown = " ".join(sys.argv[1:] if argv is None else argv)
    report = {
        "command": f".venv/bin/python bench/autoscale_sim.py {argv_shown}".strip(),
        "commit": _commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "dt_s": 0.5, "slo": SLOConfig().model_dump(), "cost_model": costs.to_json(), "sources": SOURCES,
        "policy_spec": {"d": {"vision": policy_spec(slo, costs).vision.model_dump(), "llm": policy_spec(slo, costs).llm.model_dump()},
                        "d_defaults_llm_target_ongoing_requests": policy_spec(slo, costs, defaults=True).llm.target_ongoing_requests},
        "serve_default": controllers.ServeDefaultConfig().__dict__,
        "traces": {o["trace"]["name"]: o | {"verdict": verdict(o)} for o in outs},
        "plot": None,
    }
    write_report(report, out, t0, draw=None if args.no_plot else plot, render=markdown,
                 stored=lambda r: {**r, "traces": {k: {kk: vv for kk, vv in v.items() if kk != "timelines"}
                                                   for k, v in r["traces"].items()}})
    return 0


def write_report(report: dict, out: Path, t0: float, *, draw: Callable[[dict, Path], None] | None,
                 render: Callable[[dict], str], stored: Callable[[dict], dict] = lambda r: r) -> None:
    """A benchmark's results beside `out`: the plot (unless `draw` is None), what the run cost (wall and CPU
    seconds, the load it ran under), `stored(report)` as JSON and `render(report)` as markdown, also printed.
    Shared by autoscale_sim.py and autoscale_frontier.py."""
    if draw is not None:
        png = out.with_suffix(".png")
        draw(report, png)
        report["plot"] = str(png.relative_to(Path.cwd())) if png.is_relative_to(Path.cwd()) else str(png)
    report["wall_s"] = round(time.time() - t0, 1)
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    report["cpu_s"] = round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime, 1)
    report["load_average_1m"] = round(os.getloadavg()[0], 1)
    text = render(report)
    out.with_suffix(".json").write_text(json.dumps(stored(report), indent=1) + "\n")
    out.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    raise SystemExit(main())
