"""With an API pool and GCS fault tolerance (`spec.head.gcsFaultTolerance`), the Ray head can restart while
the API keeps answering.

On a real local Ray with an external Redis (tests/support/redis_server.py: Debian's own package), three
raylets stand for three pods: the head (Serve's controller only), a pool node (vision and LLM) and an API
node (the API and the tensor queue, pinned there by the control resource, with its own Serve proxy). The
head is killed outright and, after a few seconds, started again on the same GCS port with the same Redis, as
a new head pod comes up behind the same Service. Meanwhile a client sends the same greedy image + text
request to the API node's proxy, one after the other: every one, including those sent while the head is
down, answers 200 with the same tokens, and the API node's /health never fails. Every replica, the API's
and the queue's as well as the pools', is the same actor in the same process afterwards (the LLM did not
reload its weights) and the head's proxy answers the same tokens again. When the deployment is then deleted
(the head stopped), `dotsvlm cleanup-redis` removes Ray's keys from Redis. The cluster runs in its own
process (tests/serving/head_restart_driver.py).
"""

from __future__ import annotations

import pytest
from serving_support import run_driver

pytestmark = [pytest.mark.slow, pytest.mark.ray]

DEPLOYMENTS = {"VisionEncoder": "pool", "LLMServer": "pool", "Ingress": "api", "TensorQueue": "api"}


def test_the_api_answers_through_a_head_restart_and_every_replica_outlives_it(tmp_path) -> None:
    out = run_driver(tmp_path, "head_restart_driver.py", str(tmp_path / "tiny"), timeout=900)
    before, after, nodes = out["before"], out["after"], out["nodes_before"]
    for deployment, role in DEPLOYMENTS.items():
        assert before.get(deployment) and all(node == nodes[role] for _, _, node in before[deployment]), (
            deployment, out)  # nothing of the application on the head
        assert after.get(deployment) == before[deployment], (deployment, out)  # same actor, process and node
    assert all(out["alive_during_outage"].values()), out  # the worker processes lived through the outage
    nodes_after = out["nodes_after"]  # a new head; the same API and pool nodes
    assert nodes_after.get("head") not in (None, nodes["head"]), out
    assert {r: nodes_after.get(r) for r in ("api", "pool")} == {r: nodes[r] for r in ("api", "pool")}, out
    assert "answer" in out["answer_before"], out
    assert out["answer_after"] == out["answer_before"], out  # the same model answers, token for token
    # The API node's proxy answered throughout: nothing failed, and requests were sent while the head was down.
    traffic = out["traffic"]
    print("through the head restart:", {k: v for k, v in traffic.items() if k != "distinct_answers"},
          "head back after", out["head_back_s"], "s; phases", out["phases_s"])  # shown with -s or -rP
    assert traffic["errors"] == [] and traffic["wrong_answers"] == 0, out
    assert traffic["distinct_answers"] == [out["answer_before"]["answer"]], out
    assert traffic["sent_while_head_down"] >= 5 and traffic["health_polls_while_head_down"] >= 3, out
    assert traffic["health_failures"] == [], out
    # Deleted for good: `dotsvlm cleanup-redis` (the operator's Job) removes what Ray left in Redis.
    assert out["keys_before_cleanup"] > 0, out
    assert out["cleanup"]["rc"] == 0 and "removed the Ray state" in out["cleanup"]["said"], out
    assert out["keys_after_cleanup"] == 0, out
