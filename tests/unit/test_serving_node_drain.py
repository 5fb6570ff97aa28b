"""`dotsvlm drain-node` (the pool pods' preStop) never keeps a pod from stopping: an unreachable Ray head
costs at most the deadline, and the hook exits 0. The drain itself runs on a real Ray cluster in
tests/serving/test_node_drain.py."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

DOTSVLM = Path(sys.executable).parent / "dotsvlm"


def test_drain_node_with_the_head_gone_gives_up_at_its_deadline_and_exits_0() -> None:
    started = time.monotonic()
    proc = subprocess.run([str(DOTSVLM), "drain-node", "--address=127.0.0.1:9", "--deadline-seconds=3",
                           "--node-ip=10.0.0.1"], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr
    assert "gave up at the deadline (3 s)" in proc.stderr or "drain failed" in proc.stderr, proc.stderr
    assert took < 30, took  # the deadline (plus Python and Ray's import), not Ray's 40 s of GCS retries


def test_a_pool_pod_finds_its_own_ray_node_by_its_pod_ip() -> None:
    """The preStop names no node: it drains the alive worker node registered under the pod's IP
    ($DOTSVLM_POD_IP), never the head and never a dead node that had the same IP before."""
    from ray.core.generated.gcs_pb2 import GcsNodeInfo

    from dotsvlm_serving.node_drain import find_node_id

    alive, dead = GcsNodeInfo.GcsNodeState.ALIVE, GcsNodeInfo.GcsNodeState.DEAD

    class Gcs:
        def get_all_node_info(self, timeout: float) -> dict:
            return {"head": GcsNodeInfo(node_manager_address="10.0.0.9", state=alive, is_head_node=True),
                    "old": GcsNodeInfo(node_manager_address="10.0.0.1", state=dead),
                    "mine": GcsNodeInfo(node_manager_address="10.0.0.1", state=alive),
                    "other": GcsNodeInfo(node_manager_address="10.0.0.2", state=alive)}

    assert find_node_id(Gcs(), "10.0.0.1") == "mine"
    assert find_node_id(Gcs(), "10.0.0.9") is None  # the head is drained by drain-head, not here
    assert find_node_id(Gcs(), "10.0.0.3") is None
