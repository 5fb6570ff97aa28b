"""A stopping API pod (`spec.apiPool`) drains its Ray node like a pool pod (`dotsvlm drain-node`), and the
stream its Ingress replica is serving finishes, on a real local Ray; when the pod also holds the tensor
queue, the queue moves to another API pod with its state (the hand-over) and the stream goes on.

Four raylets stand for four pods: the head (Serve's controller and a proxy, no control resource), a pool node
(vision and LLM) and two API nodes with the control resource, each with its own Serve proxy on its own port.
Two Ingress replicas, one per API node; the tensor queue on one of them. The other API node is drained, with
the deadline its pod's preStop gets by default (request timeout + 2 x 15 s grace, less the 15 s margin), while
a 1500-token greedy stream runs through its proxy and its Ingress replica, and short requests keep going to
the other API node's proxy: Serve starts a replacement Ingress replica on the other API node and stops the old
one while the stream still runs (at the latest its graceful-shutdown timeout, the request timeout, before the
deadline); the old replica finishes the stream. The client gets exactly the text of the same request through
the other API node; no short request fails; the drain returns because the node left (not at its deadline);
two Ingress replicas run afterwards, both on the other API node. Draining the node without the queue leaves
the queue the same actor; draining the queue's node starts a new queue replica on the other API node, which
adopts the old one's state (the long stream's lease and mailbox): the stream still ends complete, with no
503 and no token lost or repeated (a stream that had sent tokens cannot be enqueued again).

The cluster runs in its own process (tests/serving/api_drain_driver.py): a session of these tests may already
hold a local Ray in this one.
"""

from __future__ import annotations

import pytest
from serving_support import run_driver

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.parametrize("drained", ["ingress", "queue"])
def test_draining_an_api_node_finishes_its_ingress_stream_and_moves_its_replicas(tmp_path, drained: str) -> None:
    out = run_driver(tmp_path, "api_drain_driver.py", str(tmp_path / "tiny"), drained, timeout=600)
    print(f"API node drain ({drained}):", {k: out.get(k) for k in (
        "stream", "reference", "stream_served_by", "drain", "shorts", "queue_counters", "timeline_s", "phases_s")})
    assert "placement_error" not in out, out["placement_error"]
    ref, stream = out["reference"], out["stream"]
    assert ref["status"] == 200 and ref["error"] is None and ref["finish"] == "length", out
    assert stream["status"] == 200 and stream["error"] is None, out
    assert stream["finish"] == "length" and stream["same_text"] is True, out  # every token, none lost or repeated
    # It ran on the drained node's Ingress replica (whose access log names it), and that replica was told to
    # stop while it streamed: it finished the stream in its graceful shutdown.
    assert out["stream_served_by"] == [out["drained_role"]], out
    assert stream["chunks_after_stopping"], out
    assert out["shorts"]["during_drain"] >= 3 and out["shorts"]["failed"] == [], out["shorts"]
    drain = out["drain"]
    assert drain["drained"] is True, out  # the node left by itself once its work was done ...
    assert drain["seconds"] < drain["deadline_s"] - 30, out  # ... well before its deadline
    assert out["drained_node_alive"] is False, out
    assert out["ingress_roles_after"] == [out["other_role"]] * 2, out  # both Ingress replicas on the other API node
    if drained == "ingress":
        assert out["queue_after"] == out["queue_before"], out  # the tensor queue untouched
    else:
        assert out["queue_after"] != out["queue_before"] and out["queue_role_after"] == [out["other_role"]], out
        assert out["queue_counters"]["adopted"] >= 1, out  # the old replica's state (the stream's lease) came along
