"""A stopping pool pod drains its Ray node first (the pods' preStop: `dotsvlm drain-node`), on a real local
Ray cluster with the dotsvlm application (tiny model), a head and two pool raylets: a stream on the LLM
replica of a drained node finishes with the tokens it gets undisturbed, Serve moves the replica to the
other node, and the drain returns when the node has left (not at its deadline). Then both pools roll, one
node at a time, under load.

Each cluster runs in its own process (tests/serving/drain_app_driver.py, pool_roll_driver.py): a session of
these tests may already hold a local Ray in this one.
"""

from __future__ import annotations

import pytest
from serving_support import run_driver

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_draining_the_llm_replicas_node_finishes_its_stream_with_the_same_tokens(tmp_path) -> None:
    """The dotsvlm application (tiny model): the API and the queue on the head, one LLM replica on one of two
    pool nodes. Its node is drained while a 1500-token stream runs on it; Serve stops the replica (at the
    latest 60 s before the drain's deadline: here at once), the replica finishes the stream within its drain,
    and the client gets exactly the tokens the same request gets undisturbed."""
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint

    model = ensure_tiny_checkpoint(tmp_path / "tiny")
    out = run_driver(tmp_path, "drain_app_driver.py", str(model), timeout=900)
    assert out["status"] == 200 and out["error"] is None, out
    assert out["finish"] == "length" and out["same_text"] is True, out  # every token, none lost or repeated
    assert out["stopping_before_stream_end"] is True, out  # Serve stopped the replica while it streamed
    assert out["drain"]["drained"] is True and out["drain"]["exit_code"] == 0, out  # the node then left by itself
    assert out["node_before"] not in out["nodes_after"], out


def test_rolling_both_pools_one_at_a_time_loses_no_request(tmp_path) -> None:
    """What a `spec.image` change does to the pools (the operator rolls vision, then LLM): for each pool a
    new raylet joins, the old one drains as its pod's preStop drains it (deadline from the pool's default
    grace period) and goes. Image requests and long streams run all the while: every one ends 200 with all
    its tokens, each pool's replica ends on its new node, and the ingress and the tensor queue (on the head)
    keep their replicas. The head's own restart in an image change is not covered (see docs/operator.md)."""
    from dotsvlm_serving.model.tiny import ensure_tiny_checkpoint

    model = ensure_tiny_checkpoint(tmp_path / "tiny")
    out = run_driver(tmp_path, "pool_roll_driver.py", str(model), timeout=1200)
    assert out["clients_done"], "a request hung"
    assert not out["failures"], f"requests lost or cut short while the pools rolled: {out['failures'][:5]}"
    assert out["by_kind"]["image"] >= 4 and out["by_kind"]["stream"] >= 4, out["by_kind"]
    for roll in out["rolls"]:
        assert roll["drained"] is True, roll  # the old node left by itself once its work was done
        assert roll["old_node"] not in roll["now_on"], roll
    assert out["rolls"][1]["requests_ok_so_far"] > out["rolls"][0]["requests_ok_so_far"], out["rolls"]  # served between
    assert out["control_after"] == out["control_before"], out  # ingress and queue untouched
    assert all(len(nodes) == 1 for nodes in out["replicas_after"].values()), out["replicas_after"]
