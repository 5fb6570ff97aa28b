"""With GCS fault tolerance the operator removes the Ray state Ray leaves in Redis. Deleting a deployment: the
head stops first, then a Job runs `dotsvlm cleanup-redis`; a failure or a timeout never blocks the deletion
and says how to finish by hand. Moving the state (a new address or storage namespace, or fault tolerance
off): the previous place is emptied once no head pod uses it."""

from __future__ import annotations

from pathlib import Path

import yaml

from dotsvlm_operator import builders, models, naming, redis_cleanup

REPO = Path(__file__).resolve().parents[2]
OWNER = naming.Owner("dots", "ml", "uid-123")


def _spec(**ft) -> models.DotsVLMDeploymentSpec:
    raw = yaml.safe_load((REPO / "examples" / "dotsvlm.yaml").read_text())["spec"]
    raw.setdefault("head", {})["gcsFaultTolerance"] = {"redisAddress": "redis.redis.svc:6379", **ft}
    raw["head"]["nodeSelector"] = {"pool": "cpu"}
    return models.DotsVLMDeploymentSpec.model_validate(raw)


def _step(spec=None, **kw) -> redis_cleanup.Step:
    ft = (spec or _spec()).head.gcs_fault_tolerance
    args = dict(head_deployment=False, head_pods=0, job=None, job_pods=[], elapsed_s=10.0) | kw
    return redis_cleanup.next_step(ft, OWNER.uid, **args)


def _job(**status) -> dict:
    return {"status": status}


def test_the_head_stops_before_the_job_runs_and_the_deletion_ends_when_it_succeeded() -> None:
    assert _step(head_deployment=True, head_pods=1).action == "stop_head"
    waiting = _step(head_pods=1)
    assert waiting.action == "wait" and "head pod to stop" in waiting.message
    assert _step().action == "run_job"
    assert _step(job=_job(active=1)).action == "wait"
    done = _step(job=_job(succeeded=1, conditions=[{"type": "Complete", "status": "True"}]))
    assert done.action == "done" and "'uid-123'" in done.message and "redis.redis.svc:6379" in done.message


def test_a_failed_job_gives_up_quoting_its_pod_and_the_command_to_finish_by_hand() -> None:
    pod = {"metadata": {"creationTimestamp": "2026-12-03T10:00:00Z"}, "status": {"containerStatuses": [{"state": {
        "terminated": {"exitCode": 1, "message": "...\ndotsvlm cleanup-redis: error: Redis refused: WRONGPASS"}}}]}}
    failed = _job(failed=3, conditions=[{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}])
    step = _step(_spec(passwordSecretRef={"name": "redis-auth"}), job=failed, job_pods=[pod])
    assert step.action == "give_up"
    assert "WRONGPASS" in step.message and "deleted anyway" in step.message
    assert ("redis-cli -h redis.redis.svc -p 6379 -a <password> --scan --pattern 'RAYuid-123@*' | xargs "
            "redis-cli -h redis.redis.svc -p 6379 -a <password> del") in step.message
    # No pod left to quote: the Job's own reason.
    assert "BackoffLimitExceeded" in _step(job=failed).message


def test_a_cleanup_that_takes_too_long_gives_up_and_says_which_part_hung() -> None:
    late = redis_cleanup.CLEANUP_TIMEOUT_S + 1
    head = _step(head_pods=1, elapsed_s=late)
    assert head.action == "give_up" and "head pod did not stop" in head.message
    job = _step(job=_job(active=1), elapsed_s=late, spec=_spec(storageNamespace="prod-a"))
    assert job.action == "give_up" and "Job did not finish" in job.message and "'RAYprod-a@*'" in job.message
    refused = redis_cleanup.give_up(_spec().head.gcs_fault_tolerance, OWNER.uid, "namespace is being terminated")
    assert refused.action == "give_up" and "namespace is being terminated" in refused.message
    assert "redis-cli" in refused.message
    # A finished Job counts even when the answer comes late.
    assert _step(job=_job(succeeded=1), elapsed_s=late).action == "done"


def test_the_job_runs_the_heads_image_redis_settings_and_placement() -> None:
    spec = _spec(passwordSecretRef={"name": "redis-auth"}, storageNamespace="prod-a")
    job = builders.redis_cleanup_job(OWNER, spec)
    assert job["kind"] == "Job" and job["metadata"]["name"] == "dots-redis-cleanup"
    # Not owned (a foreground deletion would remove it before it ran); it names the resource it serves.
    assert "ownerReferences" not in job["metadata"]
    assert job["metadata"]["annotations"][naming.ANNOTATION_OWNER_UID] == "uid-123"
    pod = job["spec"]["template"]["spec"]
    head = builders.head_deployment(OWNER, spec)["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["dotsvlm", "cleanup-redis"] and c["image"] == spec.image
    env = {e["name"]: e for e in c["env"]}
    assert env["RAY_REDIS_ADDRESS"]["value"] == "redis.redis.svc:6379"
    assert env["RAY_external_storage_namespace"]["value"] == "prod-a"
    assert env[naming.REDIS_PASSWORD_ENV]["valueFrom"]["secretKeyRef"] == {"name": "redis-auth", "key": "password"}
    assert {e["name"]: e for e in head["containers"][0]["env"]}[naming.REDIS_PASSWORD_ENV] == env[naming.REDIS_PASSWORD_ENV]
    assert pod["restartPolicy"] == "Never" and pod["nodeSelector"] == head["nodeSelector"] == {"pool": "cpu"}
    assert job["spec"]["activeDeadlineSeconds"] > 0 and job["spec"]["backoffLimit"] >= 1


def test_with_fault_tolerance_the_head_checks_redis_first_with_the_same_settings() -> None:
    spec = _spec(passwordSecretRef={"name": "redis-auth"})
    pod = builders.head_deployment(OWNER, spec)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["dotsvlm", "check-redis"] and init["terminationMessagePolicy"] == "FallbackToLogsOnError"
    assert init["env"] == builders.redis_container(OWNER, spec, "cleanup-redis")["env"]
    plain = yaml.safe_load((REPO / "examples" / "dotsvlm.yaml").read_text())["spec"]
    assert "initContainers" not in builders.head_deployment(
        OWNER, models.DotsVLMDeploymentSpec.model_validate(plain))["spec"]["template"]["spec"]


def _place(namespace: str = "uid-123", address: str = "redis.redis.svc:6379", **kw) -> models.RedisStateStatus:
    return models.RedisStateStatus(redis_address=address, storage_namespace=namespace, **kw)


def _previous(recorded, wanted, **kw) -> redis_cleanup.Step:
    args = dict(head_uses_recorded=False, job=None, job_pods=[], job_age_s=0.0) | kw
    return redis_cleanup.previous_step(recorded, wanted, OWNER.uid, **args)


def test_the_place_the_head_used_before_a_move_is_emptied_once_no_head_pod_uses_it() -> None:
    old, new = _place(), _place("prod-b")
    waiting = _previous(old, new, head_uses_recorded=True)
    assert waiting.action == "wait" and "once no Ray head pod uses it" in waiting.message
    assert "'prod-b'" in waiting.message and "'uid-123'" in waiting.message
    assert _previous(old, new).action == "run_job"
    assert _previous(old, new, job=_job(active=1), job_age_s=30).action == "wait"
    done = _previous(old, new, job=_job(succeeded=1))
    assert done.action == "done" and "removed the Ray state (storage namespace 'uid-123')" in done.message
    # Another Redis is a move too, and so is turning fault tolerance off.
    assert _previous(old, _place(address="redis-2.redis.svc:6379")).action == "run_job"
    off = _previous(old, None)
    assert off.action == "run_job" and "fault tolerance is off now" in off.message


def test_nothing_moves_when_only_the_password_secret_changes_or_nothing_was_recorded() -> None:
    old = _place(password_secret_ref={"name": "redis-auth"})
    assert _previous(old, _place(password_secret_ref={"name": "redis-auth-2"})).action == "record"
    assert _previous(None, _place()).action == "record"
    assert _previous(None, None).action == "record"
    assert redis_cleanup.location(None, OWNER.uid) is None
    assert redis_cleanup.location(_spec().head.gcs_fault_tolerance, OWNER.uid) == _place()


def test_a_failed_or_stuck_cleanup_of_the_previous_place_gives_the_command_for_that_place() -> None:
    old, new = _place("prod-a", password_secret_ref={"name": "redis-auth"}), _place("prod-b")
    failed = _previous(old, new, job=_job(conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}]))
    assert failed.action == "give_up" and "DeadlineExceeded" in failed.message
    assert "-a <password> --scan --pattern 'RAYprod-a@*'" in failed.message
    stuck = _previous(old, new, job=_job(active=1), job_age_s=redis_cleanup.CLEANUP_TIMEOUT_S + 1)
    assert stuck.action == "give_up" and "did not finish" in stuck.message and "'RAYprod-a@*'" in stuck.message
    assert redis_cleanup.job_age_s({"metadata": {"creationTimestamp": "2026-12-03T10:00:00Z"}},
                                   1796292000.0 + 75) == 75.0


def test_a_head_pod_is_known_to_use_a_place_by_its_environment() -> None:
    spec = _spec(storageNamespace="prod-a")
    pod = {"spec": builders.head_deployment(OWNER, spec)["spec"]["template"]["spec"]}
    assert redis_cleanup.head_uses(pod, _place("prod-a"))
    assert not redis_cleanup.head_uses(pod, _place("uid-123"))
    assert not redis_cleanup.head_uses(pod, _place("prod-a", address="other.redis.svc:6379"))
    plain = yaml.safe_load((REPO / "examples" / "dotsvlm.yaml").read_text())["spec"]
    no_ft = {"spec": builders.head_deployment(OWNER, models.DotsVLMDeploymentSpec.model_validate(plain))["spec"]["template"]["spec"]}
    assert not redis_cleanup.head_uses(no_ft, _place("prod-a"))


def test_the_previous_place_job_is_owned_and_reaches_that_place_with_its_own_password() -> None:
    spec = _spec(storageNamespace="prod-b")  # the spec moved on: another namespace, no password
    old = _place("prod-a", password_secret_ref={"name": "redis-old", "key": "pw"})
    job = builders.redis_cleanup_job(OWNER, spec, previous=old)
    assert job["metadata"]["name"] == "dots-redis-cleanup-prev"
    assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-123"  # goes with the resource
    assert job["metadata"]["annotations"][naming.ANNOTATION_REDIS_PLACE] == "redis.redis.svc:6379/prod-a"
    (c,) = job["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert c["command"] == ["dotsvlm", "cleanup-redis"] and c["image"] == spec.image
    assert env["RAY_external_storage_namespace"]["value"] == "prod-a"
    assert env[naming.REDIS_PASSWORD_ENV]["valueFrom"]["secretKeyRef"] == {"name": "redis-old", "key": "pw"}
    assert job["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}


def test_a_deletion_during_a_move_says_which_keys_of_the_previous_place_are_left(monkeypatch) -> None:
    import logging

    from dotsvlm_operator import handlers

    events: list[dict] = []
    monkeypatch.setattr(handlers.kopf, "event", lambda body, **kw: events.append(kw))
    spec = _spec(storageNamespace="prod-b").to_api()
    body = {"metadata": {"name": "dots", "namespace": "ml", "uid": "uid-123"}, "spec": spec,
            "status": {"redisState": {"redisAddress": "redis.redis.svc:6379", "storageNamespace": "prod-a"}}}
    handlers._warn_unfinished_move(body, logging.getLogger("test"))
    (event,) = events
    assert event["type"] == "Warning" and event["reason"] == "RedisStateLeft"
    assert "'RAYprod-a@*'" in event["message"] and "deleted before the operator removed it" in event["message"]
    # Nothing pending (the status already names the spec's place): no Event.
    body["status"]["redisState"]["storageNamespace"] = "prod-b"
    handlers._warn_unfinished_move(body, logging.getLogger("test"))
    assert len(events) == 1
    # A place still pending (the spec moved back to prod-b meanwhile): its keys are named too.
    body["status"]["redisState"]["pending"] = [{"redisAddress": "redis.redis.svc:6379", "storageNamespace": "prod-c"}]
    handlers._warn_unfinished_move(body, logging.getLogger("test"))
    assert len(events) == 2 and "'RAYprod-c@*'" in events[1]["message"]


def test_a_third_place_a_head_used_during_a_cleanup_is_emptied_next_even_once_that_head_is_gone() -> None:
    """The spec moved L1 -> L2 -> L3 while L1 was being emptied: a head pod seen on L2 puts L2 on the pending
    list, so L2 is the next place to empty, even when its head pod is gone by the time L1's cleanup ends
    (instead of recording L3 and leaving L2's keys behind)."""
    def head(**ft) -> dict:
        return {"spec": builders.head_deployment(OWNER, _spec(**ft))["spec"]["template"]["spec"]}

    on_l2 = head(storageNamespace="l2", passwordSecretRef={"name": "redis-auth"})
    assert redis_cleanup.place_of(on_l2) == _place("l2", password_secret_ref={"name": "redis-auth", "key": "password"})
    l1, l3 = _place("l1"), _place("l3")
    # While L1 is emptied, the L2 head is seen (and an L3 head, and an L1 head: neither is pending).
    seen = redis_cleanup.with_pending(l1, l3, [on_l2, head(storageNamespace="l3"), head(storageNamespace="l1")])
    assert [p.storage_namespace for p in seen.pending] == ["l2"]
    assert seen.pending[0].password_secret_ref.name == "redis-auth"
    # Seen again on a later pass: not twice. Then the L2 head is gone: L2 stays pending.
    seen = redis_cleanup.with_pending(seen, l3, [on_l2])
    seen = redis_cleanup.with_pending(seen, l3, [head(storageNamespace="l3")])
    assert [p.storage_namespace for p in seen.pending] == ["l2"]
    # L1 emptied: L2 is recorded next (the L2 head is gone by now), and moving away from it is a move.
    nxt = redis_cleanup.after_cleanup(seen, l3)
    assert nxt.storage_namespace == "l2" and not nxt.pending and redis_cleanup.moved(nxt, l3)
    assert _previous(nxt, l3).action == "run_job"
    assert redis_cleanup.after_cleanup(nxt, l3) == l3  # then the spec's place
    assert redis_cleanup.after_cleanup(l1, None) is None  # fault tolerance off, nothing pending
    # Two pending places are emptied in turn; one that is the spec's again is not emptied at all.
    two = redis_cleanup.with_pending(l1, l3, [on_l2, head(storageNamespace="l4")])
    assert [p.storage_namespace for p in two.pending] == ["l2", "l4"]
    step = redis_cleanup.after_cleanup(two, l3)
    assert step.storage_namespace == "l2" and [p.storage_namespace for p in step.pending] == ["l4"]
    assert redis_cleanup.after_cleanup(step, _place("l4")) == _place("l4")
