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
    # After the waiting group, a pod not available (no old pod left to replace) holds nothing: a fresh
    # deployment's pods loading their weights, or failing, would hold the change as long as that lasts.
    live["ray-head"] = dep(old["ray-head"], 1, available=0)
    plan = plan_templates(new, live)
    assert plan.templates["llm"] == old["llm"]
    assert plan.message.startswith("new pod settings: waiting until every pod of the vision pool (3 of 3 pods "
                                   "updated, 2 available) is available; then the LLM pool"), plan.message
    live["vision"] = dep(old["vision"], 3)
    assert plan_templates(new, live).templates["llm"] == new["llm"]


def _roll_to_the_end(want: dict[str, dict], live: dict[str, dict], groups: tuple[str, ...] = GROUPS) -> list[str]:
    """Plan, let the cluster finish what each Deployment was given, plan again, ... until no rollout is left.
    Each pass at most one group may get another template (one group short of a pod at a time). The groups in
    the order they took `want`."""
    took: list[str] = []
    for _ in range(2 * len(groups)):
        plan = plan_templates(want, live)
        given = [g for g in groups if applied_template(live[g]) != plan.templates[g]]
        assert len(given) <= 1, (given, plan.message)
        took += [g for g in given if plan.templates[g] == want[g]]
        live = {g: dep(plan.templates[g], 1 if g == "ray-head" else 2) for g in groups}
        if not plan.rolling:
            return took
    raise AssertionError(f"the rollout did not finish: {took}")


def test_a_new_image_during_a_rollout_waits_for_the_pool_still_replacing_pods_then_rolls_in_order() -> None:
    """img:B had rolled the vision pool and was replacing the LLM pool's pods when img:C came. The vision pool
    took img:C at once: both pools short of a pod together. Now every group waits until the LLM pool has
    replaced its pods, then img:C rolls vision, LLM, head, one at a time."""
    a, b, c = templates("img:A"), templates("img:B"), templates("img:C")
    live = live_of(a)
    live["vision"] = dep(b["vision"])
    live["llm"] = dep(b["llm"], updated=1, available=1, total=3)  # one img:A pod still to replace
    plan = plan_templates(c, live)
    assert plan.images == {"vision": "img:B", "llm": "img:B", "ray-head": "img:A"}, plan.message
    assert plan.message.startswith("new image img:C: waiting until the LLM pool (1 of 2 pods updated, 1 available, "
                                   "1 old left) has finished replacing its pods; then the vision pool, then the LLM "
                                   "pool, then the Ray head"), plan.message
    live["llm"] = dep(b["llm"])  # its pods are replaced
    assert plan_templates(c, live).images == {"vision": "img:C", "llm": "img:B", "ray-head": "img:A"}
    assert _roll_to_the_end(c, live) == ["vision", "llm", "ray-head"]


def test_a_pool_finishing_a_settings_change_holds_a_new_image_which_keeps_the_documented_order() -> None:
    """The API pool still replaced pods for a change of its own settings when a new image came: the image waits
    for it and then rolls vision, LLM, API pool, head (not the API pool first, nor vision beside it)."""
    pool = {"apiPool": {"replicas": 2}}
    groups = ("vision", "llm", "api-pool", "ray-head")
    old, new = templates("img:1", **pool), templates("img:2", **pool)
    live = {g: dep(old[g], 1 if g == "ray-head" else 2) for g in groups}
    live["api-pool"] = dep(old["api-pool"], updated=1, available=1, total=3)
    plan = plan_templates(new, live)
    assert plan.images == {g: "img:1" for g in groups}, plan.message
    assert "waiting until the API pool (1 of 2 pods updated, 1 available, 1 old left) has finished replacing its " \
           "pods; then the vision pool, then the LLM pool, then the API pool, then the Ray head" in plan.message
    assert _roll_to_the_end(new, live, groups) == list(groups)


def _stalled(d: dict) -> dict:
    d["status"]["conditions"] = [{"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]
    return d


def test_a_pool_whose_rollout_stalled_takes_the_next_image_at_once_and_the_groups_before_it_wait() -> None:
    """img:B crashes on the LLM pool only: its rollout stalled (Kubernetes gave up: ProgressDeadlineExceeded).
    Held until it finished img:B, nothing would ever take the fixed img:C. The LLM pool takes img:C at once (it
    is the one group short of a pod already); the vision pool waits for it, then the head."""
    a, b, c = templates("img:A"), templates("img:B"), templates("img:C")
    live = live_of(a)
    live["vision"] = dep(b["vision"])
    live["llm"] = _stalled(dep(b["llm"], updated=1, available=1))
    plan = plan_templates(c, live)
    assert plan.images == {"vision": "img:B", "llm": "img:C", "ray-head": "img:A"}, plan.message
    assert plan.message.startswith("new image img:C: rolling the LLM pool (starting); then the vision pool, then "
                                   "the Ray head"), plan.message
    live["llm"] = dep(c["llm"], updated=1, available=1, total=3)
    assert plan_templates(c, live).images["vision"] == "img:B"
    live["llm"] = dep(c["llm"])
    assert _roll_to_the_end(c, live) == ["vision", "ray-head"]
    # A change the stalled pool does not take waits for it while it still replaces old pods and may progress;
    # once it stalled (a pod the cluster has no GPUs for, say), waiting would never end: the change rolls.
    old = templates("img:A")
    new = templates("img:A", vision={**yaml.safe_load((REPO / "examples" / "dotsvlm.yaml").read_text())["spec"]["vision"],
                                     "shmSize": "8Gi"})
    live = live_of(old)
    live["llm"] = dep(old["llm"], updated=1, available=1, total=3)
    plan = plan_templates(new, live)
    assert plan.templates["vision"] == old["vision"]
    assert plan.message.startswith("new pod settings: waiting until the LLM pool (1 of 2 pods updated, "
                                   "1 available, 1 old left) has finished replacing its pods; then the vision pool"), plan.message
    live["llm"] = _stalled(live["llm"])
    plan = plan_templates(new, live)
    assert plan.templates["vision"] == new["vision"], plan.message
    assert plan.message.startswith("new pod settings: rolling the vision pool"), plan.message


def _complete(d: dict) -> dict:
    """The Deployment's last rollout finished (Kubernetes' Progressing=True, NewReplicaSetAvailable): pods it is
    short of since come from a scale-up (or were lost), which Kubernetes never declares stalled."""
    d["status"]["conditions"] = [{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}]
    return d


def test_a_later_pool_whose_scale_up_waits_for_gpus_does_not_hold_a_new_image() -> None:
    """Under load the autoscaler asked for a third LLM pod that no node can take (the cluster's GPUs are all in
    use): its Deployment finished its last rollout long ago and Kubernetes never marks a scale-up stalled
    (kubernetes/kubernetes#106054), so it stays 2 of 3 available while the load lasts. A new image waited for it
    (since c4681e8): nothing rolled, not even the vision pool, however long the load lasted. The pool is not
    replacing pods: the image rolls the vision pool, and the status does not name the LLM pool's scale-up as what
    it waits for."""
    old, new = templates("img:1"), templates("img:2")
    live = {g: _complete(d) for g, d in live_of(old).items()}
    live["llm"] = _complete(dep(old["llm"], 3, updated=3, available=2))
    plan = plan_templates(new, live)
    assert plan.images == {"vision": "img:2", "llm": "img:1", "ray-head": "img:1"}, plan.message
    assert plan.message.startswith("new image img:2: rolling the vision pool (starting); then the LLM pool, then "
                                   "the Ray head"), plan.message
    # The LLM pool replacing pods of its own (a rollout Kubernetes still runs) holds the image, as before.
    live["llm"] = dep(old["llm"], 3, updated=2, available=2, total=4)
    live["llm"]["status"]["conditions"] = [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]
    assert plan_templates(new, live).templates["vision"] == old["vision"]
    # Its last new pod still starting (every pod updated, one not available) holds nothing: without old pods
    # to replace it cannot be told from a fresh deployment's pods loading their weights (or failing), which
    # would hold the change for as long as that lasts (the clean-clone CI of stop 39: forever).
    live["llm"] = dep(old["llm"], 3, updated=3, available=2)
    live["llm"]["status"]["conditions"] = [{"type": "Progressing", "status": "True", "reason": "ReplicaSetUpdated"}]
    assert plan_templates(new, live).templates["vision"] == new["vision"]


def test_a_waiting_group_is_not_said_to_wait_for_a_later_pool_that_only_scales() -> None:
    """A new image comes while the API pool replaces pods for a change of its own (the image waits for it) and the
    LLM pool has a scale-up pod waiting for a GPU node. The vision pool waits for the API pool only: the status
    names the API pool, not the LLM pool's scale-up."""
    pool = {"apiPool": {"replicas": 2}}
    groups = ("vision", "llm", "api-pool", "ray-head")
    old, new = templates("img:1", **pool), templates("img:2", **pool)
    live = {g: _complete(dep(old[g], 1 if g == "ray-head" else 2)) for g in groups}
    live["api-pool"] = dep(old["api-pool"], updated=1, available=1, total=3)
    live["llm"] = _complete(dep(old["llm"], 3, updated=3, available=2))
    plan = plan_templates(new, live)
    assert plan.images == {g: "img:1" for g in groups}, plan.message
    assert plan.message.startswith("new image img:2: waiting until the API pool (1 of 2 pods updated, 1 available, "
                                   "1 old left) has finished replacing its pods; then the vision pool"), plan.message
