"""Deleting a deployment with GCS fault tolerance removes its Ray state from Redis: the head stops first, then
a Job runs `dotsvlm cleanup-redis`; a failure or a timeout never blocks the deletion and says how to finish
by hand."""

from __future__ import annotations

from pathlib import Path

import yaml

from dotsvlm_operator import builders, deletion, models, naming

REPO = Path(__file__).resolve().parents[2]
OWNER = naming.Owner("dots", "ml", "uid-123")


def _spec(**ft) -> models.DotsVLMDeploymentSpec:
    raw = yaml.safe_load((REPO / "examples" / "dotsvlm.yaml").read_text())["spec"]
    raw.setdefault("head", {})["gcsFaultTolerance"] = {"redisAddress": "redis.redis.svc:6379", **ft}
    raw["head"]["nodeSelector"] = {"pool": "cpu"}
    return models.DotsVLMDeploymentSpec.model_validate(raw)


def _step(spec=None, **kw) -> deletion.Step:
    ft = (spec or _spec()).head.gcs_fault_tolerance
    args = dict(head_deployment=False, head_pods=0, job=None, job_pods=[], elapsed_s=10.0) | kw
    return deletion.next_step(ft, OWNER.uid, **args)


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
    late = deletion.CLEANUP_TIMEOUT_S + 1
    head = _step(head_pods=1, elapsed_s=late)
    assert head.action == "give_up" and "head pod did not stop" in head.message
    job = _step(job=_job(active=1), elapsed_s=late, spec=_spec(storageNamespace="prod-a"))
    assert job.action == "give_up" and "Job did not finish" in job.message and "'RAYprod-a@*'" in job.message
    refused = deletion.give_up(_spec().head.gcs_fault_tolerance, OWNER.uid, "namespace is being terminated")
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
