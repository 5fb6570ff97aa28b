"""A new image rolls the vision pool, then the LLM pool, then the head: each waits for the one before."""

from __future__ import annotations

from dotsvlm_operator.rollout import plan_images, rollout_progress


def dep(image: str, replicas: int = 2, updated: int | None = None, available: int | None = None,
        total: int | None = None, generation: int = 2, observed: int = 2) -> dict:
    return {"metadata": {"generation": generation}, "spec": {"replicas": replicas, "template": {"spec": {
        "containers": [{"name": "ray", "image": image}]}}},
            "status": {"observedGeneration": observed, "replicas": replicas if total is None else total,
                       "updatedReplicas": replicas if updated is None else updated,
                       "availableReplicas": replicas if available is None else available}}


def test_new_resource_gets_the_image_everywhere_and_no_rollout() -> None:
    plan = plan_images("img:2", {"vision": None, "llm": None, "ray-head": None})
    assert plan.images == {"vision": "img:2", "llm": "img:2", "ray-head": "img:2"} and not plan.rolling


def test_unchanged_image_is_no_rollout_even_while_a_pool_scales() -> None:
    live = {"vision": dep("img:1", 3, updated=3, available=1), "llm": dep("img:1"), "ray-head": dep("img:1", 1)}
    plan = plan_images("img:1", live)
    assert set(plan.images.values()) == {"img:1"} and not plan.rolling


def test_vision_first_then_llm_then_head() -> None:
    # The image changes: only the vision pool gets it.
    live = {"vision": dep("img:1"), "llm": dep("img:1"), "ray-head": dep("img:1", 1)}
    plan = plan_images("img:2", live)
    assert plan.images == {"vision": "img:2", "llm": "img:1", "ray-head": "img:1"}
    assert plan.message.startswith("new image img:2: rolling the vision pool (starting); then the LLM pool, then the Ray head")
    # The vision pool rolls (one new pod, one old): the LLM pool still waits.
    live["vision"] = dep("img:2", updated=1, available=1, total=3, generation=3, observed=3)
    plan = plan_images("img:2", live)
    assert plan.images["llm"] == "img:1" and "the vision pool (1 of 2 pods updated, 1 available, 1 old left)" in plan.message
    # The controller has not seen the new template yet: not done either.
    live["vision"] = dep("img:2", generation=4, observed=3)
    assert plan_images("img:2", live).images["llm"] == "img:1"
    # The vision rollout is complete: the LLM pool's turn; the head still waits.
    live["vision"] = dep("img:2", generation=4, observed=4)
    plan = plan_images("img:2", live)
    assert plan.images == {"vision": "img:2", "llm": "img:2", "ray-head": "img:1"}
    assert "rolling the LLM pool (starting); then the Ray head" in plan.message
    live["llm"] = dep("img:2", updated=1, available=1, total=2)
    assert plan_images("img:2", live).images["ray-head"] == "img:1"
    # Both pools done: the head.
    live["llm"] = dep("img:2")
    plan = plan_images("img:2", live)
    assert plan.images["ray-head"] == "img:2" and "rolling the Ray head" in plan.message
    live["ray-head"] = dep("img:2", 1)
    assert not plan_images("img:2", live).rolling


def test_rollout_progress_counts_old_pods() -> None:
    assert rollout_progress(dep("i")) == (True, "2 of 2 pods updated, 2 available")
    assert rollout_progress(dep("i", updated=2, available=2, total=3))[0] is False
    assert rollout_progress(dep("i", replicas=0, updated=0, available=0))[0] is True
