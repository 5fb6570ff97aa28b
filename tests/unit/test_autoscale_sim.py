"""The autoscaling simulator (bench/autoscale_sim.py) runs a short trace end to end through the real
policy and reports the four strategies the issue compares."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def sim():
    sys.path.insert(0, str(BENCH))
    try:
        import autoscale_sim
        yield autoscale_sim
    finally:
        sys.path.remove(str(BENCH))


def test_short_trace_end_to_end_has_the_four_strategies(sim, tmp_path: Path) -> None:
    out = tmp_path / "sim"
    assert sim.main(["--traces", "image_burst", "--duration", "240", "--jobs", "1", "--no-plot", "--no-sensitivity", "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    burst = report["traces"]["image_burst"]
    for key in ("a", "b", "c", "d"):
        m = burst["results"][key]
        assert m["requests"] > 100 and 0.0 <= m["slo_attainment"] <= 1.0 and m["gpu_hours"] > 0
        assert {"ttft_image_attainment", "ttft_text_attainment", "itl_attainment", "rejected",
                "scaling_actions_vision", "scaling_actions_llm"} <= m.keys()
    md = out.with_suffix(".md").read_text()
    for label in ("(a) co-located", "(b) disaggregated", "(c) Ray Serve default", "(d) dotsvlm policy"):
        assert label in md
    assert "bench/autoscale_sim.py" in report["command"]


def test_the_policy_driving_the_pools_is_the_real_one(sim) -> None:
    """The DotsVLM controller calls dotsvlm_serving.autoscaling.policy.decide: its state and reasons come
    from there, and an image burst makes it grow the vision pool."""
    from autoscale_model import controllers, traces
    from autoscale_model.costs import CostModel
    from autoscale_model.run import simulate
    from dotsvlm_serving.autoscaling import policy
    from dotsvlm_serving.serve_config import SLOConfig

    assert controllers.decide is policy.decide
    trace = traces.generate("image_burst", duration_s=780)  # the burst starts at 600 s
    ctl = controllers.DotsVLM(sim.policy_spec(SLOConfig(), CostModel()))
    res = simulate(trace, CostModel(), "disaggregated", ctl, vision=1, llm=1, slo=SLOConfig(), strategy="d")
    assert res.metrics["peak_replicas_vision"] > 1
    assert set(ctl.reasons["vision"]) <= set(policy.REASONS) and ctl.reasons["vision"]
    assert ctl.state.vision.target == res.timeline[-1]["vision_target"]


def test_serve_default_cannot_see_llm_load(sim) -> None:
    """Ray Serve's request count sees no LLM requests (replicas pull from the queue): the pool stays put."""
    from autoscale_model import controllers, traces
    from autoscale_model.costs import CostModel
    from autoscale_model.run import simulate
    from dotsvlm_serving.serve_config import SLOConfig

    trace = traces.generate("text_day", duration_s=240, scale=3.0)
    ctl = controllers.ServeDefault(controllers.ServeDefaultConfig(1, 16), controllers.ServeDefaultConfig(1, 12))
    res = simulate(trace, CostModel(), "disaggregated", ctl, vision=1, llm=1, slo=SLOConfig(), strategy="c")
    assert res.metrics["scaling_actions_llm"] == 0 and res.metrics["peak_replicas_llm"] == 1
    assert res.metrics["slo_attainment"] < 0.99
