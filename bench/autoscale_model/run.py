"""Run one trace through one strategy and score it against the SLO."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dotsvlm_serving.serve_config import SLOConfig

from .cluster import Cluster, Mode
from .costs import CostModel
from .traces import Trace


@dataclass
class Result:
    strategy: str
    trace: str
    mode: str
    metrics: dict
    timeline: list[dict]


def simulate(trace: Trace, costs: CostModel, mode: Mode, controller, *, vision: int, llm: int, slo: SLOConfig,
             strategy: str, dt: float = 0.5, tail_s: float = 120.0, record_every_s: float = 5.0) -> Result:
    """Replay `trace` for its duration plus `tail_s` (the same horizon for every strategy, so GPU-hours
    compare); the controller acts once per simulated second."""
    cl = Cluster(trace, costs, mode, vision=vision, llm=llm, dt=dt)
    horizon = trace.duration_s + tail_s
    next_ctl = next_rec = 0.0
    while cl.now < horizon - 1e-9:
        if cl.now >= next_ctl - 1e-9:
            controller.tick(cl)
            next_ctl += 1.0
        if cl.now >= next_rec - 1e-9:
            cl.record()
            next_rec += record_every_s
        cl.step()
    return Result(strategy, trace.name, mode, score(cl, slo), cl.timeline)


def _pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 3) if xs else None


def score(cl: Cluster, slo: SLOConfig) -> dict:
    """SLO attainment per modality. A request meets its TTFT target if its first token came within the
    target of its modality (image 10 s, text 2 s by default); it meets the ITL target if it finished and
    its mean time between tokens was within the target. Rejected (429) and unfinished requests miss both."""
    img_ok = img_n = txt_ok = txt_n = itl_ok = all_ok = 0
    ttft = {"image": [], "text": []}
    itls: list[float] = []
    rejected = unfinished = 0
    for o in cl.outcomes:
        image = o.req.has_images
        t = o.ttft
        ok_ttft = t is not None and t <= (slo.image_ttft_s if image else slo.text_ttft_s)
        itl = o.itl
        ok_itl = itl is not None and itl <= slo.inter_token_s
        if o.rejected:
            rejected += 1
        elif o.finished_at is None:
            unfinished += 1
        if t is not None:
            ttft["image" if image else "text"].append(t)
        if itl is not None:
            itls.append(itl)
        if image:
            img_n += 1
            img_ok += ok_ttft
        else:
            txt_n += 1
            txt_ok += ok_ttft
        itl_ok += ok_itl
        all_ok += ok_ttft and ok_itl
    n = len(cl.outcomes)
    hours = {k: v / 3600 for k, v in cl.gpu_s.items()}
    return {
        "requests": n, "image_requests": img_n, "text_requests": txt_n,
        "gpu_hours": round(hours["vision"] + hours["llm"], 2),
        "gpu_hours_vision": round(hours["vision"], 2), "gpu_hours_llm": round(hours["llm"], 2),
        "slo_attainment": round(all_ok / n, 4) if n else 1.0,
        "ttft_image_attainment": round(img_ok / img_n, 4) if img_n else 1.0,
        "ttft_text_attainment": round(txt_ok / txt_n, 4) if txt_n else 1.0,
        "itl_attainment": round(itl_ok / n, 4) if n else 1.0,
        "rejected": rejected, "unfinished": unfinished,
        "scaling_actions_vision": cl.actions["vision"], "scaling_actions_llm": cl.actions["llm"],
        "ttft_image_p50_s": _pct(ttft["image"], 50), "ttft_image_p99_s": _pct(ttft["image"], 99),
        "ttft_text_p50_s": _pct(ttft["text"], 50), "ttft_text_p99_s": _pct(ttft["text"], 99),
        "itl_p50_s": _pct(itls, 50), "itl_p99_s": _pct(itls, 99),
        "peak_replicas_vision": max((r["vision_target"] for r in cl.timeline), default=0),
        "peak_replicas_llm": max((r["llm_target"] for r in cl.timeline), default=0),
    }
