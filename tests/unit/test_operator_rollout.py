"""A change to the Ray pod templates (a new image, new pod settings) rolls the vision pool, then the LLM
pool, then the head: each waits for the one before, on the template it runs."""

from __future__ import annotations

from pathlib import Path

import yaml

from dotsvlm_operator import builders, models, naming
from dotsvlm_operator.rollout import applied_template, plan_templates, rollout_progress, with_template

REPO = Path(__file__).resolve().parents[2]
OWNER = naming.Owner("dots", "ml", "uid-123")
GROUPS = ("vision", "llm", "ray-head")


def templates(image: str, token: str = "t1", **spec_patch) -> dict[str, dict]:
    """The pod templates the real builders make for the example with `image` and a Ray token."""
    raw = yaml.safe_load((REPO / "examples" / "dotsvlm.yaml").read_text())["spec"]
    spec = models.DotsVLMDeploymentSpec.model_validate({**raw, "image": image, **spec_patch})
    objs = builders.children(OWNER, spec, vision_replicas=1, llm_replicas=1, ray_token_hash=token)
    return builders.ray_templates(objs)


def dep(template: dict, replicas: int = 2, updated: int | None = None, available: int | None = None,
        total: int | None = None, generation: int = 2, observed: int = 2) -> dict:
    """A live Deployment that the operator applied with `template`, and its rollout status."""
    built = with_template({"metadata": {"generation": generation}, "spec": {"replicas": replicas}}, template)
    built["status"] = {"observedGeneration": observed, "replicas": replicas if total is None else total,
                       "updatedReplicas": replicas if updated is None else updated,
                       "availableReplicas": replicas if available is None else available}
    return built


def live_of(t: dict[str, dict], **kw) -> dict[str, dict]:
    return {g: dep(t[g], 1 if g == "ray-head" else 2, **kw) for g in GROUPS}


def test_new_resource_gets_its_templates_everywhere_and_no_rollout() -> None:
    want = templates("img:2")
    plan = plan_templates(want, {"vision": None, "llm": None, "ray-head": None})
    assert plan.templates == want and not plan.rolling


def test_unchanged_templates_are_no_rollout_even_while_a_pool_scales() -> None:
    t = templates("img:1")
    live = live_of(t)
    live["vision"] = dep(t["vision"], 3, updated=3, available=1)
    plan = plan_templates(t, live)
    assert plan.templates == t and not plan.rolling


def test_new_image_rolls_vision_first_then_llm_then_head() -> None:
    old, new = templates("img:1"), templates("img:2")
    live = live_of(old)
    # The image changes: only the vision pool gets its new template; the others keep the one they run.
    plan = plan_templates(new, live)
    assert plan.images == {"vision": "img:2", "llm": "img:1", "ray-head": "img:1"}
    assert plan.templates["llm"] == old["llm"] and plan.templates["ray-head"] == old["ray-head"]
    assert plan.message.startswith("new image img:2: rolling the vision pool (starting); then the LLM pool, then the Ray head")
    # The vision pool rolls (one new pod, one old): the LLM pool still waits.
    live["vision"] = dep(new["vision"], updated=1, available=1, total=3, generation=3, observed=3)
    plan = plan_templates(new, live)
    assert plan.templates["llm"] == old["llm"] and "the vision pool (1 of 2 pods updated, 1 available, 1 old left)" in plan.message
    # The controller has not seen the new template yet: not done either.
    live["vision"] = dep(new["vision"], generation=4, observed=3)
    assert plan_templates(new, live).templates["llm"] == old["llm"]
    # The vision rollout is complete: the LLM pool's turn; the head still waits.
    live["vision"] = dep(new["vision"], generation=4, observed=4)
    plan = plan_templates(new, live)
    assert plan.images == {"vision": "img:2", "llm": "img:2", "ray-head": "img:1"}
    assert "rolling the LLM pool (starting); then the Ray head" in plan.message
    live["llm"] = dep(new["llm"], updated=1, available=1, total=2)
    assert plan_templates(new, live).templates["ray-head"] == old["ray-head"]
    # Both pools done: the head.
    live["llm"] = dep(new["llm"])
    plan = plan_templates(new, live)
    assert plan.templates["ray-head"] == new["ray-head"] and "rolling the Ray head" in plan.message
    live["ray-head"] = dep(new["ray-head"], 1)
    assert not plan_templates(new, live).rolling


def test_any_template_change_is_sequenced_not_only_the_image() -> None:
    # A new pull secret changes every Ray pod template, the image stays: still one group at a time.
    old, new = templates("img:1"), templates("img:1", imagePullSecrets=["regcred"])
    assert all(old[g] != new[g] for g in GROUPS)
    plan = plan_templates(new, live_of(old))
    assert plan.templates == {"vision": new["vision"], "llm": old["llm"], "ray-head": old["ray-head"]}
    assert plan.message.startswith("new pod settings: rolling the vision pool (starting); then the LLM pool, then the Ray head")


def test_a_change_to_one_pool_rolls_that_pool_alone_and_at_once() -> None:
    old = templates("img:1")
    new = templates("img:1", llm={**yaml.safe_load((REPO / "examples" / "dotsvlm.yaml").read_text())["spec"]["llm"],
                                  "shmSize": "64Gi"})
    assert new["vision"] == old["vision"] and new["llm"] != old["llm"]
    plan = plan_templates(new, live_of(old))
    assert plan.templates == new and "rolling the LLM pool (starting)" in plan.message and "then" not in plan.message


def test_a_new_ray_token_reaches_every_group_at_once() -> None:
    # Ray pods with another token cannot join the head: holding any group would leave it locked out.
    old, new = templates("img:1", token="t1"), templates("img:2", token="t2")
    plan = plan_templates(new, live_of(old))
    assert plan.templates == new


def test_a_deployment_without_the_annotation_takes_its_new_template() -> None:
    # Made by an operator before the annotation: the template it runs is unknown, so it cannot be held.
    old, new = templates("img:1"), templates("img:2")
    live = live_of(old)
    del live["llm"]["metadata"]["annotations"]
    live["ray-head"]["metadata"]["annotations"][naming.ANNOTATION_POD_TEMPLATE] = "{not json"
    assert applied_template(live["ray-head"]) is None
    plan = plan_templates(new, live)
    assert plan.templates == {"vision": new["vision"], "llm": new["llm"], "ray-head": new["ray-head"]}


def test_built_deployments_record_the_template_they_run() -> None:
    raw = yaml.safe_load((REPO / "examples" / "dotsvlm.yaml").read_text())["spec"]
    spec = models.DotsVLMDeploymentSpec.model_validate(raw)
    held = templates("img:0")
    objs = builders.children(OWNER, spec, vision_replicas=3, llm_replicas=1, templates={"llm": held["llm"]})
    deps = {o["metadata"]["labels"][naming.LABEL_COMPONENT]: o for o in objs if o["kind"] == "Deployment"}
    assert deps["llm"]["spec"]["template"] == held["llm"] and applied_template(deps["llm"]) == held["llm"]
    assert applied_template(deps["vision"]) == deps["vision"]["spec"]["template"] != held["vision"]
    assert deps["vision"]["spec"]["replicas"] == 3


def test_rollout_progress_counts_old_pods() -> None:
    t = templates("i")["vision"]
    assert rollout_progress(dep(t)) == (True, "2 of 2 pods updated, 2 available")
    assert rollout_progress(dep(t, updated=2, available=2, total=3))[0] is False
    assert rollout_progress(dep(t, replicas=0, updated=0, available=0))[0] is True


def test_all_at_once_gives_every_group_the_new_image_together_and_says_so() -> None:
    """spec.rolloutStrategy AllAtOnce (a new Ray version): no group waits for the one before, so the new
    vision pods do not stop at a head that refuses their Ray version."""
    old, new = templates("img:1"), templates("img:2", rolloutStrategy="AllAtOnce")
    live = live_of(old)
    plan = plan_templates(new, live, all_at_once=True)
    assert plan.templates == new
    assert plan.message.startswith("new image img:2: rolling the vision pool (starting) and the LLM pool (starting) "
                                   "and the Ray head (starting)")
    assert "all at once (rolloutStrategy AllAtOnce)" in plan.message
    # The next pass: every group has its template (the old image is no longer in view), the vision pool rolls.
    live = {g: dep(new[g], 1 if g == "ray-head" else 2) for g in GROUPS}
    live["vision"] = dep(new["vision"], updated=1, available=1, total=2)
    plan = plan_templates(new, live, all_at_once=True)
    assert plan.message.startswith("pods of image img:2: rolling the vision pool (1 of 2 pods updated, 1 available)")
    # Once every group runs it, the rollout is over.
    assert not plan_templates(new, live_of(new), all_at_once=True).rolling
    # The strategy itself is not a pod setting: switching it alone rolls nothing.
    assert templates("img:1", rolloutStrategy="AllAtOnce") == old


def test_a_ray_version_mismatch_says_how_to_upgrade_ray() -> None:
    from dotsvlm_operator.status import crash_summary
    log = ("RuntimeError: Version mismatch: The cluster was started with:\n    Ray: 2.60.0\n    Python: 3.11.7\n"
           "This process on node 10.0.0.5 was started with:\n    Ray: 2.61.1\n    Python: 3.11.9\n")
    got = crash_summary({"exitCode": 1, "message": log})
    assert "the Ray head runs Ray 2.60.0 (Python 3.11.7), this image has Ray 2.61.1 (Python 3.11.9)" in got
    assert "spec.rolloutStrategy to AllAtOnce" in got


def test_an_api_pool_rolls_after_the_llm_pool_and_before_the_head() -> None:
    pool = {"apiPool": {"replicas": 2}}
    old, new = templates("img:1", **pool), templates("img:2", **pool)
    groups = ("vision", "llm", "api-pool", "ray-head")
    live = {g: dep(old[g], 1 if g == "ray-head" else 2) for g in groups}
    live["vision"] = dep(new["vision"])
    live["llm"] = dep(new["llm"])
    plan = plan_templates(new, live)
    assert plan.images == {"vision": "img:2", "llm": "img:2", "api-pool": "img:2", "ray-head": "img:1"}
    assert "rolling the API pool" in plan.message and "then the Ray head" in plan.message
    live["api-pool"] = dep(new["api-pool"], 2, updated=1, available=2, total=3)
    assert plan_templates(new, live).images["ray-head"] == "img:1"  # the API pool has not finished
    live["api-pool"] = dep(new["api-pool"])
    assert plan_templates(new, live).images["ray-head"] == "img:2"


def test_a_group_held_by_a_pool_whose_new_pod_is_not_available_says_what_it_waits_for() -> None:
    """The vision pool's template is in place but a pod of it is not available (a scale-up whose pod waits
    for a GPU node, say): the LLM pool's change waits for it. The status said "then the LLM pool" alone,
    naming nothing that moved; it names the pool it waits for and how far that is."""
    old = templates("img:1")
    new = templates("img:1", llm={**yaml.safe_load((REPO / "examples" / "dotsvlm.yaml").read_text())["spec"]["llm"],
                                  "shmSize": "64Gi"})
    live = live_of(old)
    live["vision"] = dep(old["vision"], 3, updated=3, available=2)
    live["ray-head"] = dep(old["ray-head"], 1, available=0)  # after the waiting group: holds nothing
    plan = plan_templates(new, live)
    assert plan.templates["llm"] == old["llm"]
    assert plan.message.startswith("new pod settings: waiting until every pod of the vision pool (3 of 3 pods "
                                   "updated, 2 available) is available; then the LLM pool"), plan.message
    assert "Ray head" not in plan.message
    live["vision"] = dep(old["vision"], 3)
    assert plan_templates(new, live).templates["llm"] == new["llm"]
