"""bench/autoscale_frontier.py: (c) against (d) at equal SLO attainment and equal GPU-hours, read off
(c)'s Pareto frontier over its grid."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="module")
def frontier():
    sys.path.insert(0, str(BENCH))
    try:
        import autoscale_frontier
        yield autoscale_frontier
    finally:
        sys.path.remove(str(BENCH))


def _pt(gpu_hours: float, attainment: float) -> dict:
    return {"kind": "c", "gpu_hours": gpu_hours, "slo_attainment": attainment,
            "params": {"llm_min": 1, "vision_target": 2.0, "vision_delays": [10.0, 120.0]}}


def test_frontier_drops_settings_beaten_on_both_axes(frontier) -> None:
    pts = [_pt(30, 1.0), _pt(10, 0.5), _pt(25, 0.8), _pt(20, 0.9), _pt(20, 0.6)]
    assert [(p["gpu_hours"], p["slo_attainment"]) for p in frontier.pareto(pts)] == [(10, 0.5), (20, 0.9), (30, 1.0)]


def test_equal_attainment_and_equal_gpu_hours_are_interpolated_between_frontier_points(frontier) -> None:
    front = frontier.pareto([_pt(10, 0.5), _pt(20, 0.9), _pt(30, 1.0)])
    assert frontier.gpu_hours_for(front, 0.95)["value"] == pytest.approx(25.0)
    assert frontier.attainment_at(front, 15)["value"] == pytest.approx(0.7)
    assert frontier.attainment_at(front, 40)["value"] == 1.0  # more GPU-hours than the grid's largest: flat
    assert frontier.attainment_at(front, 5)["value"] is None  # cheaper than any setting: not reachable


def test_d_wins_both_axes_only_when_c_is_worse_on_each(frontier) -> None:
    front = frontier.pareto([_pt(10, 0.5), _pt(20, 0.9), _pt(30, 1.0)])
    win = frontier.compare({"gpu_hours": 15.0, "slo_attainment": 0.95}, front)
    assert win["wins_both"] and win["gpu_hours_needed"] == pytest.approx(25.0)
    lose = frontier.compare({"gpu_hours": 25.0, "slo_attainment": 0.8}, front)  # (c) reaches 0.8 with 17.5
    assert not lose["d_fewer_gpu_hours"] and not lose["wins_both"]
    beyond = frontier.compare({"gpu_hours": 40.0, "slo_attainment": 0.9}, frontier.pareto([_pt(10, 0.5), _pt(20, 0.8)]))
    assert beyond["gpu_hours_needed"] is None and beyond["d_fewer_gpu_hours"]  # (c) cannot reach 0.9 at all


def test_quick_grid_end_to_end(frontier, tmp_path: Path) -> None:
    out = tmp_path / "f"
    assert frontier.main(["--traces", "image_burst", "--duration", "240", "--quick", "--jobs", "1", "--no-plot",
                          "--out", str(out)]) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    an = report["traces"]["image_burst"]
    assert {r["llm_target"] for r in an["d_rows"]} == set(frontier.QUICK["d_targets"])
    for r in an["d_rows"]:
        assert {"gpu_hours_needed", "attainment_at_equal_gpu_hours", "wins_both"} <= r["vs_c"].keys()
    # Serve's request count sees no LLM load: each (c) point's LLM pool stays at the minimum it was given.
    assert all(p["peak_replicas_llm"] == p["params"]["llm_min"] for p in an["c_points"])
    # (d) also gets (c)'s LLM floor: its pool never goes below the min it was given.
    assert [r["llm_min"] for r in an["d_min_rows"]] == list(frontier.QUICK["d_mins"])
    assert all(r["point"]["peak_replicas_llm"] >= r["llm_min"] for r in an["d_min_rows"])
    assert "best_d_beating_c_at_99" in an
    assert "bench/autoscale_frontier.py" in report["command"]
    assert "(c) needs" in out.with_suffix(".md").read_text()
