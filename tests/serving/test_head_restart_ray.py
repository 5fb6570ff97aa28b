"""A Ray head restart with GCS fault tolerance (`spec.head.gcsFaultTolerance`) keeps the pools running.

On a real local Ray with an external Redis (tests/support/redis_server.py: Debian's own package): the head
is killed outright and started again on the same GCS port with the same Redis, as a new head pod comes up
behind the same Service. The vision and LLM replicas on the pool node are the same actors in the same
processes afterwards (the LLM did not reload its weights) and answer the same greedy request with the same
tokens; the API and the tensor queue, which run on the head, are new replicas. When the deployment is then
deleted (the head stopped), `dotsvlm cleanup-redis` removes Ray's keys from Redis. The cluster runs in its own
process (tests/serving/head_restart_driver.py).
"""

from __future__ import annotations

import pytest
from serving_support import run_driver

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_the_pools_and_their_replicas_outlive_a_head_restart_with_gcs_fault_tolerance(tmp_path) -> None:
    out = run_driver(tmp_path, "head_restart_driver.py", str(tmp_path / "tiny"), timeout=900)
    before, after = out["before"], out["after"]
    for deployment in ("VisionEncoder", "LLMServer"):
        assert after.get(deployment) == before[deployment], (deployment, out)  # same actor, same process
    assert all(out["alive_during_outage"].values()), out  # the pool processes lived through the outage
    for deployment in ("Ingress", "TensorQueue"):  # on the head: they restart with it
        assert after.get(deployment) and after[deployment] != before[deployment], (deployment, out)
    assert "answer" in out["answer_before"], out
    assert out["answer_after"] == out["answer_before"], out  # the same model answers, token for token
    # Deleted for good: `dotsvlm cleanup-redis` (the operator's Job) removes what Ray left in Redis.
    assert out["keys_before_cleanup"] > 0, out
    assert out["cleanup"]["rc"] == 0 and "removed the Ray state" in out["cleanup"]["said"], out
    assert out["keys_after_cleanup"] == 0, out
